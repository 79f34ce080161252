"""Where a decode step's time goes, kernel by kernel: `relufy speed --profile-steps N`.

The timed decode says how long a step takes, the FFNs timed alone what the FFN kernels take; when
the sparse step saves less than its FFNs do, the rest of the step is where the time went. So after
a batch size's timed runs, each arm's step is captured again (`DecodeLoop.step_runner`) and N
replays of it run under torch.profiler.

CUPTI records the kernels a CUDA graph launches as kernel activities of their own, as it records
kernels launched one by one, and torch keeps every device activity in `profiler.events()` whatever
CPU call it is correlated with (for a replay, `cudaGraphLaunch`): a replayed step is seen kernel by
kernel. Should a profile of replays hold no kernel at all (a CUPTI that does not trace graph
launches), the same compiled step is profiled launched without its graph, and the arm's `method`
says so: its gaps are then host launches, not the graph's.

Per arm: the wall time of a step (relufy's `Timer` around the profiled steps), the kernel time (the
sum of kernel durations), the busy time (their union: kernels that overlap count once) and the idle
time (wall - busy: on a graph the gaps between kernels, without one the host's launches too), the
kernels per step, and every kernel name with its time and count per step; then per kernel name the
difference between the arms. On a CPU the step runs eagerly and the CPU ops (relufy's operators,
aten's, nested ones included) take the kernels' place, each timed by its self time.
"""

from __future__ import annotations

import torch

from .timing import Timer

GRAPH_REPLAYS = "CUDA-graph replays"
WITHOUT_GRAPH = ("the compiled step launched without its CUDA graph: the profiler recorded no kernel of the "
                 "graph replays")
CPU_STEPS = "eager steps on the CPU; CPU ops stand for kernels"


def profile_decode(loop, prompt: torch.Tensor, steps: int, warmup: int, dense, sparse: bool) -> dict:
    """One batch size's profile: `steps` decode steps of the dense arm (inside `dense()`), of the sparse
    arm when the model has one, and per kernel name what the sparse arm spends more or less."""
    with dense():
        dense_arm = profile_arm(loop, prompt, steps, warmup)
    sparse_arm = profile_arm(loop, prompt, steps, warmup) if sparse else None
    return {"batch_size": prompt.shape[0], "steps": steps, "dense": dense_arm, "sparse": sparse_arm,
            "diff": kernel_diff(dense_arm, sparse_arm) if sparse_arm else None}


def profile_arm(loop, prompt: torch.Tensor, steps: int, warmup: int) -> dict:
    """The captured step of the arm now enabled, profiled over `steps` replays from a fresh prefill
    (so `steps` must not exceed the loop's `new_tokens`, the cache's room)."""
    cuda = loop.device.type == "cuda"
    arm = profile_calls(loop.step_runner(prompt, warmup), steps, loop.device)
    method = GRAPH_REPLAYS if cuda else CPU_STEPS
    if cuda and not arm["kernels"]:
        loop.prefill(prompt)
        arm, method = profile_calls(loop.decode_one_token, steps, loop.device), WITHOUT_GRAPH
    return {"method": method, **arm}


def profile_calls(run, steps: int, device: torch.device) -> dict:
    """`steps` calls of `run` under torch.profiler (CUDA activity on a GPU, CPU activity elsewhere),
    timed as a whole by `Timer`, summed up per step by `step_summary`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as profiler:
        with Timer(device) as timer:
            for _ in range(steps):
                run()
    return step_summary(profiler.events(), steps, timer.seconds, cuda)


def step_summary(events, steps: int, seconds: float, cuda: bool) -> dict:
    """Per step: wall, kernel, busy and idle microseconds, kernels, and each kernel name's time and count
    (the names in full, the most time first). Device activities (kernels, copies, fills) on a GPU;
    synchronous CPU ops, by self time, elsewhere."""
    from torch.autograd import DeviceType

    if cuda:
        chosen = [event for event in events if event.device_type != DeviceType.CPU]
    else:
        chosen = [event for event in events if event.device_type == DeviceType.CPU and not event.is_async]
    names: dict[str, list[float]] = {}
    for event in chosen:
        spent = event.time_range.elapsed_us() if cuda else event.self_cpu_time_total
        names.setdefault(event.name, []).append(spent)
    kernels = [{"name": name, "us_per_step": sum(times) / steps, "count_per_step": len(times) / steps}
               for name, times in names.items()]
    wall = 1e6 * seconds / steps
    busy = covered_us([(event.time_range.start, event.time_range.end) for event in chosen]) / steps
    return {"wall_us_per_step": wall, "kernel_us_per_step": sum(row["us_per_step"] for row in kernels),
            "busy_us_per_step": busy, "idle_us_per_step": wall - busy, "kernels_per_step": len(chosen) / steps,
            "kernels": sorted(kernels, key=lambda row: -row["us_per_step"])}


def covered_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of the (start, end) intervals: time when at least one of them ran."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def kernel_diff(dense: dict, sparse: dict) -> list[dict]:
    """Every kernel name of either arm with its time and count per step in each (0 where it does not
    run) and sparse - dense, the largest difference either way first."""
    dense_rows, sparse_rows = ({row["name"]: row for row in arm["kernels"]} for arm in (dense, sparse))
    absent = {"us_per_step": 0.0, "count_per_step": 0.0}
    rows = []
    for name in dict.fromkeys([*dense_rows, *sparse_rows]):
        before, after = dense_rows.get(name, absent), sparse_rows.get(name, absent)
        rows.append({"name": name, "dense_us_per_step": before["us_per_step"],
                     "sparse_us_per_step": after["us_per_step"],
                     "delta_us_per_step": after["us_per_step"] - before["us_per_step"],
                     "dense_count_per_step": before["count_per_step"],
                     "sparse_count_per_step": after["count_per_step"]})
    return sorted(rows, key=lambda row: -abs(row["delta_us_per_step"]))
