"""`sparsify(model)`: the converted FFNs of every mapped architecture run through the sparse kernels.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1), slowly, so the models
are the tiny ones and generations are short; with RELUFY_TEST_CUDA=1 on a GPU the same tests
run natively. There eager calls run dense unless `SparseConfig.eager`, so the tests that check the
kernels in eager calls sparsify with `EAGER`.
"""

from __future__ import annotations

import logging
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from tiny_models import build_tiny_model  # noqa: E402

from relufy.activations import register_activations  # noqa: E402
from relufy.architectures import architecture_for  # noqa: E402
from relufy.architectures import ffn_modules  # noqa: E402
import relufy.sparse.ffn  # noqa: E402
from relufy.sparse import (SparseConfig, eager_runs_dense, sparse_eager, sparse_enabled, sparse_ffn_count,  # noqa: E402
                           sparse_ffns, sparsify, takes_kernels)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
EAGER = SparseConfig(eager=True)  # the kernels in eager CUDA calls too, as on the interpreter
CASES = [("llama", "relu"), ("phi3", "fatrelu_0.05"), ("gpt2", "relu"), ("gpt_neox", "relu2"),
         ("gemma", "shifted_relu_0.1"), ("falcon", "relu"), ("qwen3", "relu")]


def relu_model(model_type: str, activation: str):
    register_activations()  # fatrelu_<t> and shifted_relu_<b> are relufy's
    settings = architecture_for(model_type).with_activation({}, activation)
    return build_tiny_model(model_type, **settings).to(DEVICE)


@pytest.mark.parametrize("model_type,activation", CASES)
def test_greedy_generation_is_token_identical(model_type, activation):
    model = relu_model(model_type, activation)
    prompt = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert sparsify(model, EAGER) is model and sparse_ffn_count(model) == model.config.num_hidden_layers
    sparse = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert torch.equal(dense, sparse)


def record_sparse_calls(monkeypatch) -> list[int]:
    """The token count of every `relufy::sparse_ffn` call from now on, in order (the calls still run)."""
    calls = []
    original = torch.ops.relufy.sparse_ffn

    class Recorder:
        def __call__(self, x, *args):
            calls.append(x.shape[0])
            return original(x, *args)

    monkeypatch.setattr(torch.ops.relufy, "sparse_ffn", Recorder())
    return calls


def test_decode_calls_take_the_kernels_and_prefill_stays_dense(monkeypatch):
    model = sparsify(relu_model("llama", "relu"), SparseConfig(max_tokens=2, eager=True))
    calls = record_sparse_calls(monkeypatch)
    ffn = ffn_modules(model)[0]
    x = torch.randn(1, 2, model.config.hidden_size, device=DEVICE)
    sparse = ffn(x)
    with sparse_enabled(model, False):
        dense = ffn(x)
    ffn(torch.randn(1, 3, model.config.hidden_size, device=DEVICE))  # prefill-sized: dense
    assert calls == [2]
    assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6)


def test_weights_keep_their_shapes_and_memory_is_not_doubled():
    model = relu_model("llama", "relu")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    before = sum(p.numel() for p in model.parameters())
    sparsify(model)
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == shapes
    assert sum(p.untyped_storage().nbytes() for p in model.parameters()) == before * 4
    down = ffn_modules(model)[0].down_proj.weight
    assert down.t().is_contiguous()  # W_down^T row-major, seen through a transposed view


def test_sparsify_twice_changes_nothing_more():
    model = sparsify(relu_model("llama", "relu"))
    forwards = [ffn.forward for ffn in ffn_modules(model)]
    sparsify(model)
    assert [ffn.forward for ffn in ffn_modules(model)] == forwards


@pytest.fixture
def fresh_warnings():
    """`sparsify` warns once per process; earlier tests may have used that once."""
    import relufy.sparse.ffn

    relufy.sparse.ffn.warn_once.cache_clear()
    yield
    relufy.sparse.ffn.warn_once.cache_clear()


def test_eager_gpu_calls_take_the_dense_forward_unless_traced_captured_on_a_side_stream_or_opted_in(monkeypatch):
    """The dispatch decision alone, a GPU's answers mocked: compiled kernels (a GPU index) in an eager call on
    the default stream run dense; a torch.compile trace, a capture, a side stream (where a capture is warmed
    up) or `eager` run the kernels, and so does the interpreter (None). A traced call asks nothing more."""
    answers, asked = {"compiling": False, "capturing": False, "stream": 0}, []

    def answer(name):
        return lambda *args: asked.append(name) or answers[name]

    monkeypatch.setattr(torch.compiler, "is_compiling", answer("compiling"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", answer("capturing"))
    monkeypatch.setattr(relufy.sparse.ffn, "on_side_stream", lambda device: answer("stream")() != 0)
    assert not takes_kernels(0, eager=False)
    assert takes_kernels(None, eager=False) and takes_kernels(0, eager=True)
    for name, value in (("compiling", True), ("capturing", True), ("stream", 3)):
        before, answers[name] = answers[name], value
        assert takes_kernels(0, eager=False), name
        answers[name] = before
    asked.clear()
    answers["compiling"] = True
    assert takes_kernels(0, eager=False) and asked == ["compiling"]


def as_on_a_gpu(model, monkeypatch):
    """`model`'s sparse FFNs taken for compiled CUDA kernels of GPU 0, in eager calls on its default stream and
    no capture (the interpreter still runs the kernels on a CPU)."""
    for state in sparse_ffns(model):
        state.cuda_device = 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(relufy.sparse.ffn, "on_side_stream", lambda device: False)
    return model


def test_eager_gpu_calls_run_dense_with_one_note_and_opting_in_brings_the_kernels_back(monkeypatch, caplog,
                                                                                       fresh_warnings):
    """Through the FFN's forward: under the interpreter eager calls run the kernels as before; on a GPU they run
    the dense forward and say so once; `sparse_eager` and `SparseConfig.eager` run the kernels again."""
    model = sparsify(relu_model("llama", "relu"))
    assert eager_runs_dense(model) == (DEVICE == "cuda")
    assert all((state.cuda_device is None) == (DEVICE == "cpu") for state in sparse_ffns(model))
    calls = record_sparse_calls(monkeypatch)
    ffn = ffn_modules(model)[0]
    x = torch.randn(1, 1, model.config.hidden_size, device=DEVICE)
    ffn(x)
    assert calls == ([1] if DEVICE == "cpu" else [])
    calls.clear()
    as_on_a_gpu(model, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="relufy.sparse.ffn"):
        dense = [ffn(x), ffn(x)]
    assert calls == [] and eager_runs_dense(model)
    assert len([r for r in caplog.records if "SparseConfig(eager=True)" in r.getMessage()]) == 1
    with sparse_eager(model):
        assert not eager_runs_dense(model)
        sparse = ffn(x)
    assert calls == [1] and eager_runs_dense(model)  # back as sparsified after the block
    assert torch.allclose(sparse, dense[0], rtol=1e-5, atol=1e-6)
    opted_in = as_on_a_gpu(sparsify(relu_model("llama", "relu"), EAGER), monkeypatch)
    ffn_modules(opted_in)[0](x)
    assert calls == [1, 1] and not eager_runs_dense(opted_in)


def test_a_compiled_call_holds_the_sparse_operator_whole(monkeypatch):
    """torch.compile traces the kernels in where eager calls run dense: dynamo takes `is_compiling` for a
    constant, so one graph (fullgraph: no break) holds relufy::sparse_ffn and no check of the stream, and
    switching `eager` does not recompile it."""
    model = as_on_a_gpu(sparsify(relu_model("llama", "relu")), monkeypatch)
    ffn = ffn_modules(model)[0]
    graphs = []

    def backend(graph, inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(lambda x: ffn(x), backend=backend, fullgraph=True)
    x = torch.randn(1, 1, model.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        out = compiled(x)
        with sparse_eager(model):
            compiled(x)
        with sparse_enabled(model, False):
            dense = ffn(x)
    assert len(graphs) == 1 and "torch.ops.relufy.sparse_ffn" in graphs[0].code
    assert "capturing" not in graphs[0].code and "Stream" not in graphs[0].code
    assert torch.allclose(out, dense, rtol=1e-5, atol=1e-6)


def test_a_silu_model_is_left_alone_with_one_warning(caplog, fresh_warnings):
    model = build_tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="relufy.sparse.ffn"):
        sparsify(model)
        sparsify(model)
    assert sparse_ffn_count(model) == 0
    warnings = [r.getMessage() for r in caplog.records if "not a ReLU-family" in r.getMessage()]
    assert len(warnings) == 1 and "'silu'" in warnings[0]


def test_a_cpu_model_without_the_interpreter_is_left_alone(monkeypatch, caplog, fresh_warnings):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = build_tiny_model("llama", hidden_act="relu")
    with caplog.at_level(logging.WARNING, logger="relufy.sparse.ffn"):
        sparsify(model)
    assert sparse_ffn_count(model) == 0
    assert any("need CUDA" in r.getMessage() for r in caplog.records)


def test_a_cpu_model_on_a_cuda_machine_is_left_alone_when_the_kernels_are_compiled(monkeypatch, caplog,
                                                                                 fresh_warnings):
    """TRITON_INTERPRET=1 set after Triton compiled the kernels for the GPU does not make them take CPU
    tensors (a launch would fail in Triton's GPU launcher): the model stays dense, and no calibration runs."""
    import relufy.sparse.kernels.launch as launch
    from relufy.sparse import routing

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch, "interpreted", lambda: False)  # as on a GPU machine: compiled kernels

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated a CPU model")

    monkeypatch.setattr(routing, "calibrate", no_calibration)
    model = build_tiny_model("llama", hidden_act="relu")
    with caplog.at_level(logging.WARNING, logger="relufy.sparse.ffn"):
        sparsify(model)
    assert sparse_ffn_count(model) == 0
    assert any("need CUDA" in r.getMessage() for r in caplog.records)


def test_the_route_threshold_reaches_the_kernels_and_a_large_union_reads_every_row(monkeypatch, tmp_path):
    """By default `dense_above` is the routing's for each FFN's weights (calibrated and cached on CUDA, the
    default fraction of the neurons without it); a configured one is passed to the down kernel, which takes
    the dense route for a union above it and gives the dense FFN's result."""
    import relufy.sparse.kernels.launch as launch  # where the operator finds sparse_ffn
    from relufy.sparse import routing

    monkeypatch.setenv("RELUFY_CACHE", str(tmp_path))
    model = relu_model("llama", "relu")
    width = model.config.intermediate_size
    states = sparse_ffns(sparsify(relu_model("llama", "relu")))
    if DEVICE == "cpu":
        assert {state.dense_above for state in states} == {int(routing.DEFAULT_DENSE_FRACTION * width)}
    else:  # calibrated once for the shape, then read from the cache
        assert routing.cache_file().exists()
        assert [state.dense_above for state in states] == [
            routing.dense_above(state.w_first, state.w_up, state.w_down_t, SparseConfig().max_tokens) for state in states]
    sparsify(model, SparseConfig(dense_above=0, eager=True))
    routes = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    original = launch.sparse_ffn
    monkeypatch.setattr(launch, "sparse_ffn", lambda *args, **kwargs: original(*args, **kwargs, routes=routes))
    x = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ffn = ffn_modules(model)[0]
    sparse = ffn(x)
    with sparse_enabled(model, False):
        dense = ffn(x)
    assert routes.tolist() == [0, 1]
    assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6)


def test_the_calibrated_threshold_is_the_last_count_where_the_list_won():
    from relufy.sparse.routing import threshold_from

    def rows(*winners):
        return [{"count": 10 * (i + 1), "sparse_us": 1.0 if w == "list" else 2.0, "dense_us": 1.5}
                for i, w in enumerate(winners)]

    assert threshold_from(rows("list", "list", "dense", "list"), 100) == 20  # the first dense win decides
    assert threshold_from(rows("list", "list"), 100) == 100  # never dense
    assert threshold_from(rows("dense", "dense"), 100) == 9  # dense from the smallest count on


def test_calibration_times_both_routes_at_each_union():
    """On CPU the calibration runs plain calls (no CUDA graph), both routes at every union of UNIONS."""
    from relufy.sparse.routing import UNIONS, calibrate

    generator = torch.Generator().manual_seed(6)
    w_gate, w_up, w_down_t = (torch.randn(96, 64, generator=generator).to(DEVICE) / 8 for _ in range(3))
    result = calibrate(w_gate, w_up, w_down_t[:, :48].contiguous(), tokens=2, replays=1)
    assert [row["count"] for row in result["unions"]] == [round(f * 96) for f in UNIONS]
    assert all(row["sparse_us"] > 0 and row["dense_us"] > 0 for row in result["unions"])
    assert -1 <= result["dense_above"] <= 96


@pytest.mark.parametrize("activation,attribute", [("fatrelu_0.05", "threshold"), ("shifted_relu_0.1", "shift")])
def test_the_kernels_take_the_parameter_of_the_live_activation_module(activation, attribute):
    """The dense path runs the module; the kernels must compute with the same threshold or shift."""
    model = relu_model("llama", activation)
    sparsify(model)
    modules = [m for m in model.modules() if hasattr(m, attribute)]
    assert [state.act_param for state in sparse_ffns(model)] == [getattr(m, attribute) for m in modules]
    assert sparse_ffns(model)[0].act_param == float(activation.rpartition("_")[2])


def test_a_threshold_the_module_and_config_disagree_on_is_refused_and_nothing_changes():
    from relufy.errors import ActivationError

    model = relu_model("llama", "fatrelu_0.05")
    modules = [m for m in model.modules() if hasattr(m, "threshold")]
    modules[-1].threshold = 0.2  # calibrated in place, config not rewritten
    with pytest.raises(ActivationError, match=r"FFN 1's FATReLU has threshold 0.2 but the config says "
                                              r"'fatrelu_0.05'; set config.hidden_act = 'fatrelu_0.2'"):
        sparsify(model)
    assert sparse_ffn_count(model) == 0, "a refused model must be left entirely dense"


def test_per_layer_thresholds_reach_each_layers_kernels_and_generation_is_token_identical():
    """A checkpoint with one FATReLU threshold per layer (relufy convert --layer-thresholds): each FFN's kernels
    compute with its own layer's threshold, and a stale list is refused."""
    from relufy import per_layer
    from relufy.errors import ActivationError

    thresholds = [0.02, 0.1]
    model = relu_model("llama", "fatrelu_0.0")
    model.config.hidden_act, model.config.relufy_layer_thresholds = "fatrelu", list(thresholds)
    per_layer.apply(model, thresholds)
    prompt = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    model.config.relufy_layer_thresholds = [0.02, 0.2]
    with pytest.raises(ActivationError, match=r"FFN 1's FATReLU has threshold 0.1 but the config's "
                                              r"relufy_layer_thresholds says 0.2"):
        sparsify(model)
    model.config.relufy_layer_thresholds = list(thresholds)
    sparsify(model, EAGER)
    assert [state.act_param for state in sparse_ffns(model)] == thresholds
    sparse = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert torch.equal(dense, sparse)
