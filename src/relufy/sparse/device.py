"""Whether the sparse kernels can run on a device's tensors, without importing Triton where they cannot.

Triton compiles the kernels for the GPU unless `TRITON_INTERPRET=1` was set when they were defined
(then its CPU interpreter runs them, on any device). Compiled kernels given CPU tensors fail at
launch, so a CPU model on a CUDA machine must stay dense; and setting the variable after the
kernels were imported does not make them interpreted, so the variable alone does not decide.
"""

from __future__ import annotations

import os

import torch


def kernels_run_on(device: torch.device) -> bool:
    """True on CUDA; elsewhere only with `TRITON_INTERPRET=1` and the kernels actually interpreted."""
    if device.type == "cuda":
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from .kernels import runs_on
    except ImportError:  # no Triton: nothing to run the kernels with
        return False
    return runs_on(device)
