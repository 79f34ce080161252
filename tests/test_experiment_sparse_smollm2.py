"""experiments/sparse-smollm2/check_tokens.py on a tiny checkpoint, on CPU under Triton's interpreter.

A SiLU checkpoint is converted first; a ReLU one (what `relufy train` writes) is checked as it is, and the
JSON records the activation the model ran with either way. In float32 the dense and sparse greedy tokens
must agree on every shipped prompt, so the script exits 0, and its JSON carries the dense margins and the
dense-sparse logit noise. Where tokens differ, the margin at the first difference decides between a
near-tie and a bug (`compare`, on hand-made scores). The control (FFN products summed in float32) equals
dense in a float32 model, changes the rounding of some FFN outputs in a bfloat16 one, and leaves the
modules as they were.
"""

from __future__ import annotations

import json

import pytest

from conftest import load_script

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def check_tokens():
    return load_script("experiments/sparse-smollm2/check_tokens.py", "check_tokens")


# A converted checkpoint records what it became; one that was not converted records its own activation, not
# the --activation it would have been converted to.
@pytest.mark.parametrize("base,activation,converted",
                         [("silu_base", "relu", True), ("relu_checkpoint", "relu2", False)])
def test_check_tokens_finds_identical_greedy_tokens(tmp_path, check_tokens, base, activation, converted, request,
                                                    capsys):
    output = tmp_path / "tokens.json"
    code = check_tokens.main(["--model", str(request.getfixturevalue(base)), "--device", "cpu", "--dtype", "float32",
                              "--new-tokens", "3", "--activation", activation, "--output", str(output)])
    result = json.loads(output.read_text())
    assert code == 0 and result["ok"] and result["all_identical"] and result["sparse_ffns"] == 2
    assert result["activation"] == "relu" and result["converted"] is converted
    # float32: the control is the dense computation itself, so it agrees token for token and logit for logit
    assert result["control_identical_prompts"] == len(result["prompts"]) and result["control_min_matching_tokens"] == 3
    assert result["control_mean_first_difference"] == result["mean_first_difference"] == 3
    assert result["explained_by_summation_order"] and result["control_above_tolerance"] == []
    assert result["control_slack"] == pytest.approx(0.3)
    for row in result["prompts"]:
        assert row["control"] == {"identical": True, "first_difference": None, "matching_tokens": 3,
                                  "max_logit_difference": 0.0, "dense_gap": None, "near_tie": None}
    assert len(result["prompts"]) == len(check_tokens.PROMPTS) >= 8
    assert result["identical_prompts"] == len(result["prompts"]) and result["min_matching_tokens"] == 3
    for row in result["prompts"]:
        assert row["new_tokens"] == 3 and row["first_difference"] is None and "at_difference" not in row
        assert row["min_margin"] >= 0 and 0 <= row["min_margin_position"] < 3
        assert row["max_logit_difference"] < result["tolerance"]  # float32: the kernels add rounding noise only
        assert row["dense_text"] == row["sparse_text"]
    assert "relufy_output" in result and result["tolerance"] == check_tokens.DEFAULT_TOLERANCE["float32"]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"{len(result['prompts'])}/") and "explained by summation order: yes" in summary


def test_no_control_leaves_the_control_out(tmp_path, check_tokens, relu_checkpoint, capsys):
    prompts, output = tmp_path / "prompts.txt", tmp_path / "tokens.json"
    prompts.write_text("The capital of France is\n")
    code = check_tokens.main(["--model", str(relu_checkpoint), "--device", "cpu", "--dtype", "float32",
                              "--new-tokens", "2", "--prompts", str(prompts), "--no-control", "--output", str(output)])
    result = json.loads(output.read_text())
    assert code == 0 and result["ok"] and result["mean_first_difference"] == 2
    assert not [key for key in result if key.startswith("control") or key == "explained_by_summation_order"]
    assert [row for row in result["prompts"] if "control" in row] == []
    assert "control" not in capsys.readouterr().out.lower()


def test_the_sparse_decode_runs_the_kernels_in_its_eager_calls(check_tokens, relu_checkpoint):
    """The decodes are eager `generate` calls, which on CUDA run the kernels only with SparseConfig.eager:
    without it a GPU's sparse decode would be the dense one again and every prompt trivially identical."""
    import argparse

    from relufy.checkpoint import resolve_source
    from relufy.sparse import eager_runs_dense, sparse_ffns

    args = argparse.Namespace(model=str(relu_checkpoint), dtype="float32", device="cpu", activation="relu")
    model, _, converted = check_tokens.load_relu_model(args, resolve_source(args.model))
    states = sparse_ffns(model)
    assert not converted and len(states) == 2 and all(state.eager for state in states)
    for state in states:
        state.cuda_device = 0  # as a GPU's: still no eager call runs dense
    assert not eager_runs_dense(model)


def _ffn_model(model_type: str, dtype: str, **sizes):
    import torch
    from tiny_models import build_tiny_model

    from relufy.activations import register_activations
    from relufy.architectures import architecture_for

    register_activations()  # fatrelu_<t> is relufy's
    settings = architecture_for(model_type).with_activation({}, "fatrelu_0.1")
    return build_tiny_model(model_type, **settings, **sizes).to(getattr(torch, dtype))


def _projections(model) -> list:
    from relufy.architectures import architecture_for, ffn_modules

    arch = architecture_for(model.config.model_type)
    return [getattr(ffn, name) for ffn in ffn_modules(model, arch)
            for name in (arch.gate_up, arch.gate, arch.up, arch.down) if name]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # nn.Linear projections; GPT-2's Conv1D
def test_the_control_equals_dense_in_float32_and_leaves_the_modules_as_they_were(check_tokens, model_type):
    import torch

    model = _ffn_model(model_type, "float32")
    layers = _projections(model)
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    before_state = [(dict(vars(layer)), dict(layer._forward_hooks), dict(layer._forward_pre_hooks)) for layer in layers]
    with torch.no_grad():
        dense = model(ids).logits
        with check_tokens.float32_products(model):
            assert all(len(layer._forward_hooks) == 1 for layer in layers)
            control = model(ids).logits
        after = model(ids).logits
    assert torch.equal(control, dense) and torch.equal(after, dense)
    assert [(dict(vars(layer)), dict(layer._forward_hooks), dict(layer._forward_pre_hooks))
            for layer in layers] == before_state


def test_the_control_changes_the_rounding_of_bfloat16_ffn_outputs(check_tokens):
    """The control is worth running only if it really sums in another order. PyTorch's CPU bf16 linear also
    accumulates in float32 and rounds once, so its result differs from the float32 product rounded to bf16
    only where the two float32 sums (in their two orders) straddle a bf16 rounding boundary: about one
    element in 10^4 at a 256-wide product on an AVX2 CPU, and none in 2,000 outputs of the 32-wide tiny
    models of the other tests. Hence 512 wide with 2048 neurons and 64 tokens: some 35 gate, up and down
    outputs of this first FFN change, with 1 thread or 2. Its input is the same tensor in both runs, so the
    change comes from the products alone. The model is sparsified and run dense inside `sparse_enabled`, as
    the script runs the control, so the hooks are seen to fire through the sparse FFN's dense path; with
    `max_tokens` 64, since the control leaves longer calls (which the sparse decode runs dense) alone."""
    import torch

    from relufy.architectures import ffn_modules
    from relufy.sparse import SparseConfig, sparse_enabled, sparse_ffn_count, sparsify

    model = sparsify(_ffn_model("llama", "bfloat16", hidden_size=512, intermediate_size=2048),
                     SparseConfig(max_tokens=64))
    assert sparse_ffn_count(model) == 2
    ffn = ffn_modules(model)[0]
    x = torch.randn(1, 65, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    short = x[:, :64]
    with torch.no_grad(), sparse_enabled(model, False):
        dense, gate, long_dense = ffn(short), ffn.gate_proj(short), ffn(x)
        with check_tokens.float32_products(model):
            control, control_gate, long_control = ffn(short), ffn.gate_proj(short), ffn(x)
        after = ffn(short)
    if torch.equal(control_gate, gate) and torch.equal(control, dense):
        pytest.skip("this CPU's bf16 linear sums exactly as its float32 one: the control cannot differ here")
    assert not torch.equal(control, dense) and torch.equal(after, dense)
    assert torch.equal(long_control, long_dense)  # 65 tokens: a call the sparse decode would run dense
    # the same products, another rounding: the gate outputs agree within bf16's own tolerance
    torch.testing.assert_close(control_gate, gate)


def _row(prompt: str, first: int | None, control_first: int | None, near_tie: bool = False) -> dict:
    """A hand-made row of 64 new tokens: the sparse decode parts at `first`, the control at `control_first`."""
    def part(at):
        return {"identical": at is None, "first_difference": at, "matching_tokens": 64 if at is None else at}

    row = {"prompt": prompt, **part(first), "new_tokens": 64,
           "control": {**part(control_first), "near_tie": None if control_first is None else True}}
    if first is not None:
        row["at_difference"] = {"near_tie": near_tie}
    return row


@pytest.mark.parametrize("sparse_firsts,control_firsts,explained", [
    ((10, 30), (12, 28), True), ((14, 18), (12, 28), True), ((4, 6), (12, 28), False),
    ((60, None), (None, None), False)])
def test_the_control_explains_differences_that_come_no_earlier(check_tokens, sparse_firsts, control_firsts, explained):
    """Slack 6.4 tokens. The control parts at 12 and 28 (mean 20): a sparse mean of 20 or 16 is explained, one
    of 5 is not. A control identical to dense explains nothing, however close the sparse mean (62 of 64) comes.
    Unexplained, a difference above the tolerance exits 1."""
    import argparse

    from tiny_models import build_tiny_model

    args = argparse.Namespace(model="m", device="cpu", dtype="bfloat16", new_tokens=64, tolerance=0.5,
                              control=True, control_slack=6.4)
    rows = [_row("a", sparse_firsts[0], control_firsts[0]), _row("b", sparse_firsts[1], control_firsts[1], True)]
    result = check_tokens.summarize(args, build_tiny_model("llama", hidden_act="relu"), rows, converted=False)
    assert not result["ok"] and result["above_tolerance"] == ["a"]
    firsts = [[64 if at is None else at for at in pair] for pair in (sparse_firsts, control_firsts)]
    assert [result["mean_first_difference"], result["control_mean_first_difference"]] == [sum(f) / 2 for f in firsts]
    assert result["control_identical_prompts"] == control_firsts.count(None)
    assert result["control_min_matching_tokens"] == min(firsts[1])
    assert result["explained_by_summation_order"] is explained
    assert check_tokens.exit_status(result) == (0 if explained else 1)
    assert result["activation"] == "relu" and result["converted"] is False and result["sparse_ffns"] == 0


def test_check_tokens_keeps_an_existing_output(tmp_path, check_tokens, relu_checkpoint, capsys):
    """An output relufy did not write is never replaced, --force or not; the refusal is one line, exit 2."""
    output = tmp_path / "tokens.json"
    output.write_text("mine\n")
    code = check_tokens.main(["--model", str(relu_checkpoint), "--device", "cpu", "--dtype", "float32",
                              "--output", str(output), "--force"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and output.read_text() == "mine\n"
    assert len(err.splitlines()) == 1 and "relufy did not write" in err


def _greedy(check_tokens, tokens, logits):
    import torch

    return check_tokens.Greedy(tokens=torch.tensor(tokens), scores=torch.tensor(logits, dtype=torch.float32))


def test_compare_tells_a_near_tie_from_a_bug(check_tokens):
    dense = _greedy(check_tokens, [0, 1, 2], [[5.0, 1.0, 0.0], [0.0, 3.0, 2.9], [0.0, 0.0, 9.0]])
    near = _greedy(check_tokens, [0, 2, 1], [[5.0, 1.0, 0.0], [0.0, 2.95, 3.0], [0.0, 9.0, 0.0]])
    row = check_tokens.compare(dense, near, tolerance=0.5)
    assert not row["identical"] and row["first_difference"] == 1 and row["matching_tokens"] == 1
    at = row["at_difference"]
    assert at["near_tie"] and at["dense_gap"] == pytest.approx(0.1) and at["dense_top2_margin"] == pytest.approx(0.1)
    assert at["sparse_top2_margin"] == pytest.approx(0.05) and at["logit_difference"] == pytest.approx(0.1)
    assert row["min_margin"] == pytest.approx(0.1) and row["min_margin_position"] == 1
    wide = _greedy(check_tokens, [0, 0, 0], [[5.0, 1.0, 0.0], [9.0, 3.0, 2.9], [9.0, 0.0, 0.0]])
    at = check_tokens.compare(dense, wide, tolerance=0.5)["at_difference"]
    assert not at["near_tie"] and at["dense_gap"] == pytest.approx(3.0) and at["dense_top2_margin"] == pytest.approx(0.1)


def test_compare_of_identical_decodes_reports_the_closest_call(check_tokens):
    import torch

    dense = _greedy(check_tokens, [0, 1], [[2.0, 1.5, float("-inf")], [0.0, 4.0, float("-inf")]])
    sparse = _greedy(check_tokens, [0, 1], [[2.0, 1.25, float("-inf")], [0.0, 4.0, float("-inf")]])
    row = check_tokens.compare(dense, sparse, tolerance=0.5)
    assert row["identical"] and row["first_difference"] is None and row["matching_tokens"] == 2
    assert row["min_margin"] == pytest.approx(0.5) and row["min_margin_position"] == 0
    assert row["max_logit_difference"] == pytest.approx(0.25) and torch.isfinite(torch.tensor(row["max_logit_difference"]))
