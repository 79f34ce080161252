"""`relufy speed`: the decode loop, its JSON, the CLI, and the speed section of reports and model cards.

On a CPU the loop runs its step eagerly and `sparsify` leaves the model alone (without Triton's
interpreter), so the dense and sparse runs must give the same tokens; the loop's tokens must also
be `generate`'s, which checks the static cache, the positions and the 4D mask. No timing is asserted.
"""

import json

import pytest
import torch
from tiny_models import build_tiny_model, save_tiny_model

# imported now, under conftest's TRITON_INTERPRET=1: Triton decides at import whether its own helpers (tl.sum...) are
# interpreted, and a fixture below imports triton with the interpreter off
pytest.importorskip("relufy.sparse.kernels")

from relufy.cli import build_parser, main  # noqa: E402
from relufy.publish import model_card  # noqa: E402
from relufy.report import evaluation_report  # noqa: E402
import relufy.sparse.ffn  # noqa: E402
from relufy.sparse import sparse_ffn_count, sparsify  # noqa: E402
from relufy.decode import DecodeLoop, random_prompts  # noqa: E402
from relufy.errors import DataError  # noqa: E402
from relufy.ffn_speed import ffn_inputs  # noqa: E402
from relufy.report import speed_table  # noqa: E402
from relufy.speed import SpeedConfig, measure_speed  # noqa: E402

TINY = dict(batch_sizes=(1, 2), prompt_tokens=8, new_tokens=6, generate_tokens=4, generate_repeats=2, warmup=2,
            ffn_repeats=2, copy_bytes=1 << 20, dtype="float32", device="cpu", union_batch_sizes=(1, 4))


@pytest.fixture(scope="module")
def speed_run():
    """measure_speed's result, and the JSON of each partial result it reported on the way."""
    updates = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")  # the kernel tests turn the interpreter on for the session
        model = sparsify(build_tiny_model("llama", hidden_act="relu"))
        assert sparse_ffn_count(model) == 0
        result = measure_speed(model, SpeedConfig(**TINY, profile_steps=2), progress=False,
                               on_update=lambda partial: updates.append(json.dumps(partial)))
    return result, [json.loads(update) for update in updates]


@pytest.fixture(scope="module")
def measured(speed_run):
    return speed_run[0]


def test_partial_results_are_reported_after_every_stage(speed_run):
    """A bench saves each partial result, so a run cut short keeps the batch sizes that finished."""
    result, updates = speed_run
    assert "copy_bandwidth_gb_per_s" in updates[0] and updates[0]["decode"] == []
    rows = [len(update["decode"]) for update in updates]
    assert rows == sorted(rows) and 1 in rows and rows[-1] == 2  # a batch size's row as soon as it is done
    assert "generate" not in updates[rows.index(1)]
    assert updates[-1] == json.loads(json.dumps(result))


def test_measure_speed_reports_every_section(measured):
    json.dumps(measured)  # plain JSON
    assert measured["gpu"] is None and measured["cuda_graph"] is False and measured["device"] == "cpu"
    assert {"torch", "transformers", "triton", "relufy"} <= set(measured["versions"])
    assert measured["config"]["batch_sizes"] == [1, 2] and measured["ffns"] == 2 and measured["sparse_ffns"] == 0
    assert [row["batch_size"] for row in measured["decode"]] == [1, 2]
    for row in measured["decode"]:  # nothing runs sparse here (no CUDA, no interpreter): no sparse arm
        assert row["dense_tokens_per_s"] > 0 and row["sparse_tokens_per_s"] is None and row["speedup"] is None
    assert "need CUDA" in measured["note"]
    assert measured["weight_bytes"] > 0 and measured["copy_bandwidth_gb_per_s"] > 0
    assert measured["bandwidth_limit_tokens_per_s"] > 0
    assert measured["dense_fraction_of_limit"] == measured["decode"][0]["dense_fraction_of_limit"]
    assert measured["generate"]["batch_size"] == 1 and measured["generate"]["new_tokens"] == 4
    assert measured["generate"]["speedup"] is None and measured["generate"]["repeats"] == 2
    assert all(ffn["sparse_us"] is None and ffn["dense_us"] > 0 for ffn in measured["ffn"])
    assert len(measured["sparsity"]["per_layer"]) == 2 and measured["sparsity"]["tokens"] == 6
    assert 0 < measured["sparsity"]["overall"] < 1  # a random ReLU model: about half of x1 is zero
    union = measured["union"]
    assert union["batch_sizes"] == [1, 4] and [len(union["per_layer"][b]) for b in ("1", "4")] == [2, 2]
    # batch 1's union is the active fraction; four tokens' union is larger
    assert union["overall"]["1"] == pytest.approx(1 - measured["sparsity"]["overall"], abs=0.1)
    assert union["overall"]["1"] < union["overall"]["4"] <= 1


def test_a_model_with_nothing_to_skip_reports_no_speedup(tmp_path, capsys):
    """A SiLU model has no exact zeros: `relufy speed` says so in one line, measures dense only and exits 0."""
    model = save_tiny_model("llama", tmp_path / "tiny-silu")
    out = tmp_path / "speed.json"
    assert main(["speed", str(model), "--output", str(out), "--device", "cpu", "--dtype", "float32",
                 "--batch-sizes", "1", "--prompt-tokens", "8", "--new-tokens", "4", "--generate-tokens", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["sparse_ffns"] == 0 and "'silu'" in result["note"] and "No speed-up" in result["note"]
    assert result["decode"][0]["speedup"] is None and result["generate"]["speedup"] is None
    printed = capsys.readouterr().out
    assert result["note"] in printed.splitlines() and "x |" not in printed


def as_on_a_gpu(model, monkeypatch):
    """On a CPU, `model`'s sparse FFNs taken for compiled CUDA kernels (eager calls on GPU 0's default stream,
    which run dense unless opted in) while the interpreter runs them; on CUDA, the model as it is."""
    from relufy.sparse import sparse_ffns

    if next(model.parameters()).device.type == "cpu":
        for state in sparse_ffns(model):
            state.cuda_device = 0
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        monkeypatch.setattr(relufy.sparse.ffn, "on_side_stream", lambda device: False)
    return model


def test_sparse_arms_are_measured_and_generate_alternates_repeats(monkeypatch):
    """With the kernels on (the interpreter on CPU, taken for a GPU's, compiled on CUDA), both arms run, the
    sparse one's eager calls through the kernels; generate runs each arm once to warm up, then
    `generate_repeats` times, dense, sparse as sparsified (eager calls dense) and with the kernels in eager
    calls alternated, and reports the median and range of each."""
    import relufy.speed as speed
    from relufy.sparse.kernels import interpreted

    device = "cpu" if interpreted() else "cuda"  # compiled kernels take CUDA tensors only
    if interpreted():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the speed_run fixture may have turned it off
    model = as_on_a_gpu(sparsify(build_tiny_model("llama", hidden_act="relu").to(device)), monkeypatch)
    assert sparse_ffn_count(model) == 2
    order = []
    rates = {"dense": iter([5.0, 1.0, 3.0, 2.0]), "sparse": iter([50.0, 10.0, 30.0, 20.0]),
             "eager_kernels": iter([4.0, 0.5, 1.5, 1.0])}

    def fake_generate(model, prompt, new_tokens):
        state = model.model.layers[0].mlp._relufy_sparse
        order.append("dense" if not state.enabled else "eager_kernels" if state.eager else "sparse")
        return next(rates[order[-1]])

    monkeypatch.setattr(speed, "generate_speed", fake_generate)
    config = dict(TINY, batch_sizes=(1,), new_tokens=3, warmup=1, generate_repeats=3, union_batch_sizes=(1,),
                  device=device, compile=False, profile_steps=2)
    result = measure_speed(model, SpeedConfig(**config), progress=False)
    assert order == ["dense", "sparse", "eager_kernels"] * 4
    _assert_the_profile_sees_the_sparse_operator(result, model)
    generate = result["generate"]
    assert (generate["dense_tokens_per_s"], generate["dense_min_tokens_per_s"], generate["dense_max_tokens_per_s"]) \
        == (2.0, 1.0, 3.0)
    assert generate["sparse_tokens_per_s"] == 20.0 and generate["speedup"] == 10.0  # the warm-up round is dropped
    assert generate["eager_ffns"] == "dense" and generate["eager_kernels_speedup"] == 0.5
    assert ("sparse 20.0 tok/s [10.0-30.0] (10.00x); eager calls run dense (SparseConfig.eager), with "
            "SparseConfig(eager=True) 1.0 tok/s [0.5-1.5] (0.50x).") in speed_table(result)
    assert result["note"] is None and result["decode"][0]["speedup"] > 0 and result["ffn"][0]["sparse_us"] > 0
    assert result["ffn"][0]["sparse_sequence_us"] > 0 and result["ffn"][0]["dense_sequence_us"] > 0
    # no GPU to share on CPU; on CUDA NVML sees this process's context (or cannot see any: None)
    processes = result["gpu_processes"]
    assert processes is None if device == "cpu" else processes is None or processes >= 1
    assert "[1.0-3.0]" in speed_table(result) and "in layer order as one sequence" in speed_table(result)
    assert result["decode"][0]["ffn_route"] == "sparse kernels" and "(both dense)" not in speed_table(result)
    assert speed.ffn_route(model, 9) == "dense (more than max_tokens = 8 tokens a call)"
    result["decode"][0]["ffn_route"] = speed.ffn_route(model, 9)
    assert "x (both dense) |" in speed_table(result)


def test_first_divergences_give_each_arms_margin_at_the_first_differing_step(monkeypatch):
    """A sequence whose sparse tokens leave the dense ones at step 3 is reported at step 3 only, with the
    dense model's margin for its own token (positive: it is that model's greedy choice) and the sparse
    model's for the other token (here the same model within float32 rounding, so the opposite number),
    from eager calls that run the kernels where a GPU's would run dense; sequences that never differ are
    not reported."""
    import functools

    from relufy.sparse import sparse_enabled
    from relufy.sparse.kernels import interpreted
    from relufy.speed import first_divergences

    device = "cpu" if interpreted() else "cuda"
    if interpreted():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the speed_run fixture may have turned it off
    model = as_on_a_gpu(sparsify(build_tiny_model("llama", hidden_act="relu").to(device)), monkeypatch)
    assert sparse_ffn_count(model) == 2
    prompts = random_prompts(model, 2, 8, 0, torch.device(device))
    dense = functools.partial(sparse_enabled, model, False)
    with dense():
        dense_tokens, _ = DecodeLoop(model, 2, 8, 5).decode_n_tokens(prompts, warmup=1)
    sparse_tokens = dense_tokens.clone()
    sparse_tokens[1, 3:] = (dense_tokens[1, 3:] + 1) % model.config.vocab_size
    calls, original = [], torch.ops.relufy.sparse_ffn
    monkeypatch.setattr(torch.ops.relufy, "sparse_ffn", lambda *args: calls.append(1) or original(*args))
    rows = first_divergences(model, prompts, dense_tokens, sparse_tokens, dense)
    assert len(calls) == (1 + 3) * 2  # the sparse margin's eager forwards (the 8-token prompt, 3 shared tokens)
    assert [(row["sequence"], row["step"]) for row in rows] == [(1, 3)]
    assert rows[0]["dense_token"] == dense_tokens[1, 3] and rows[0]["sparse_token"] == sparse_tokens[1, 3]
    assert rows[0]["dense_margin"] > 0
    assert rows[0]["sparse_margin"] == pytest.approx(-rows[0]["dense_margin"], abs=1e-4)
    assert first_divergences(model, prompts, dense_tokens, dense_tokens, dense) == []


def test_the_ffn_sequence_runs_every_ffn_once_per_timed_call_in_layer_order():
    """The sequence timing is the FFNs' share of a step: each FFN on its own input, layer 0 first."""
    from relufy.architectures import ffn_modules
    from relufy.ffn_speed import ffn_sequence_time

    model = build_tiny_model("llama", hidden_act="relu")
    ffns = ffn_modules(model)
    seen = []
    for index, ffn in enumerate(ffns):
        ffn.register_forward_pre_hook(lambda module, args, index=index: seen.append((index, args[0].sum().item())))
    inputs = [torch.full((1, 1, model.config.hidden_size), float(i + 1)) for i in range(len(ffns))]
    seconds = ffn_sequence_time(model, inputs, repeats=2, warmup=1)
    expected = [(i, float((i + 1) * model.config.hidden_size)) for i in range(len(ffns))]
    assert seconds > 0 and seen == expected * 2  # no warm-up call off CUDA (no graph to capture)


def test_a_compiled_step_is_matched_by_a_compiled_ffn_sequence(monkeypatch):
    """In a compiled step Inductor fuses the dense FFN's activation and product; the sequence timing then
    compiles too (here with the eager backend), else it would charge the dense arm the unfused kernels."""
    import contextlib

    from relufy.ffn_speed import compare_ffns

    compiled_with = []
    real_compile = torch.compile

    def recording_compile(fn, **options):
        compiled_with.append(options)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", recording_compile)
    model = build_tiny_model("llama", hidden_act="relu")
    prompts = random_prompts(model, 1, 8, 0, torch.device("cpu"))
    autotuned = {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}
    for options, expected in ((None, []), (autotuned, [autotuned])):
        compiled_with.clear()
        loop = DecodeLoop(model, 1, 8, 4)
        loop.compile_options = options  # what DecodeLoop sets on a GPU with compile on
        row = compare_ffns(loop, prompts, contextlib.nullcontext, sparse=False, repeats=2, warmup=1)
        assert compiled_with == expected and row["dense_sequence_us"] > 0


def test_the_compiled_ffn_sequence_keeps_every_ffn_when_unused_work_is_dropped(monkeypatch):
    """Inductor removes operations whose results nobody uses; a sequence that threw its outputs away
    timed an empty graph (10 us for 30 FFNs). Compiled through a backend that drops dead code the same
    way, every FFN's operations must survive."""
    from relufy.ffn_speed import ffn_sequence_time

    kept, traced = [], []

    def dead_code_dropping_backend(gm, example_inputs):
        operations = lambda: sum(node.op in ("call_function", "call_module", "call_method") for node in gm.graph.nodes)
        traced.append(operations())
        gm.graph.eliminate_dead_code()
        gm.recompile()
        kept.append(operations())
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, backend=dead_code_dropping_backend))
    torch._dynamo.reset()
    model = build_tiny_model("llama", hidden_act="relu")
    inputs = [torch.randn(1, 1, model.config.hidden_size) for _ in range(model.config.num_hidden_layers)]
    ffn_sequence_time(model, inputs, repeats=1, warmup=1, compile_options={"dynamic": False})
    # gate, up, activation, product and down for every layer
    assert traced and kept == traced and traced[0] >= 5 * model.config.num_hidden_layers


def _linears(model) -> int:
    return sum(isinstance(module, torch.nn.Linear) for module in model.modules())


def _assert_the_profile_sees_the_sparse_operator(result, model):
    """Both arms profiled; the sparse arm runs relufy's operator once per FFN and per step, and the difference
    table says so. On a CPU the operator is one CPU op in place of the FFN's three linears; on CUDA the
    profile holds kernels, and the operator's last is the down kernel (`down_kernel` or `up_down_kernel`)."""
    (profile,) = result["profile"]
    dense, sparse = ({row["name"]: row for row in profile[arm]["kernels"]} for arm in ("dense", "sparse"))
    if result["device"].startswith("cuda"):
        (operator,) = [name for name in sparse if "down_kernel" in name]
        assert not [name for name in dense if "down_kernel" in name]
    else:
        operator = "relufy::sparse_ffn"
        assert dense["aten::linear"]["count_per_step"] == _linears(model)
        assert sparse["aten::linear"]["count_per_step"] == _linears(model) - 3 * 2
    assert operator not in dense and sparse[operator]["count_per_step"] == 2
    diff = {row["name"]: row for row in profile["diff"]}
    assert diff.keys() == dense.keys() | sparse.keys()
    assert (diff[operator]["dense_count_per_step"], diff[operator]["sparse_count_per_step"]) == (0, 2)
    deltas = [abs(row["delta_us_per_step"]) for row in profile["diff"]]
    assert deltas == sorted(deltas, reverse=True)
    table = speed_table(result)
    assert "| sparse | " in table and "Kernels whose time per step differs most, batch 1" in table


def test_profile_counts_each_kernel_per_step(measured):
    """Without sparse FFNs only the dense arm is profiled, once per batch size; on a CPU its kernels are the
    CPU ops, each nn.Linear one aten::linear per step, and the step's times add up."""
    model = build_tiny_model("llama", hidden_act="relu")
    assert [entry["batch_size"] for entry in measured["profile"]] == [1, 2]
    for entry in measured["profile"]:
        assert entry["steps"] == 2 and entry["sparse"] is None and entry["diff"] is None
        dense = entry["dense"]
        assert dense["method"].startswith("eager steps on the CPU")
        counts = {row["name"]: row["count_per_step"] for row in dense["kernels"]}
        assert counts["aten::linear"] == _linears(model)
        assert dense["kernels_per_step"] == sum(counts.values())
        assert 0 < dense["busy_us_per_step"] <= dense["wall_us_per_step"]
        assert dense["idle_us_per_step"] == pytest.approx(dense["wall_us_per_step"] - dense["busy_us_per_step"])
        assert dense["kernel_us_per_step"] == pytest.approx(sum(row["us_per_step"] for row in dense["kernels"]))
        times = [row["us_per_step"] for row in dense["kernels"]]
        assert times == sorted(times, reverse=True)


def test_profile_tables_cut_long_kernel_names_but_the_json_keeps_them(measured):
    result = json.loads(json.dumps(measured))
    long_name = "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_" * 4
    result["profile"][0]["dense"]["kernels"][0]["name"] = long_name
    table = speed_table(result)
    assert "Profile of 2 decode steps per arm at batch 1" in table and "Top kernels, dense" in table
    assert long_name not in table and f"| {long_name[:61]}... |" in table
    assert "Kernels whose time per step differs most" not in table  # no sparse arm to compare with


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_decode_loop_tokens_are_generate_tokens(attention):
    """Static cache + explicit 4D mask (boolean for sdpa, additive for eager) + device-side argmax = generate."""
    model = build_tiny_model("llama", hidden_act="relu", seed=3)
    model.set_attn_implementation(attention)
    prompts = random_prompts(model, 3, 8, 1, torch.device("cpu"))
    with torch.no_grad():
        tokens, seconds = DecodeLoop(model, 3, 8, 10).decode_n_tokens(prompts)
        expected = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=11,
                                  do_sample=False, pad_token_id=0)[:, 8:]
    assert tokens.shape == (3, 11) and seconds > 0
    assert torch.equal(tokens, expected)


def test_ffn_inputs_are_one_decode_step_even_after_the_step_was_compiled():
    """The per-layer FFN timings run each FFN on the input of one decode step. Dynamo does not guard on
    module hooks, so a step compiled before the hooks were added would skip them, leaving the prompt's
    inputs (too many tokens for the sparse kernels: both timings would then be of the dense FFN)."""
    model = build_tiny_model("llama", hidden_act="relu")
    loop = DecodeLoop(model, 2, 8, 4)
    loop.decode_logits = torch.compile(loop.logits, backend="eager", dynamic=False)  # CUDA compiles; CPU may too
    prompts = random_prompts(model, 2, 8, 0, torch.device("cpu"))
    with torch.no_grad():
        loop.decode_n_tokens(prompts, warmup=1)  # compiles the step without hooks
        inputs = ffn_inputs(loop, prompts)
    assert [tuple(x.shape[:-1]) for x in inputs] == [(2, 1), (2, 1)]


def test_weights_bandwidth_counts_the_embedding_only_when_tied():
    untied = build_tiny_model("llama", hidden_act="relu")
    tied = build_tiny_model("llama", hidden_act="relu", tie_word_embeddings=True)
    from relufy.decode import weight_bytes

    every = sum(p.numel() * p.element_size() for p in untied.parameters())
    embedding = untied.get_input_embeddings().weight
    assert weight_bytes(untied) == every - embedding.numel() * embedding.element_size()
    assert weight_bytes(tied) == sum(p.numel() * p.element_size() for p in tied.parameters())


def test_speed_table_is_markdown_with_one_row_per_batch(measured):
    table = speed_table(measured)
    assert table.startswith(measured["note"] + "\n\n| batch | dense tok/s | sparse tok/s | sparse/dense |")
    assert "| layer | zeros (batch 1) | union, 1 tok | union, 4 tok |" in table
    assert "\n| 1 | " in table and "\n| 2 | " in table and "| n/a | n/a | n/a |" in table
    assert "HF generate (batch 1" in table and "Weights-bandwidth limit at batch 1" in table
    assert "eager decode steps (no CUDA)" in table
    assert "first differ" not in table  # no sparse arm, no divergence line
    assert "other process(es) held the GPU" not in table and "other process(es) held the GPU" in speed_table(
        {**measured, "gpu_processes": 3})


def test_speed_table_names_the_compile_mode_of_the_captured_step(measured):
    on_cuda = {**measured, "cuda_graph": True, "compiled": True}
    assert "one decode step (torch.compile) captured as a CUDA graph" in speed_table(on_cuda)
    autotuned = {**on_cuda, "config": {**measured["config"], "compile_mode": "max-autotune-no-cudagraphs"}}
    assert "(torch.compile, max-autotune-no-cudagraphs) captured" in speed_table(autotuned)


def test_speed_table_names_the_widest_first_divergence(measured):
    """The line a reader needs to judge `token_match`: the earliest step and the largest dense margin."""
    import copy

    result = copy.deepcopy(measured)
    result["decode"][0]["first_divergences"] = [{"sequence": 0, "step": 7, "dense_token": 1, "sparse_token": 2,
                                                 "dense_margin": 0.0625, "sparse_margin": 0.01}]
    result["decode"][1]["first_divergences"] = [{"sequence": 1, "step": 4, "dense_token": 3, "sparse_token": 5,
                                                 "dense_margin": 2.5, "sparse_margin": 1.5}]
    table = speed_table(result)
    assert "(2 sequences): at decode step 4 at the earliest" in table
    assert "at most 2.5 (batch 2, sequence 1, step 4)" in table


def test_cli_writes_speed_json_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = save_tiny_model("llama", tmp_path / "tiny-relu", hidden_act="relu")
    out = tmp_path / "speed.json"
    args = ["speed", str(model), "--output", str(out), "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1",
            "--prompt-tokens", "8", "--new-tokens", "4", "--generate-tokens", "2"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["model"] == str(model.resolve()) and result["decode"][0]["dense_tokens_per_s"] > 0
    from relufy.checkpoint import Source, model_identity

    assert result["identity"] == model_identity(Source(model.resolve()), "relu")  # what publish --speed checks
    assert "| batch | dense tok/s" in capsys.readouterr().out
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relufy speed: error:") and "--force" in err and "\n" not in err
    assert main(args + ["--force"]) == 0


def test_cli_reports_bad_batch_sizes_in_one_line(tmp_path, capsys):
    model = str(tmp_path / "model")
    assert main(["speed", model, "--output", str(tmp_path / "s.json"), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    assert main(["speed", model, "--output", str(tmp_path / "s.json"), "--batch-sizes", "0"]) == 2
    assert "--batch-sizes (each) must be an integer from 1 to 65536, got 0" in capsys.readouterr().err


def test_cli_refuses_more_profile_steps_than_the_cache_holds(tmp_path, capsys):
    model = str(tmp_path / "model")
    args = ["speed", model, "--output", str(tmp_path / "s.json"), "--new-tokens", "4"]
    assert main(args + ["--profile-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "profile-steps (5) must not exceed new-tokens (4)" in err and "\n" not in err.strip()
    assert build_parser().parse_args(["speed", model, "-o", "s.json", "--profile_steps", "3"]).profile_steps == 3


def test_cli_takes_only_compile_modes_without_inductors_own_cuda_graphs(tmp_path, capsys):
    """The loop captures its step as a CUDA graph; a mode that adds Inductor's graphs inside it is refused."""
    model = str(tmp_path / "model")
    args = ["speed", model, "--output", str(tmp_path / "s.json"), "--compile-mode"]
    assert build_parser().parse_args(args + ["max-autotune-no-cudagraphs"]).compile_mode == "max-autotune-no-cudagraphs"
    with pytest.raises(SystemExit) as refused:
        main(args + ["reduce-overhead"])
    assert refused.value.code == 2 and "invalid choice: 'reduce-overhead'" in capsys.readouterr().err
    with pytest.raises(DataError, match="--compile-mode 'max-autotune' is not one of"):
        SpeedConfig(compile_mode="max-autotune")


def test_evaluate_has_a_no_speed_flag():
    assert build_parser().parse_args(["evaluate", "m", "-o", "out", "--no-speed"]).speed is False
    assert build_parser().parse_args(["evaluate", "m", "-o", "out"]).speed is True


def test_report_and_model_card_show_the_speed_section(measured):
    results = {"model": "/x/tiny-relu", "model_name": "tiny-relu", "activation": "relu", "relufy_version": "0",
               "lm_eval": {"results": {}},
               "sparsity": {"overall": 0.5, "per_layer": [0.5], "per_task": {}, "tokens": 8},
               "speed": measured}
    assert "## Decode speed" in evaluation_report(results)
    card = model_card(results, {"model_type": "llama", "hidden_act": "relu"}, repo_id="me/tiny-relu", base_model=None,
                      license_id="mit", remote_code=False)
    assert "### Decode speed" in card and "| batch | dense tok/s | sparse tok/s" in card
    del results["speed"]
    assert "Decode speed" not in evaluation_report(results)


class _FakeNVML:
    """NVML as `nvidia-ml-py` exposes it, holding `pids` on the one GPU whose UUID it knows."""

    class NVMLError(Exception):
        pass

    def __init__(self, pids, uuid="GPU-1234"):
        self.pids, self.uuid = pids, uuid

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != self.uuid:
            raise self.NVMLError(f"no GPU {uuid}")
        return uuid

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [type("Process", (), {"pid": pid})() for pid in self.pids]


def test_the_fake_nvml_calls_only_what_nvidia_ml_py_has():
    """The fake below stands in for `pynvml` from nvidia-ml-py: every call it answers must exist in the
    real module, or the tests pass while the real call raises AttributeError on a GPU machine."""
    pynvml = pytest.importorskip("pynvml")
    called = [name for name in vars(_FakeNVML) if name.startswith("nvml")]
    assert called and [name for name in called if not hasattr(pynvml, name)] == []


def test_gpu_processes_counts_every_context_on_the_gpu_from_nvml(monkeypatch, caplog):
    """Two processes on the GPU (this one and another) are counted and warned about; one is silent;
    without NVML, or off CUDA, the count is unknown (None), never a guess."""
    import sys
    import types

    from relufy.timing import gpu_processes, most_processes, warn_if_shared

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(uuid="1234"))
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML([11, 22]))
    assert gpu_processes(cuda) == 2 and gpu_processes(torch.device("cpu")) is None
    with caplog.at_level("WARNING", logger="relufy.timing"):
        warn_if_shared(cuda, 2)
        warn_if_shared(cuda, 1)
        warn_if_shared(cuda, None)
    assert len(caplog.records) == 1 and "1 other process(es)" in caplog.records[0].getMessage()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(uuid="9999"))
    assert gpu_processes(cuda) is None  # NVML does not know this GPU
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML([], uuid="GPU-9999"))
    assert gpu_processes(cuda) is None  # not even this process is visible (a container's PID namespace)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert gpu_processes(cuda) is None
    assert most_processes(1, 3) == 3 and most_processes(None, 2) == 2 and most_processes(None, None) is None
