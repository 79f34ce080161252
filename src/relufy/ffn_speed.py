"""The FFNs during decode, measured apart from the rest of the step: each FFN alone on its real decode
input (dense against sparse, time and output error), every FFN in layer order as one timed sequence,
and what the sparse kernels can skip there (the zero-ratio of x1 and the union of active neurons over
a batch). `speed.py` puts these beside the end-to-end decode numbers.

An FFN timed alone is replayed on its own, so whatever of its weights fits in the GPU's L2 cache is read
from there on every replay but the first: for a small model (a 135M model's FFN is 5 MB, an H100's L2
50 MB), or the active rows of a sparse FFN, that flatters the time. In the sequence each FFN's weights
were last read one full pass over all the others ago, as in the decode step, so what the sequence saves
is what the step can save. When the decode step is compiled, so is the sequence: Inductor fuses the
dense FFN's activation and product into one kernel in the step, and an eager sequence would run them as
several and overstate what the dense FFNs cost there.
"""

from __future__ import annotations

import functools
import statistics

import torch

from .decode import DecodeLoop, random_prompts
from .architectures import down_projections, ffn_modules
from .probe import SparsityProbe
from .timing import median_seconds


def ffn_inputs(loop: DecodeLoop, prompt: torch.Tensor) -> list[torch.Tensor]:
    """The input hidden state of every FFN at the first decode step after `prompt`."""
    ffns = ffn_modules(loop.model)
    inputs: list[torch.Tensor | None] = [None] * len(ffns)

    def keep(index):
        return lambda module, args: inputs.__setitem__(index, args[0].detach().clone())

    handles = [ffn.register_forward_pre_hook(keep(i)) for i, ffn in enumerate(ffns)]
    try:
        loop.prefill(prompt)
        loop.decode_one_token(eager=True)  # a compiled step would skip the hooks and leave the prompt's inputs here
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _timed_calls(device: torch.device, repeats: int) -> int:
    """`repeats` on a GPU; at most 3 elsewhere, where each call is an eager (or interpreted) forward."""
    return repeats if device.type == "cuda" else min(repeats, 3)


def ffn_times(model, inputs: list[torch.Tensor], repeats: int, warmup: int) -> list[float]:
    """Median seconds of each FFN module alone on its decode input (CUDA-graph replays on a GPU)."""
    device = inputs[0].device
    return [median_seconds(functools.partial(ffn, x), device, _timed_calls(device, repeats), warmup)
            for ffn, x in zip(ffn_modules(model), inputs)]


def ffn_sequence_time(model, inputs: list[torch.Tensor], repeats: int, warmup: int,
                      compile_options: dict | None = None) -> float:
    """Median seconds of every FFN module on its decode input, one after another in layer order (one CUDA
    graph on a GPU): the FFNs' share of a decode step with the caches as the step leaves them. With
    `compile_options` the sequence runs through `torch.compile(**compile_options)`, as a compiled step does."""
    device = inputs[0].device
    pairs = list(zip(ffn_modules(model), inputs))

    def every_ffn():
        # The outputs are returned so a compiler keeps the work: Inductor drops every FFN whose result
        # nobody uses, and the sequence would time an empty graph.
        return [ffn(x) for ffn, x in pairs]

    run = every_ffn if compile_options is None else torch.compile(every_ffn, **compile_options)
    return median_seconds(run, device, _timed_calls(device, repeats), warmup)


def ffn_outputs(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each FFN's output on its decode input, as float32."""
    return [ffn(x).float() for ffn, x in zip(ffn_modules(model), inputs)]


def relative_error(dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """max |sparse - dense| / max |dense|: how far the sparse FFN is from the dense one on real decode inputs."""
    return ((sparse - dense).abs().max() / dense.abs().max().clamp_min(1e-30)).item()


def compare_ffns(loop: DecodeLoop, prompt: torch.Tensor, dense, sparse: bool, repeats: int, warmup: int) -> dict:
    """The FFNs on the first decode step's input, dense (inside `dense()`) then, with `sparse`, as the
    model runs them: each alone (microseconds summed over layers, and per layer), all of them in layer
    order (`*_sequence_us`, compiled like the loop's step), and the largest output error. The outputs are
    eager calls, which on CUDA run the kernels only inside `sparse_eager` (as `measure_speed` calls this)."""
    batch = prompt.shape[0]
    compile_options = loop.compile_options
    with dense():
        inputs = ffn_inputs(loop, prompt)
        dense_times, dense_out = ffn_times(loop.model, inputs, repeats, warmup), ffn_outputs(loop.model, inputs)
        dense_sequence = ffn_sequence_time(loop.model, inputs, repeats, warmup, compile_options)
    if not sparse:
        return {"batch_size": batch, "dense_us": 1e6 * sum(dense_times), "sparse_us": None, "speedup": None,
                "dense_sequence_us": 1e6 * dense_sequence, "sparse_sequence_us": None, "sequence_speedup": None,
                "max_rel_error": None, "per_layer": []}
    sparse_times, sparse_out = ffn_times(loop.model, inputs, repeats, warmup), ffn_outputs(loop.model, inputs)
    sparse_sequence = ffn_sequence_time(loop.model, inputs, repeats, warmup, compile_options)
    per_layer = [{"layer": i, "dense_us": 1e6 * d, "sparse_us": 1e6 * s, "max_rel_error": relative_error(do, so)}
                 for i, (d, s, do, so) in enumerate(zip(dense_times, sparse_times, dense_out, sparse_out))]
    return {"batch_size": batch, "per_layer": per_layer, "dense_us": 1e6 * sum(dense_times),
            "sparse_us": 1e6 * sum(sparse_times), "speedup": sum(dense_times) / sum(sparse_times),
            "dense_sequence_us": 1e6 * dense_sequence, "sparse_sequence_us": 1e6 * sparse_sequence,
            "sequence_speedup": dense_sequence / sparse_sequence,
            "max_rel_error": max(layer["max_rel_error"] for layer in per_layer)}


def decode_sparsity(loop: DecodeLoop, prompt: torch.Tensor) -> dict:
    """Zero-ratio of x1 over the decode steps only (eager, the prompt not counted)."""
    loop.prefill(prompt)
    with SparsityProbe.for_measurement(loop.model) as probe:
        for _ in range(loop.new_tokens):
            loop.decode_one_token()
    return probe.summary()


def decode_unions(model, batches: tuple[int, ...], prompt_tokens: int, steps: int, seed: int) -> dict:
    """Per layer, the fraction of FFN neurons active for at least one token of the batch, averaged over
    `steps` eager decode steps, at each batch size of `batches`: the rows the sparse kernels must read."""
    device = next(model.parameters()).device
    modules = down_projections(model)
    prompts = random_prompts(model, max(batches), prompt_tokens, seed, device)
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
            loop = DecodeLoop(model, batch, prompt_tokens, steps)
            loop.prefill(prompts[:batch])
            for total in totals:
                total.zero_()  # the prompt is not counted
            for _ in range(steps):
                loop.decode_one_token(eager=True)
        finally:
            for handle in handles:
                handle.remove()
        per_layer = [float(total) / steps for total in totals]
        result["per_layer"][str(batch)] = per_layer
        result["overall"][str(batch)] = statistics.mean(per_layer) if per_layer else float("nan")
    return result
