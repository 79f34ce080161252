"""End-to-end decode speed, dense against sparse, in relufy's own decode loop (`decode.py`).

The dense and the sparse FFNs run in the same loop, in one process, on the same prompts; the greedy
tokens of both runs are compared. Next to it, so the number can be judged: the weights-bandwidth limit
(bytes of the weights read per step / the copy bandwidth measured in the same run), HF `generate`'s
tokens/s (what HF users see), and from `ffn_speed.py` each FFN timed alone and the zero-ratio and union
of x1 during decode. The table of these numbers is `report.speed_table`.

These measure the kernels, so their eager calls run them (`sparse_eager`): on CUDA `sparsify`'s FFNs
run dense in eager calls by default (`relufy.sparse.takes_kernels`), and the loop's uncompiled step,
the FFNs timed alone and the logit margins of `first_divergences` are eager calls, or captured after
eager warm-ups. HF `generate` is timed as sparsified, what HF users get, and with the kernels in eager
calls too where that differs.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from . import __version__
from .architectures import ffn_modules
from .decode import ATTENTION_BACKENDS, DecodeLoop, cache_kwarg, random_prompts, recompile_limit, weight_bytes
from .errors import DataError
from .ffn_speed import compare_ffns, decode_sparsity, decode_unions
from .options import SpeedConfig
from .step_profile import profile_decode
from .timing import Timer, copy_bandwidth, record_gpu_processes


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


def no_sparse_note(reason: str | None) -> str:
    """The one line `relufy speed` prints for a model without sparse FFNs."""
    why = reason or "sparsify was not called on this model"
    for boilerplate in ("relufy.sparse: ", ". The model runs dense", "; the model runs dense"):
        why = why.replace(boilerplate, "")
    return f"No FFN runs sparse: {why}. No speed-up is reported; dense numbers only."


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
def measure_speed(model, config: SpeedConfig | None = None, progress: bool = True, on_update=None) -> dict:
    """Decode speed of `model` (sparsified or not) dense against sparse, with the context to judge it.

    Every batch size decodes the same seeded prompts twice in one loop: with the sparse FFNs turned
    off (`sparse_enabled(model, False)`) and on, eager calls included (`sparse_eager`). The JSON fields
    are described in docs/inference.md. `on_update`, if given, is called with the result so far after
    every stage, so a caller can save it and a run cut short keeps what finished.
    """
    from .sparse import sparse_eager, sparse_enabled, sparse_ffn_count

    config = config or SpeedConfig()
    config.check()
    model.eval()
    device = next(model.parameters()).device
    _check_length(model, config)
    prompts = random_prompts(model, max(config.batch_sizes), config.prompt_tokens, config.seed, device)
    dense = functools.partial(sparse_enabled, model, False)
    sparse = sparse_ffn_count(model) > 0
    bar = tqdm(total=(2 + sparse + bool(config.profile_steps)) * len(config.batch_sizes) + 4, unit="run", disable=not progress)

    @contextlib.contextmanager
    def stage(label: str):
        bar.set_description(f"relufy speed: {label}")
        yield
        bar.update(1)
        if on_update:
            on_update(result)

    result = _what_ran(model, config, device)
    with stage("copy bandwidth"):
        bandwidth = copy_bandwidth(device, config.copy_bytes)
        result.update(weight_bytes=weight_bytes(model), copy_bandwidth_gb_per_s=bandwidth / 1e9, decode=[], ffn=[], profile=[])
        result["bandwidth_limit_tokens_per_s"] = bandwidth / result["weight_bytes"]
    for batch in config.batch_sizes:
        loop = DecodeLoop(model, batch, config.prompt_tokens, config.new_tokens, config.compile, config.compile_mode)
        with recompile_limit(2 * len(config.batch_sizes) + 2), sparse_eager(model):
            row, ffn, profile = _batch_measurements(loop, prompts[:batch], config, dense, stage, sparse)
        row["dense_fraction_of_limit"] = row["dense_tokens_per_s"] / batch / result["bandwidth_limit_tokens_per_s"]
        result["decode"].append(row)
        result["ffn"].append(ffn)
        result["profile"] += [profile] if profile else []
        if on_update:
            on_update(result)
    first = next((row for row in result["decode"] if row["batch_size"] == 1), None)
    result["dense_fraction_of_limit"] = first["dense_fraction_of_limit"] if first else None
    with stage("HF generate"):
        result["generate"] = _generate_row(model, prompts[:1], config, dense, sparse)
    with stage("x1 sparsity during decode"), dense():
        loop = DecodeLoop(model, 1, config.prompt_tokens, config.new_tokens)
        result["sparsity"] = decode_sparsity(loop, prompts[:1])
    with stage("union of active neurons per batch"), dense():
        result["union"] = decode_unions(model, config.union_batch_sizes, config.prompt_tokens,
                                         min(config.new_tokens, 32), config.seed)
    record_gpu_processes(result, device)
    bar.close()
    return result


def _what_ran(model, config: SpeedConfig, device: torch.device) -> dict:
    """The head of a result: the GPU, versions, dtype, loop settings, how many FFNs run sparse (or why
    none does), and how many processes held the GPU as the run began (warned about when others did)."""
    from .sparse import sparse_ffn_count, why_dense

    sparse = sparse_ffn_count(model)
    result = {**environment(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "attention": getattr(model.config, "_attn_implementation", None),
              "config": {**asdict(config), "batch_sizes": list(config.batch_sizes)},
              "cuda_graph": device.type == "cuda", "compiled": config.compile and device.type == "cuda",
              "ffns": len(ffn_modules(model)), "sparse_ffns": sparse,
              "note": None if sparse else no_sparse_note(why_dense(model))}
    record_gpu_processes(result, device)
    return result


def speed_of_checkpoint(model_src: str, config: SpeedConfig, *, trust_remote_code: bool = False,
                        progress: bool = True) -> dict:
    """`relufy speed`: load a checkpoint in `config.dtype` on `config.device`, sparsify it, measure it.

    The result carries the checkpoint's `identity` (`model_identity`, as `relufy evaluate` records it), so
    that `relufy publish --speed` can refuse the timing of another model."""
    from .architectures import activation_name
    from .checkpoint import load_model, model_identity, resolve_source
    from .sparse import sparsify

    config.check()
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda, but CUDA is not available here; pass --device cpu for an eager run")
    source = resolve_source(model_src)
    model = load_model(source, dtype=config.dtype, trust_remote_code=trust_remote_code)
    identity = model_identity(source, activation_name(model))
    model = sparsify(model.to(config.device).eval())
    return {"model": str(source), "identity": identity, **measure_speed(model, config, progress=progress)}


def _check_length(model, config: SpeedConfig) -> None:
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and config.prompt_tokens + config.new_tokens > limit:
        raise DataError(f"prompt-tokens + new-tokens ({config.prompt_tokens + config.new_tokens}) exceeds the "
                        f"model's max_position_embeddings ({limit})")


def _batch_measurements(loop: DecodeLoop, prompt: torch.Tensor, config: SpeedConfig, dense, stage,
                        sparse: bool) -> tuple[dict, dict, dict | None]:
    """One batch size: the decode loop dense then sparse, then each FFN alone dense then sparse, then with
    `profile_steps` the profile of both arms' steps (`step_profile.py`). Without a sparse FFN the sparse
    arm is the dense one again: it is not run, and no speed-up is reported."""
    batch = prompt.shape[0]
    with stage(f"decode batch {batch}, dense"), dense():
        dense_tokens, dense_seconds = loop.decode_n_tokens(prompt, config.warmup)
    generated = batch * config.new_tokens
    row = {"batch_size": batch, "new_tokens": config.new_tokens, "dense_tokens_per_s": generated / dense_seconds,
           "dense_ms_per_step": 1e3 * dense_seconds / config.new_tokens, "sparse_tokens_per_s": None,
           "sparse_ms_per_step": None, "token_match": None, "speedup": None}
    if sparse:
        with stage(f"decode batch {batch}, sparse"):
            sparse_tokens, sparse_seconds = loop.decode_n_tokens(prompt, config.warmup)
        row.update(ffn_route=ffn_route(loop.model, batch), sparse_tokens_per_s=generated / sparse_seconds,
                   sparse_ms_per_step=1e3 * sparse_seconds / config.new_tokens,
                   token_match=(dense_tokens == sparse_tokens).float().mean().item(),
                   speedup=dense_seconds / sparse_seconds,
                   first_divergences=first_divergences(loop.model, prompt, dense_tokens, sparse_tokens, dense))
    with stage(f"FFN per layer, batch {batch}"):
        ffn = compare_ffns(loop, prompt, dense, sparse, config.ffn_repeats, config.warmup)
    if not config.profile_steps:
        return row, ffn, None
    with stage(f"profile batch {batch}"):
        return row, ffn, profile_decode(loop, prompt, config.profile_steps, config.warmup, dense, sparse)


def ffn_route(model, tokens: int) -> str:
    """Which FFN path a decode step of `tokens` tokens (one per sequence) takes in the sparse arm: the kernels,
    or the dense FFN when a call has more tokens than `SparseConfig.max_tokens`, whose speed-up then compares
    dense with dense."""
    from .sparse import sparse_ffns

    config = sparse_ffns(model)[0].config
    if config.takes(tokens):
        return "sparse kernels"
    return f"dense (more than max_tokens = {config.max_tokens} tokens a call)"


@torch.no_grad()
def first_divergences(model, prompt: torch.Tensor, dense_tokens: torch.Tensor, sparse_tokens: torch.Tensor,
                      dense) -> list[dict]:
    """Where each sequence's sparse tokens first leave its dense ones, and how close a call it was there.

    Until that step both runs saw the same tokens, so decoding the prompt and the shared tokens again,
    eagerly and one token per forward as the loop does (the sparse kernels serve single tokens, a longer
    forward runs dense), gives each arm's logits at the step; the sparse arm's eager calls run the kernels
    (`sparse_eager`), as the loop's compiled or captured step does. `dense_margin` is how much the dense model
    prefers its own token to the sparse run's (a logit difference), `sparse_margin` the same for the
    sparse model. A margin of a rounding step or two is a near-tie that any change of summation order
    flips; a large one means the sparse step computed something else than the dense one.
    """
    from .sparse import sparse_eager

    rows = []
    for sequence in range(prompt.shape[0]):
        differ = (dense_tokens[sequence] != sparse_tokens[sequence]).nonzero()
        if len(differ) == 0:
            continue
        step = int(differ[0])
        ours, theirs = int(dense_tokens[sequence, step]), int(sparse_tokens[sequence, step])
        shared = dense_tokens[sequence, :step].to(prompt.device)
        with dense():
            dense_logits = _logits_after(model, prompt[sequence], shared)
        with sparse_eager(model):
            sparse_logits = _logits_after(model, prompt[sequence], shared)
        rows.append({"sequence": sequence, "step": step, "dense_token": ours, "sparse_token": theirs,
                     "dense_margin": (dense_logits[ours] - dense_logits[theirs]).item(),
                     "sparse_margin": (sparse_logits[theirs] - sparse_logits[ours]).item()})
    return rows


def _logits_after(model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Float logits for the token after `prompt` + `tokens`: the prompt in one forward, then one token per
    forward, with the decode loop's attention backends."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(ATTENTION_BACKENDS):
        out = model(input_ids=prompt[None], use_cache=True)
        for token in tokens:
            out = model(input_ids=token.view(1, 1), use_cache=True, **{cache_kwarg(model): out.past_key_values})
    return out.logits[0, -1].float()


def _generate_row(model, prompt: torch.Tensor, config: SpeedConfig, dense, sparse: bool) -> dict:
    """HF generate, fairly: every arm warmed up with a full run, then `generate_repeats` runs of each,
    alternated; the median and the range of each arm, and its ratio of the medians to dense.

    The sparse arm is the model as sparsified, what HF users get: on CUDA its eager calls run dense
    (`eager_ffns` "dense"). Then an `eager_kernels` arm runs the kernels in eager calls too, as
    `SparseConfig(eager=True)` would, which shows whether opting in pays on this model and host."""
    from .sparse import eager_runs_dense, sparse_eager

    arms = {"dense": dense}
    if sparse:
        arms["sparse"] = contextlib.nullcontext
        if eager_runs_dense(model):
            arms["eager_kernels"] = functools.partial(sparse_eager, model)
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    for repeat in range(config.generate_repeats + 1):  # the first round is the warm-up
        for arm, context in arms.items():
            with context():
                rate = generate_speed(model, prompt, config.generate_tokens)
            if repeat:
                rates[arm].append(rate)
    row = {"batch_size": prompt.shape[0], "new_tokens": config.generate_tokens, "repeats": config.generate_repeats,
           "sparse_tokens_per_s": None, "speedup": None, "eager_ffns": None}
    for arm, values in rates.items():
        row.update({f"{arm}_tokens_per_s": statistics.median(values), f"{arm}_min_tokens_per_s": min(values),
                    f"{arm}_max_tokens_per_s": max(values)})
    if sparse:
        row["speedup"] = row["sparse_tokens_per_s"] / row["dense_tokens_per_s"]
        row["eager_ffns"] = "dense" if "eager_kernels" in arms else "sparse kernels"
    if "eager_kernels" in arms:
        row["eager_kernels_speedup"] = row["eager_kernels_tokens_per_s"] / row["dense_tokens_per_s"]
    return row

