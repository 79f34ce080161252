"""The L1 term of training (relufy.l1): the tap's forward and backward, and the term a training probe collects."""

import pytest
import torch
from tiny_models import VOCAB, build_tiny_model, manual_x1

from relufy.l1 import L1Tap, L1Term, add_l1_gradient
from relufy.probe import SparsityProbe


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_the_l1_tap_is_an_identity_whose_backward_adds_the_l1_gradient(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=generator).to(dtype).requires_grad_()
    reference = x.detach().double().requires_grad_()
    weights = torch.rand(3, 5, dtype=torch.float64, generator=generator)
    upstream = torch.randn(3, 5, 64, dtype=torch.float64, generator=generator)
    tapped, per_token = L1Tap.apply(x)
    ((tapped.double() * upstream).sum() + (per_token.double() * weights).sum()).backward()
    ((reference * upstream).sum() + (reference.abs().sum(-1) * weights).sum()).backward()
    assert torch.equal(tapped, x) and per_token.dtype == torch.float32
    torch.testing.assert_close(per_token.double(), reference.abs().sum(-1), rtol=tolerance, atol=tolerance)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), reference.grad, rtol=tolerance, atol=tolerance)


def test_the_l1_tap_passes_the_gradient_through_when_its_l1_is_unused():
    x = torch.randn(2, 4, 8, requires_grad=True)
    tapped, _ = L1Tap.apply(x)
    (tapped * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled L1 backward runs on CUDA only")
def test_the_compiled_l1_backward_matches_the_eager_one():
    grad = torch.randn(2, 7, 96, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 7, 96, device="cuda", dtype=torch.bfloat16).relu()
    per_token = torch.rand(2, 7, device="cuda")
    eager = (grad.float() + torch.sign(x).float() * per_token.unsqueeze(-1)).to(grad.dtype)
    torch.testing.assert_close(add_l1_gradient(grad, x, per_token), eager)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA's autocast computes vector_norm in float32; CPU's does not"))])
def test_the_l1_gradient_survives_torch_compile(device):
    """In float32 (and under CUDA's bf16 autocast, whose vector_norm returns float32) a norm converted
    with `.float()` is the norm tensor itself, and torch 2.11's dynamo hands that output's gradient to the
    aliased intermediate: the compiled L1 gradient was zero, the compiled forward's L1 value right."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 8, generator=generator).to(device).requires_grad_()
    inputs = torch.randn(4, 16, generator=generator).to(device)

    def loss(x):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            tapped, per_token = L1Tap.apply(x @ weight)
        return tapped.float().sum() + per_token.mean()

    grads = []
    for forward in (loss, torch.compile(loss)):
        weight.grad = None
        forward(inputs).backward()
        grads.append(weight.grad)
    tolerance = 1e-2 if device == "cuda" else 1e-5  # bf16 matmuls, summed in another order when compiled
    torch.testing.assert_close(grads[1], grads[0], rtol=tolerance, atol=tolerance)


def test_l1_term_is_sum_over_layers_of_mean_token_l1():
    model = build_tiny_model("llama", hidden_act="relu")
    input_ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    expected = sum(float(x.abs().sum(-1).mean()) for x in manual_x1(model, input_ids))
    with SparsityProbe.for_training(model) as probe:
        model(input_ids=input_ids)
        term = probe.pop_l1()
    assert term.requires_grad
    assert term.item() == pytest.approx(expected, rel=1e-5)
    assert float(probe.pop_l1()) == 0.0


def test_l1_term_adds_up_forwards_of_different_shapes_and_respects_the_token_mask():
    model = build_tiny_model("llama", hidden_act="relu")
    short, long = (torch.randint(0, VOCAB, size, generator=torch.Generator().manual_seed(6)) for size in [(2, 5), (1, 9)])
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 4:] = False
    expected = sum(float(x.abs().sum(-1).mean()) for x in manual_x1(model, short))
    expected += sum(float(x[mask].abs().sum(-1).mean()) for x in manual_x1(model, long))
    with SparsityProbe.for_training(model) as probe:
        model(input_ids=short)
        probe.token_mask = mask
        model(input_ids=long)
        term = probe.pop_l1()
    assert term.item() == pytest.approx(expected, rel=1e-5)


def test_the_term_averages_masked_tokens_per_layer_and_pop_clears_it():
    term = L1Term()
    term.add(torch.tensor([[1.0, 3.0]]))
    term.add(torch.tensor([[2.0, 10.0]]), token_mask=torch.tensor([[True, False]]))
    assert term.value().item() == pytest.approx(2.0 + 2.0)
    assert term.pop().item() == pytest.approx(4.0) and term.value().item() == 0.0


def test_only_a_training_probe_has_an_l1_term():
    model = build_tiny_model("llama", hidden_act="relu")
    with pytest.raises(ValueError, match="for_training"):
        SparsityProbe.for_measurement(model).pop_l1()


def test_a_paused_training_probe_still_taps_while_autograd_records():
    """Activation checkpointing recomputes the forward in backward with the probe paused: the tap must run
    again (so the same tensors are saved), its term dropped. A measurement probe never taps."""
    model = build_tiny_model("llama", hidden_act="relu")
    input_ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    seen = []
    down = model.model.layers[0].mlp.down_proj
    for probe in (SparsityProbe.for_training(model), SparsityProbe.for_measurement(model)):
        probe.enabled = False
        with probe:  # registered after the probe's hook: sees what the down projection gets
            handle = down.register_forward_pre_hook(lambda m, args: seen.append(type(args[0].grad_fn).__name__))
            model(input_ids=input_ids)
            handle.remove()
        assert probe.tokens == 0
    assert seen[0] == "L1TapBackward" and seen[1] != "L1TapBackward"
