"""Sparse inference: turn the exact zeros of a ReLU-family FFN into decode speed.

`sparsify(model)` routes every converted FFN's decode calls through Triton kernels that read
only the weight rows of active neurons (`relufy.sparse.kernels`); prefill and large batches run
dense, and so do eager CUDA calls unless `SparseConfig.eager` (compiled or CUDA-graph-captured
decode runs the kernels). Importing this package needs Triton (`pip install 'relufy[inference]'`)
only when a model is actually sparsified.
"""

from .ffn import (DEFAULT_MAX_TOKENS, SparseConfig, eager_runs_dense, sparse_eager, sparse_enabled, sparse_ffn_count,
                  sparse_ffns, sparsify, takes_kernels, why_dense)

__all__ = ["DEFAULT_MAX_TOKENS", "SparseConfig", "eager_runs_dense", "sparse_eager", "sparse_enabled",
           "sparse_ffn_count", "sparse_ffns", "sparsify", "takes_kernels", "why_dense"]
