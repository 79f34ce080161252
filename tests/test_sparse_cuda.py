"""What only a GPU can show: the sparse kernels inside CUDA graphs and under torch.compile, and eager calls
of a sparsified model running dense unless it opts in (`relufy.sparse.takes_kernels`).

Skipped without CUDA; run on a GPU machine with `RELUFY_TEST_CUDA=1 pytest tests/test_sparse_cuda.py`.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tiny_models import build_tiny_model  # noqa: E402

from relufy.architectures import ffn_modules  # noqa: E402
from relufy.sparse import eager_runs_dense, sparse_eager, sparse_enabled, sparsify  # noqa: E402
from relufy.sparse.kernels import RELU, choose_tiles, sparse_ffn  # noqa: E402


@pytest.mark.parametrize("dependent", [False, True])
def test_a_captured_graph_replays_new_inputs(dependent):
    """Fixed grids and a device-side count: one capture serves inputs with any set of active neurons, with
    the second kernel launched plainly or as the first's programmatic dependent (`dependent_launch`,
    captured as a programmatic edge of the graph).

    The down projection adds its split-K partial sums with fp32 atomics in whatever order the programs
    finish, so a replay and an eager call agree to rounding, not bit for bit."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    w_gate, w_up, w_down_t = (torch.randn(2048, 512, generator=generator, device="cuda").bfloat16() / 20
                              for _ in range(3))
    x = torch.randn(4, 512, generator=generator, device="cuda").bfloat16()
    tiles = dataclasses.replace(choose_tiles(4, 2048, 512, x.device), dependent_launch=dependent)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sparse_ffn(x, w_gate, w_up, w_down_t, RELU, tiles=tiles)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sparse_ffn(x, w_gate, w_up, w_down_t, RELU, tiles=tiles)
    previous = captured.clone()
    for _ in range(3):
        x.copy_(torch.randn(4, 512, generator=generator, device="cuda"))
        graph.replay()
        assert not torch.equal(captured, previous)  # the replay computed the new input, not the captured one
        torch.testing.assert_close(captured, sparse_ffn(x, w_gate, w_up, w_down_t, RELU), rtol=2e-2, atol=2e-2)
        previous = captured.clone()


@pytest.mark.parametrize("batch", [1, 4])
def test_dependent_launches_in_a_graph_of_chained_ffns_match_plain_launches(batch):
    """Eight FFN calls in a row at the Llama-2-7B width, each one's output the next one's input, captured
    once with dependent launches (`dependent_launch`) and replayed: a second kernel that read the count,
    the list or x1 before its first kernel had finished would give other outputs than the plain launches.
    Each output is scaled to unit RMS for the next layer, so eight layers neither vanish nor overflow.

    Each layer is checked against a plain launch on the input the replay gave it, not the chain's end
    against a plain chain: the down kernel adds its fp32 partial sums in arrival order, so two correct
    calls round a few bf16 outputs an ulp apart (relative error ~1e-5 to 1e-4), and eight random bf16
    layers grow one such flip into 0.5% to 4% (two plain chains differ by about 2.5%). A layer that lost
    one active neuron of thousands would typically be 0.5% off, one chunk of the list several percent."""
    generator = torch.Generator(device="cuda").manual_seed(batch)
    layers = [tuple(torch.randn(11008, 4096, generator=generator, device="cuda").bfloat16() / 64 for _ in range(3))
              for _ in range(8)]
    x = torch.randn(batch, 4096, generator=generator, device="cuda").bfloat16()
    tiles = choose_tiles(batch, 11008, 4096, x.device)
    dependent, plain_tiles = (dataclasses.replace(tiles, dependent_launch=flag) for flag in (True, False))

    def chain(inputs):
        """Each layer's input and output, in order."""
        steps = []
        for w_gate, w_up, w_down_t in layers:
            out = sparse_ffn(inputs, w_gate, w_up, w_down_t, RELU, tiles=dependent)
            steps.append((inputs, out))
            out = out.float()
            inputs = (out / out.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)).bfloat16()
        return steps

    chain(x)  # compiles the dependent variant before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps = chain(x)
    for _ in range(5):
        x.copy_(torch.randn(batch, 4096, generator=generator, device="cuda"))
        graph.replay()
        for (inputs, captured), (w_gate, w_up, w_down_t) in zip(steps, layers):
            plain = sparse_ffn(inputs, w_gate, w_up, w_down_t, RELU, tiles=plain_tiles).float()
            assert torch.isfinite(plain).all() and plain.abs().max() > 0
            assert (captured.float() - plain).norm() <= 2e-3 * plain.norm()


def _tiny_relu_llama():
    """float32: a random model's logits are nearly tied, and bf16 rounding differences between two
    correct FFNs would flip its argmax; float32 keeps dense and sparse within 1e-6."""
    model = build_tiny_model("llama", hidden_act="relu", hidden_size=256, intermediate_size=1024,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return model.to("cuda")


def _sparse_kernels_ran(run) -> bool:
    """Whether `run()` launched one of the sparse FFN's Triton kernels (CUPTI records the kernels of a CUDA
    graph's replay one by one too)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        run()
        torch.cuda.synchronize()
    return any(name in event.name for event in profiler.events()
               for name in ("first_projection_kernel", "up_down_kernel"))


def test_generate_with_a_static_cache_compiled_by_transformers_matches_dense():
    """A static cache makes `generate` compile the forward itself (CUDA graphs included) and mark each
    step, so the sparse operator runs inside transformers' own compiled decode, although eager calls of
    the model run dense. (Wrapping the forward in torch.compile(mode="reduce-overhead") by hand breaks
    dense models too: generate's cache writes then touch graph outputs that the next replay overwrites.)"""
    model = _tiny_relu_llama()
    prompt = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(0)).cuda()
    settings = dict(max_new_tokens=16, do_sample=False, cache_implementation="static")
    dense = model.generate(prompt, **settings)
    sparsify(model)
    assert eager_runs_dense(model)
    sparse = model.generate(prompt, **settings)  # compiles and captures
    assert torch.equal(dense, sparse)
    again = []
    assert _sparse_kernels_ran(lambda: again.append(model.generate(prompt, **settings)))
    assert torch.equal(again[0], dense)
    with sparse_enabled(model, False):
        assert torch.equal(model.generate(prompt, **settings), dense)


def test_eager_generate_runs_dense_unless_opted_in():
    """Eager `generate` (default cache, no compile) is host-bound, so the sparsified model's eager calls run
    the dense forward by default: no sparse kernel, the dense tokens. Inside `sparse_eager`, or sparsified
    with SparseConfig(eager=True), the same calls run the kernels and give the same tokens (float32)."""
    from relufy.sparse import SparseConfig

    model = _tiny_relu_llama()
    prompt = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(1)).cuda()
    settings = dict(max_new_tokens=8, do_sample=False)
    dense = model.generate(prompt, **settings)

    def same_tokens():
        assert torch.equal(model.generate(prompt, **settings), dense)

    sparsify(model)
    assert not _sparse_kernels_ran(same_tokens)
    with sparse_eager(model):
        assert _sparse_kernels_ran(same_tokens)
    model = sparsify(_tiny_relu_llama(), SparseConfig(eager=True))
    assert not eager_runs_dense(model) and _sparse_kernels_ran(same_tokens)


def test_a_graph_captured_by_hand_after_side_stream_warm_ups_holds_the_kernels():
    """PyTorch's capture recipe (`relufy.timing.capture`): eager warm-ups on a side stream, then the capture.
    The warm-ups run the kernels too (a side stream), so Triton has loaded them before the capture, which
    forbids loading a module; the replay launches them and matches the dense FFN."""
    from relufy.timing import capture

    model = sparsify(_tiny_relu_llama())
    ffn = ffn_modules(model)[0]
    x = torch.randn(1, 1, model.config.hidden_size, device="cuda")
    out = []
    with torch.no_grad():
        assert not _sparse_kernels_ran(lambda: ffn(x))  # an eager call on the default stream
        with torch.cuda.stream(torch.cuda.Stream()):
            assert _sparse_kernels_ran(lambda: ffn(x))  # on a side stream, as a capture's warm-up
        graph = capture(lambda: out.append(ffn(x)), warmup=2)
        assert _sparse_kernels_ran(graph.replay)
        with sparse_enabled(model, False):
            dense = ffn(x)
    torch.testing.assert_close(out[-1], dense, rtol=1e-5, atol=1e-5)


def _llama2_7b_ffn(generator):
    """Random bf16 W_gate, W_up, W_down of the Llama-2-7B FFN (4096 x 11008) on CUDA, and W_down^T row-major."""
    w_gate, w_up, w_down = (torch.randn(*shape, generator=generator, device="cuda").bfloat16() * 0.02
                            for shape in [(11008, 4096), (11008, 4096), (4096, 11008)])
    return w_gate, w_up, w_down, w_down.t().contiguous()


@pytest.mark.parametrize("batch", [2, 4, 8])
def test_many_programs_per_column_block_sum_every_share(batch):
    """On a real FFN width the down kernel splits each column block over dozens of programs whose fp32
    adds the last one collects; every call must hold every share (a finisher that read the sums with a
    plain load missed some in about half of the 4-token calls on an H200)."""
    generator = torch.Generator(device="cuda").manual_seed(batch)
    w_gate, w_up, w_down, w_down_t = _llama2_7b_ffn(generator)
    for _ in range(10):
        x = torch.randn(batch, 4096, generator=generator, device="cuda").bfloat16()
        dense = ((torch.relu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()).float()
        sparse = sparse_ffn(x, w_gate, w_up, w_down_t, RELU).float()
        assert (sparse - dense).abs().max() <= 1e-2 * dense.abs().max()


@pytest.mark.parametrize("batch, first_per_sm, stages", [(1, 5, 3), (1, 1, 4), (1, 2, 1), (4, 2, 3)])
def test_the_persistent_first_kernel_at_a_real_width(batch, first_per_sm, stages):
    """The persistent first kernel compiled, its gate tiles copied to shared memory ahead of use and across
    row blocks (what the interpreter does not model), at the Llama-2-7B width with this GPU's tiles, against
    a dense FFN and against one program per row block."""
    from relufy.sparse.kernels import device_row, family_and_multiprocessors, row_tiles

    device = torch.device("cuda")
    _, multiprocessors = family_and_multiprocessors(device)
    row = {**device_row(batch, 4096, device), "first_per_sm": first_per_sm, "stages": stages}
    tiles = row_tiles(row, batch, 4096, multiprocessors)
    assert tiles.first_programs == first_per_sm * multiprocessors
    generator = torch.Generator(device="cuda").manual_seed(batch)
    w_gate, w_up, w_down, w_down_t = _llama2_7b_ffn(generator)
    for _ in range(3):
        x = torch.randn(batch, 4096, generator=generator, device="cuda").bfloat16()
        dense = ((torch.relu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()).float()
        sparse = sparse_ffn(x, w_gate, w_up, w_down_t, RELU, tiles=tiles).float()
        per_block = sparse_ffn(x, w_gate, w_up, w_down_t, RELU, tiles=row_tiles({**row, "first_per_sm": 0}, batch,
                                                                              4096, multiprocessors)).float()
        # bf16 outputs: the down kernel's sums in list order, which differs between launches, may round apart
        assert (sparse - dense).abs().max() <= 1e-2 * dense.abs().max()
        assert (sparse - per_block).abs().max() <= 1e-2 * per_block.abs().max()
