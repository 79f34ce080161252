"""End-to-end decode speed, dense against sparse, in a decode loop relufy controls.

HF `generate` spends more host time per token than a sparse FFN saves, so its number hides the
FFN savings. Like gpt-fast, relufy measures decode in its own loop: a static KV cache, and one
decode step (forward, greedy argmax, next token and position written back on the device)
captured as a CUDA graph and replayed once per new token. The dense and the sparse FFNs run in
that same loop, in one process, on the same prompts; the greedy tokens of both runs are compared.

Next to it, so the number can be judged: the weights-bandwidth limit (bytes of the weights read
per step / the copy bandwidth measured in the same run), HF `generate`'s tokens/s (what HF users
see), each FFN timed alone, and the zero-ratio of x1 the model reaches during decode.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import statistics
import time
from dataclasses import asdict, replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from . import __version__
from .errors import DataError
from .options import SpeedConfig
from .probe import SparsityProbe, down_projections, ffn_modules

CPU_COPY_BYTES = 64 << 20  # the copy-bandwidth probe on a CPU stays small
# cuDNN attention, PyTorch's first choice for masked bf16 attention on Hopper, gave different tokens
# from one run of the same decode to the next on an H200 (eagerly too); with the other backends
# repeated runs are bit-identical, which the dense/sparse token comparison needs.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Timer:
    """Seconds of device work in a `with` block: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = float("nan")

    def __enter__(self) -> "Timer":
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def capture(fn, warmup: int) -> torch.cuda.CUDAGraph:
    """`fn` captured as a CUDA graph, after `warmup` eager calls on a side stream (as PyTorch's docs require,
    so lazy initialisations and allocator warm-up happen outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.24 (`past_key_values` before,
    kept there as a deprecated alias)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class DecodeLoop:
    """Greedy decode of `batch_size` prompts with every tensor the step touches allocated once.

    The step reads the next input token, its position and a 4D attention mask computed on the device
    from that position, and writes the argmax back into the input buffer and into `tokens` at a
    device-side step counter: nothing in it depends on host values, so a CUDA graph of one step is
    the whole decode. A 4D mask is returned as-is by transformers' mask builder, which skips its
    data-dependent Python paths. The cache's own write index (`cumulative_length`) is a device tensor
    in transformers >= 5.17 and advances in step with `position`.
    """

    def __init__(self, model, batch_size: int, prompt_tokens: int, new_tokens: int, compile: bool = False):
        from transformers import StaticCache

        self.model, self.new_tokens = model, new_tokens
        self.device = next(model.parameters()).device
        length = prompt_tokens + new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        short = [layer.max_cache_len for layer in self.cache.layers if layer.max_cache_len < length]
        if short:
            raise DataError(f"the model's sliding-window layers keep {min(short)} tokens, fewer than prompt + new "
                            f"tokens ({length}); lower --prompt-tokens/--new-tokens")
        self.kwargs = {cache_kwarg(model): self.cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self.kwargs["logits_to_keep"] = 1
        self.mask_values = _mask_values(model, self.device)
        make = functools.partial(torch.zeros, dtype=torch.long, device=self.device)
        self.token, self.position = make(batch_size, 1), make(batch_size, 1)
        self.step_index, self.tokens = make(1), make(batch_size, new_tokens + 1)
        self.key_positions = torch.arange(length, device=self.device).view(1, 1, 1, length)
        # compiled without Inductor's own CUDA graphs: the captured step is the only graph
        compile = compile and self.device.type == "cuda"
        self.decode_logits = torch.compile(self.logits, dynamic=False) if compile else self.logits

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, **self.kwargs)
        return out.logits[:, -1]

    def prefill(self, prompt: torch.Tensor) -> None:
        """Empty the cache, run the prompt eagerly, and set the buffers for the first decode step."""
        self.cache.reset()
        batch, length = prompt.shape
        positions = torch.arange(length, device=self.device).expand(batch, length)
        with sdpa_kernel(ATTENTION_BACKENDS):
            first = self.logits(prompt, positions, None).argmax(-1)
        self.token.copy_(first[:, None])
        self.tokens.zero_()
        self.tokens[:, 0] = first
        self.position.fill_(length)
        self.step_index.fill_(1)

    def step(self, eager: bool = False) -> None:
        """One greedy decode step, entirely on the device; `eager` bypasses torch.compile, so module hooks
        registered after the compilation run (Dynamo does not guard on hooks and would reuse the graph)."""
        mask = self.key_positions <= self.position.view(-1, 1, 1, 1)
        if self.mask_values is not None:  # eager attention adds the mask: 0 where allowed, dtype min elsewhere
            mask = torch.where(mask, *self.mask_values)
        logits = self.logits if eager else self.decode_logits
        with sdpa_kernel(ATTENTION_BACKENDS):
            next_token = logits(self.token, self.position, mask).argmax(-1)
        self.token.copy_(next_token[:, None])
        self.tokens.index_copy_(1, self.step_index, next_token[:, None])
        self.position.add_(1)
        self.step_index.add_(1)

    def run(self, prompt: torch.Tensor, warmup: int = 3) -> tuple[torch.Tensor, float]:
        """(tokens [batch, new_tokens + 1] on the CPU, seconds of the `new_tokens` decode steps).

        On CUDA the step is captured as a graph and replayed; the warm-up steps advanced the cache,
        so the prompt is prefilled again before the timed replays. Elsewhere the step runs eagerly.
        """
        self.prefill(prompt)
        graph = None
        if self.device.type == "cuda":
            graph = capture(self.step, warmup)
            self.prefill(prompt)
        run = graph.replay if graph is not None else self.step
        with Timer(self.device) as timer:
            for _ in range(self.new_tokens):
                run()
        return self.tokens.cpu(), timer.seconds


def _mask_values(model, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """None for a boolean mask (sdpa); (0, dtype min) for an additive one (eager attention)."""
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation == "sdpa":
        return None
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        return (torch.zeros((), dtype=dtype, device=device),
                torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device))
    raise DataError(f"the decode loop passes an explicit attention mask, which needs attn_implementation 'sdpa' "
                    f"or 'eager'; this model uses '{implementation}'")


def random_prompts(model, config: SpeedConfig, device: torch.device) -> torch.Tensor:
    """Seeded random token ids, [max batch, prompt_tokens]; batch b uses the first b rows."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(0, vocab, (max(config.batch_sizes), config.prompt_tokens), generator=generator)
    return ids.to(device)


def weight_bytes(model) -> int:
    """Bytes of every parameter, counted once, that a decode step reads.

    The input embedding table is left out (a step reads one row of it) unless it is tied to the
    lm_head, which reads all of it."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen or (parameter is embedding and not tied):
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    return total


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second moved by a large copy on `device`, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes, repeats = min(nbytes, CPU_COPY_BYTES), 3
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    with Timer(device) as timer:
        for _ in range(repeats):
            target.copy_(source)
    return 2 * nbytes * repeats / timer.seconds


def generate_speed(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Tokens/s of one plain `model.generate` (greedy, default cache, prefill included); warm it up first."""
    device = prompt.device
    settings = model.generation_config
    pad = settings.pad_token_id if settings.pad_token_id is not None else settings.eos_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=pad)
    with Timer(device) as timer:  # min_new_tokens: an early EOS must not shorten the timed run
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return (out.shape[1] - prompt.shape[1]) * prompt.shape[0] / timer.seconds


def ffn_inputs(loop: DecodeLoop, prompt: torch.Tensor) -> list[torch.Tensor]:
    """The input hidden state of every FFN at the first decode step after `prompt`."""
    ffns = ffn_modules(loop.model)
    inputs: list[torch.Tensor | None] = [None] * len(ffns)

    def keep(index):
        return lambda module, args: inputs.__setitem__(index, args[0].detach().clone())

    handles = [ffn.register_forward_pre_hook(keep(i)) for i, ffn in enumerate(ffns)]
    try:
        loop.prefill(prompt)
        loop.step(eager=True)  # a compiled step would skip the hooks and leave the prompt's inputs here
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def ffn_times(model, inputs: list[torch.Tensor], config: SpeedConfig) -> list[float]:
    """Median seconds of each FFN module alone on its decode input (CUDA-graph replays on a GPU)."""
    device = inputs[0].device
    repeats = config.ffn_repeats if device.type == "cuda" else min(config.ffn_repeats, 3)
    times = []
    for ffn, x in zip(ffn_modules(model), inputs):
        call = functools.partial(ffn, x)
        run = capture(call, config.warmup).replay if device.type == "cuda" else call
        samples = []
        for _ in range(repeats):
            with Timer(device) as timer:
                run()
            samples.append(timer.seconds)
        times.append(statistics.median(samples))
    return times


def no_sparse_note(reason: str | None) -> str:
    """The one line `relufy speed` prints for a model without sparse FFNs."""
    why = reason or "sparsify was not called on this model"
    for boilerplate in ("relufy.sparse: ", ". The model runs dense", "; the model runs dense"):
        why = why.replace(boilerplate, "")
    return f"No FFN runs sparse: {why}. No speed-up is reported; dense numbers only."


def decode_unions(model, config: SpeedConfig, device: torch.device) -> dict:
    """Per layer, the fraction of FFN neurons active for at least one token of the batch, averaged over
    eager decode steps, at each of `config.union_batch_sizes`: the rows the sparse kernels must read."""
    steps = min(config.new_tokens, 32)
    modules = down_projections(model)
    batches = config.union_batch_sizes
    prompts = random_prompts(model, replace(config, batch_sizes=batches), device)
    result = {"steps": steps, "batch_sizes": list(batches), "per_layer": {}, "overall": {}}
    for batch in batches:
        totals = [torch.zeros((), device=device) for _ in modules]

        def count(index):
            def hook(module, args):
                x1 = args[0].reshape(-1, args[0].shape[-1])
                totals[index].add_((x1 != 0).any(0).float().mean())
            return hook

        handles = [module.register_forward_pre_hook(count(i)) for i, module in enumerate(modules)]
        try:
            loop = DecodeLoop(model, batch, config.prompt_tokens, steps)
            loop.prefill(prompts[:batch])
            for total in totals:
                total.zero_()  # the prompt is not counted
            for _ in range(steps):
                loop.step(eager=True)
        finally:
            for handle in handles:
                handle.remove()
        per_layer = [float(total) / steps for total in totals]
        result["per_layer"][str(batch)] = per_layer
        result["overall"][str(batch)] = statistics.mean(per_layer) if per_layer else float("nan")
    return result


def decode_sparsity(loop: DecodeLoop, prompt: torch.Tensor) -> dict:
    """Zero-ratio of x1 over the decode steps only (eager, the prompt not counted)."""
    loop.prefill(prompt)
    with SparsityProbe(loop.model) as probe:
        for _ in range(loop.new_tokens):
            loop.step()
    return probe.summary()


def environment(device: torch.device) -> dict:
    """GPU name and library versions, so a number can be traced to what produced it."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"gpu": gpu, "device": str(device), "versions": {"torch": torch.__version__, "transformers":
            transformers.__version__, "triton": triton_version, "relufy": __version__}}


@torch.no_grad()
def measure_speed(model, config: SpeedConfig | None = None, progress: bool = True) -> dict:
    """Decode speed of `model` (sparsified or not) dense against sparse, with the context to judge it.

    Every batch size decodes the same seeded prompts twice in one loop: with the sparse FFNs turned
    off (`sparse_enabled(model, False)`) and on. The JSON fields are described in docs/inference.md.
    """
    from .sparse import sparse_enabled, sparse_ffn_count, why_dense

    config = config or SpeedConfig()
    config.check()
    model.eval()
    device = next(model.parameters()).device
    _check_length(model, config)
    prompts = random_prompts(model, config, device)
    dense = functools.partial(sparse_enabled, model, False)
    sparse = sparse_ffn_count(model) > 0
    bar = tqdm(total=(3 if sparse else 2) * len(config.batch_sizes) + 4, desc="relufy speed", unit="run", disable=not progress)

    @contextlib.contextmanager
    def stage(label: str):
        bar.set_description(f"relufy speed: {label}")
        yield
        bar.update(1)

    result = {**environment(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "attention": getattr(model.config, "_attn_implementation", None),
              "config": {**asdict(config), "batch_sizes": list(config.batch_sizes)},
              "cuda_graph": device.type == "cuda", "compiled": config.compile and device.type == "cuda",
              "ffns": len(ffn_modules(model)), "sparse_ffns": sparse_ffn_count(model),
              "note": None if sparse else no_sparse_note(why_dense(model))}
    with stage("copy bandwidth"):
        bandwidth = copy_bandwidth(device, config.copy_bytes)
    result.update(weight_bytes=weight_bytes(model), copy_bandwidth_gb_per_s=bandwidth / 1e9)
    result["bandwidth_limit_tokens_per_s"] = bandwidth / result["weight_bytes"]
    result["decode"], result["ffn"] = [], []
    for batch in config.batch_sizes:
        loop = DecodeLoop(model, batch, config.prompt_tokens, config.new_tokens, config.compile)
        with _recompile_limit(2 * len(config.batch_sizes) + 2):
            row, ffn = _batch_measurements(loop, prompts[:batch], config, dense, stage, sparse)
        row["dense_fraction_of_limit"] = row["dense_tokens_per_s"] / batch / result["bandwidth_limit_tokens_per_s"]
        result["decode"].append(row)
        result["ffn"].append(ffn)
    first = next((row for row in result["decode"] if row["batch_size"] == 1), None)
    result["dense_fraction_of_limit"] = first["dense_fraction_of_limit"] if first else None
    with stage("HF generate"):
        result["generate"] = _generate_row(model, prompts[:1], config, dense, sparse)
    with stage("x1 sparsity during decode"), dense():
        loop = DecodeLoop(model, 1, config.prompt_tokens, config.new_tokens)
        result["sparsity"] = decode_sparsity(loop, prompts[:1])
    with stage("union of active neurons per batch"), dense():
        result["union"] = decode_unions(model, config, device)
    bar.close()
    return result


def speed_of_checkpoint(model_src: str, config: SpeedConfig, *, trust_remote_code: bool = False,
                        progress: bool = True) -> dict:
    """`relufy speed`: load a checkpoint in `config.dtype` on `config.device`, sparsify it, measure it."""
    from .checkpoint import load_model, resolve_source
    from .sparse import sparsify

    config.check()
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda, but CUDA is not available here; pass --device cpu for an eager run")
    source = resolve_source(model_src)
    model = load_model(source, dtype=config.dtype, trust_remote_code=trust_remote_code)
    model = sparsify(model.to(config.device).eval())
    return {"model": str(source), **measure_speed(model, config, progress=progress)}


def _recompile_limit(count: int):
    """Room for `count` compilations of the decode forward: each loop (batch size, dense or sparse)
    compiles it once more, and past the limit torch.compile would silently fall back to eager."""
    settings = torch._dynamo.config
    name = "recompile_limit" if hasattr(settings, "recompile_limit") else "cache_size_limit"
    return settings.patch(**{name: max(getattr(settings, name), count)})


def _check_length(model, config: SpeedConfig) -> None:
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and config.prompt_tokens + config.new_tokens > limit:
        raise DataError(f"prompt-tokens + new-tokens ({config.prompt_tokens + config.new_tokens}) exceeds the "
                        f"model's max_position_embeddings ({limit})")


def _batch_measurements(loop: DecodeLoop, prompt: torch.Tensor, config: SpeedConfig, dense, stage,
                        sparse: bool) -> tuple[dict, dict]:
    """One batch size: the decode loop dense then sparse, then each FFN alone dense then sparse. Without
    a sparse FFN the sparse arm is the dense one again: it is not run, and no speed-up is reported."""
    batch = prompt.shape[0]
    with stage(f"decode batch {batch}, dense"), dense():
        dense_tokens, dense_seconds = loop.run(prompt, config.warmup)
    generated = batch * config.new_tokens
    row = {"batch_size": batch, "new_tokens": config.new_tokens, "dense_tokens_per_s": generated / dense_seconds,
           "dense_ms_per_step": 1e3 * dense_seconds / config.new_tokens, "sparse_tokens_per_s": None,
           "sparse_ms_per_step": None, "token_match": None, "speedup": None}
    if sparse:
        with stage(f"decode batch {batch}, sparse"):
            sparse_tokens, sparse_seconds = loop.run(prompt, config.warmup)
        row.update(sparse_tokens_per_s=generated / sparse_seconds,
                   sparse_ms_per_step=1e3 * sparse_seconds / config.new_tokens,
                   token_match=(dense_tokens == sparse_tokens).float().mean().item(),
                   speedup=dense_seconds / sparse_seconds)
    with stage(f"FFN per layer, batch {batch}"):
        with dense():
            inputs = ffn_inputs(loop, prompt)
            dense_times, dense_out = ffn_times(loop.model, inputs, config), ffn_outputs(loop.model, inputs)
        if not sparse:
            return row, {"batch_size": batch, "dense_us": 1e6 * sum(dense_times), "sparse_us": None, "speedup": None,
                         "max_rel_error": None, "per_layer": []}
        sparse_times, sparse_out = ffn_times(loop.model, inputs, config), ffn_outputs(loop.model, inputs)
    per_layer = [{"layer": i, "dense_us": 1e6 * d, "sparse_us": 1e6 * s, "max_rel_error": _relative_error(do, so)}
                 for i, (d, s, do, so) in enumerate(zip(dense_times, sparse_times, dense_out, sparse_out))]
    ffn = {"batch_size": batch, "per_layer": per_layer, "dense_us": 1e6 * sum(dense_times),
           "sparse_us": 1e6 * sum(sparse_times), "speedup": sum(dense_times) / sum(sparse_times),
           "max_rel_error": max(layer["max_rel_error"] for layer in per_layer)}
    return row, ffn


def ffn_outputs(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each FFN's output on its decode input, as float32."""
    return [ffn(x).float() for ffn, x in zip(ffn_modules(model), inputs)]


def _relative_error(dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """max |sparse - dense| / max |dense|: how far the sparse FFN is from the dense one on real decode inputs."""
    return ((sparse - dense).abs().max() / dense.abs().max().clamp_min(1e-30)).item()


def _generate_row(model, prompt: torch.Tensor, config: SpeedConfig, dense, sparse: bool) -> dict:
    """HF generate, fairly: both arms warmed up with a full run, then `generate_repeats` runs of each,
    dense and sparse alternated; the median and the range of each arm, and the ratio of the medians."""
    arms = {"dense": dense} if not sparse else {"dense": dense, "sparse": contextlib.nullcontext}
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    for repeat in range(config.generate_repeats + 1):  # the first round is the warm-up
        for arm, context in arms.items():
            with context():
                rate = generate_speed(model, prompt, config.generate_tokens)
            if repeat:
                rates[arm].append(rate)
    row = {"batch_size": prompt.shape[0], "new_tokens": config.generate_tokens, "repeats": config.generate_repeats,
           "sparse_tokens_per_s": None, "speedup": None}
    for arm, values in rates.items():
        row.update({f"{arm}_tokens_per_s": statistics.median(values), f"{arm}_min_tokens_per_s": min(values),
                    f"{arm}_max_tokens_per_s": max(values)})
    if sparse:
        row["speedup"] = row["sparse_tokens_per_s"] / row["dense_tokens_per_s"]
    return row


def speed_table(result: dict) -> str:
    """Markdown: decode tokens/s per batch size dense vs sparse, then generate, the bandwidth limit,
    the FFNs alone and the decode sparsity, one line each; then zeros and unions per layer."""
    lines = [result["note"], ""] if result.get("note") else []
    lines += ["| batch | dense tok/s | sparse tok/s | sparse/dense | tokens identical |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for row in result["decode"]:
        lines.append(f"| {row['batch_size']} | {row['dense_tokens_per_s']:.1f} | {_number(row['sparse_tokens_per_s'])} | "
                     f"{_number(row['speedup'], '.2f', 'x')} | {_number(row['token_match'], '.2%')} |")
    loop = "eager decode steps (no CUDA)"
    if result.get("cuda_graph"):
        loop = "one decode step" + (" (torch.compile)" if result.get("compiled") else "") + " captured as a CUDA graph"
    lines += ["", f"Decode loop: static KV cache, {loop}, greedy; {result['config']['prompt_tokens']} prompt tokens, "
              f"{result['config']['new_tokens']} new tokens; {result.get('gpu') or result.get('device')}, "
              f"{result.get('dtype')}; {result.get('sparse_ffns', 0)} of {result.get('ffns', '?')} FFNs sparse."]
    if result.get("generate"):
        lines.append(_generate_line(result["generate"]))
    fraction = result.get("dense_fraction_of_limit")
    reached = f"; the dense loop reaches {fraction:.0%} of it" if fraction is not None else ""
    lines.append(f"Weights-bandwidth limit at batch 1: {result['bandwidth_limit_tokens_per_s']:.1f} tok/s "
                 f"({result['weight_bytes'] / 1e9:.2f} GB of weights at {result['copy_bandwidth_gb_per_s']:.0f} GB/s "
                 f"copy bandwidth){reached}.")
    for ffn in result.get("ffn", [])[:1]:
        if ffn.get("sparse_us") is not None:
            lines.append(f"FFNs alone (batch {ffn['batch_size']}, all layers, one step): dense {ffn['dense_us']:.1f} "
                         f"us, sparse {ffn['sparse_us']:.1f} us ({ffn['speedup']:.2f}x); largest relative difference "
                         f"of an FFN output, sparse vs dense: {ffn['max_rel_error']:.2e}.")
    if result.get("sparsity"):
        lines.append(f"Zero-ratio of x1 during decode: {result['sparsity']['overall']:.2%} "
                     f"over {result['sparsity']['tokens']} tokens.")
    return "\n".join(lines + _layer_table(result))


def _number(value, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _generate_line(generate: dict) -> str:
    """HF generate's median tokens/s with its range over the repeats, per arm."""
    def arm(name: str) -> str:
        if generate.get(f"{name}_tokens_per_s") is None:
            return ""
        low, high = generate.get(f"{name}_min_tokens_per_s"), generate.get(f"{name}_max_tokens_per_s")
        spread = f" [{low:.1f}-{high:.1f}]" if low is not None else ""
        return f"{name} {generate[f'{name}_tokens_per_s']:.1f} tok/s{spread}"

    ratio = f" ({generate['speedup']:.2f}x)" if generate.get("speedup") is not None else ""
    arms = ", ".join(filter(None, (arm("dense"), arm("sparse"))))
    return (f"HF generate (batch {generate['batch_size']}, {generate['new_tokens']} new tokens, default cache, "
            f"median [min-max] of {generate.get('repeats', 1)} alternated runs): {arms}{ratio}.")


def _layer_table(result: dict) -> list[str]:
    """Per layer: the zero-ratio of x1 at batch 1 and the union of active neurons at each union batch size."""
    union, sparsity = result.get("union"), result.get("sparsity")
    if not union or not sparsity:
        return []
    batches = union["batch_sizes"]
    lines = ["", "Union of active neurons per decode step (the rows the kernels read), mean over layers: " +
             ", ".join(f"{b} token{'s' * (b > 1)} {union['overall'][str(b)]:.1%}" for b in batches) + ".", "",
             "| layer | zeros (batch 1) | " + " | ".join(f"union, {b} tok" for b in batches) + " |",
             "| ---: | ---: |" + " ---: |" * len(batches)]
    for layer, zeros in enumerate(sparsity["per_layer"]):
        lines.append(f"| {layer} | {zeros:.1%} | " +
                     " | ".join(f"{union['per_layer'][str(b)][layer]:.1%}" for b in batches) + " |")
    return lines
