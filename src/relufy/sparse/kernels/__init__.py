"""Triton kernels for a ReLU-sparse FFN at decode: read only the weight rows of active neurons.

A gated FFN computes y = (act(x W_gate^T) * (x W_up^T)) W_down^T. With a ReLU-family `act`,
a neuron whose gate is zero contributes exactly nothing, so its W_up row and its W_down column
need not be read. Fixed grids, and the active count kept on the device, so the whole call can be
captured in a CUDA graph. One module per job:

- `gate_up`: the first kernel (the gate rows read in full, the activation, the compact list of
  active neurons, their W_up rows), one program per row block or, opt-in (`Tiles.first_programs`),
  a persistent grid whose programs each walk row blocks in one software-pipelined loop;
- `down`: the second kernel (W_down^T rows of the list, or every row above `dense_above`);
- `up_down`: the second kernel of the "up in down" variant (`Tiles.up_in_down`, gated FFNs): each
  program reads the W_up and then the W_down^T rows of a slice of the list, after a first kernel
  that read only the gate;
- `tiles`: block sizes of both kernels per GPU and batch (`TILE_TABLE`), and per width for narrow FFNs
  (`NARROW_TILE_TABLE`);
- `launch`: the workspace, `sparse_ffn` (both launches), `routed_sparse_ffn` (tiles and route as
  both operators choose them), the `relufy::sparse_ffn` operator, and `runs_on` (whether the
  kernels, compiled or interpreted, can take a device's tensors).

Rounding mirrors the dense PyTorch FFN: the gate and up projections are accumulated in fp32 and
rounded to the input dtype before the activation and the product, so the set of zeros is the one
the dense model sees (up to its different summation order).
"""

from .gate_up import ACTIVATION_CODES, FATRELU, RELU, RELU2, SHIFTED_RELU
from .launch import interpreted, routed_sparse_ffn, runs_on, sparse_ffn, sparse_ffn_op, workspace_size
from .tiles import (NARROW_TILE_TABLE, NARROW_WIDTH, TILE_TABLE, Tiles, choose_tiles, device_row,
                    family_and_multiprocessors, gpu_family, gpu_tiles, row_tiles, table_row)

__all__ = ["ACTIVATION_CODES", "FATRELU", "NARROW_TILE_TABLE", "NARROW_WIDTH", "RELU", "RELU2", "SHIFTED_RELU",
           "TILE_TABLE", "Tiles", "choose_tiles", "device_row", "family_and_multiprocessors", "gpu_family",
           "gpu_tiles", "interpreted", "routed_sparse_ffn", "row_tiles", "runs_on", "sparse_ffn", "sparse_ffn_op",
           "table_row", "workspace_size"]
