"""relufy's one clock: device time of a block (CUDA events on a GPU, the host clock elsewhere), CUDA-graph
capture, the median of repeated calls, the copy bandwidth that bounds a decode step, and whether other
processes share the GPU (whose load would be in every number).

Every measurement of relufy's and of bench/ goes through `Timer`, so a number in a JSON is always
taken the same way: after the device finished the work, never from when the host queued it.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

CPU_COPY_BYTES = 64 << 20  # the copy-bandwidth probe on a CPU stays small

logger = logging.getLogger(__name__)


class Timer:
    """Seconds of device work in a `with` block (or between `start()` and `stop()`): CUDA events on a
    GPU, `time.perf_counter` elsewhere (no device, or a CPU one)."""

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.seconds = float("nan")

    def start(self) -> "Timer":
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        """Wait for the device (on CUDA), then return and keep the seconds since `start`."""
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.begin.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0
        return self.seconds

    def __enter__(self) -> "Timer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one call of `fn`: CUDA-graph replays on a GPU (no launch overhead counted),
    plain calls elsewhere, each timed alone."""
    device = torch.device(device)
    run = capture(fn, warmup).replay if device.type == "cuda" else fn
    samples = []
    for _ in range(repeats):
        with Timer(device) as timer:
            run()
        samples.append(timer.seconds)
    return statistics.median(samples)


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


def gpu_processes(device: torch.device) -> int | None:
    """How many processes hold a context on `device`'s GPU, this one included, from NVML (the
    `nvidia-ml-py` package); None when that cannot be known (no CUDA, no NVML, or NVML refuses).

    A timing taken while another process runs kernels on the same GPU measures both, and nothing else
    in a result would show it. Counted rather than matched by PID: inside a container NVML reports
    host PIDs, so this process cannot be told apart from the others.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        count = len(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except pynvml.NVMLError:
        return None
    return count or None  # this process holds a context: seeing none means NVML cannot see processes here


def most_processes(before: int | None, after: int | None) -> int | None:
    """The larger of two counts of `gpu_processes` taken before and after a run (None: unknown); a
    process that came and went in between is still missed."""
    known = [count for count in (before, after) if count is not None]
    return max(known) if known else None


def record_gpu_processes(result: dict, device: torch.device) -> None:
    """Set `result["gpu_processes"]` to the most processes seen on the GPU so far, and warn when others
    held it: call it as a measurement begins and as it ends."""
    result["gpu_processes"] = most_processes(result.get("gpu_processes"), gpu_processes(device))
    warn_if_shared(device, result["gpu_processes"])


def warn_if_shared(device: torch.device, processes: int | None) -> None:
    """One log line when other processes hold the GPU during a measurement."""
    if processes is not None and processes > 1:
        logger.warning(f"{processes - 1} other process(es) use {torch.device(device)}'s GPU: the timings include "
                       "their work; measure on an idle GPU to compare numbers")
