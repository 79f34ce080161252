"""PPL-p% sparsity (CETT thresholds + outer binary search) on tiny models trained for a second."""

import pytest
import torch
from conftest import SAMPLE_TEXT
from tiny_models import build_tiny_model, tiny_tokenizer

from relufy.cett import PPLSearch, down_matrix, ppl_p_sparsity
from relufy.errors import DataError
from relufy.architectures import down_projections

BLOCK = 32


@pytest.fixture(scope="module")
def token_ids():
    tokenizer = tiny_tokenizer(SAMPLE_TEXT)
    return torch.tensor(tokenizer(SAMPLE_TEXT.read_text())["input_ids"])


def _trained(token_ids, act: str):
    """A tiny llama trained 60 steps, so its FFN matters for perplexity (random init does not)."""
    torch.manual_seed(0)
    model = build_tiny_model("llama", hidden_act=act).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_ids = token_ids[:-4096]
    for _ in range(60):
        starts = torch.randint(0, len(train_ids) - BLOCK, (16,))
        batch = torch.stack([train_ids[i: i + BLOCK] for i in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def held_out(token_ids):
    return token_ids[-4096:][:1024].reshape(-1, BLOCK)


@pytest.fixture(scope="module")
def silu_result(token_ids, held_out):
    return ppl_p_sparsity(_trained(token_ids, "silu"), held_out, ps=(1, 10))


@pytest.fixture(scope="module")
def relu_result(token_ids, held_out):
    return ppl_p_sparsity(_trained(token_ids, "relu"), held_out, ps=(1, 10))


def test_sparsity_grows_with_p(silu_result):
    one, ten = silu_result["results"]["1"], silu_result["results"]["10"]
    assert 0 < one["sparsity"] < ten["sparsity"] <= 1
    assert one["cett"] < ten["cett"]


def test_reached_perplexity_stays_within_p_percent_of_dense(silu_result):
    for p, entry in silu_result["results"].items():
        assert entry["ppl_dense"] <= entry["ppl"] * 1.001  # a pruned model is not better than dense here
        assert entry["ppl"] <= entry["ppl_dense"] * (1 + float(p) / 100) + 1e-9
        assert len(entry["thresholds"]) == 2 and all(eps > 0 for eps in entry["thresholds"])


def test_relu_model_is_sparser_than_silu_at_the_same_p(silu_result, relu_result):
    assert relu_result["results"]["1"]["sparsity"] > silu_result["results"]["1"]["sparsity"]


def test_forward_passes_per_p_stay_within_budget(silu_result):
    for entry in silu_result["results"].values():
        assert entry["forward_passes"] <= 15
    assert silu_result["forward_passes"] <= 1 + 15 * len(silu_result["results"])


def test_cett_zero_reproduces_the_dense_perplexity(token_ids, held_out):
    search = PPLSearch(_trained(token_ids, "silu"), held_out)
    assert search.thresholds_for(0.0) == [0.0, 0.0]
    assert search.evaluate(0.0, cached=False).ppl == pytest.approx(search.ppl_dense, rel=1e-6)


def test_inner_search_hits_the_cett_target(token_ids, held_out):
    search = PPLSearch(_trained(token_ids, "silu"), held_out)
    for layer in search.layers:
        eps = layer.eps_for(0.2)
        assert layer.cett(eps) == pytest.approx(0.2, abs=2e-3)


def test_column_norms_match_neuron_output_norms_for_linear_and_conv1d():
    for model_type in ("llama", "gpt2"):
        module = down_projections(build_tiny_model(model_type))[0]
        weight, _ = down_matrix(module)
        x1 = torch.zeros(1, weight.shape[0])
        x1[0, 3] = 2.0
        bias = getattr(module, "bias", None)
        out = module(x1) - (bias if bias is not None else 0)
        assert out.norm().item() == pytest.approx(2.0 * weight[3].norm().item(), rel=1e-5)


def test_calibration_reads_the_model_weights_in_place_and_in_float32(token_ids, held_out):
    """The inner search runs where the weights are, on views of them (no float32 copy of every layer
    is kept), and a bfloat16 weight gives the CETT of its float32 copy: the products are float32."""
    model = _trained(token_ids, "silu")
    search = PPLSearch(model, held_out)
    for layer, module in zip(search.layers, down_projections(model)):
        assert layer.weight.data_ptr() == module.weight.data_ptr()
        assert layer.x1.device == module.weight.device and layer.x1.dtype == torch.float32
    layer = search.layers[0]
    half = type(layer)(layer.x1, layer.weight.to(torch.bfloat16), None, layer.column_norms)
    full = type(layer)(layer.x1, layer.weight.to(torch.bfloat16).float(), None, layer.column_norms)
    eps = layer.eps_for(0.2)
    assert half.cett(eps) == pytest.approx(full.cett(eps), rel=1e-6)


def test_non_positive_p_and_empty_text_are_refused(held_out):
    model = build_tiny_model("llama")
    with pytest.raises(DataError, match="p must be > 0"):
        ppl_p_sparsity(model, held_out[:2], ps=(0,))
    with pytest.raises(DataError, match="empty"):
        ppl_p_sparsity(model, torch.zeros(0, BLOCK, dtype=torch.long), ps=(1,))


def test_sparsity_ppl_p_and_matched_read_perplexity_from_one_pass(held_out):
    from datasets import Dataset

    from relufy.cett import NeuronMask, thresholded_perplexity
    from relufy.metrics import measure_sparsity

    model = build_tiny_model("llama", hidden_act="relu")
    measured = measure_sparsity(model, Dataset.from_dict({"input_ids": held_out.tolist()}), progress=False)
    dense, zeros = thresholded_perplexity(model, held_out, NeuronMask(model), [0.0, 0.0])
    assert measured["perplexity"] == dense == PPLSearch(model, held_out).ppl_dense
    assert measured["per_layer"] == pytest.approx(zeros)
