"""Block sizes, launch shape and gate variant of a sparse FFN call, per GPU and batch size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Tiles:
    """Block sizes, launch shape and gate variant of one call (`choose_tiles` picks them per GPU and batch)."""

    block_b: int
    block_n: int
    block_k: int
    use_dot: bool
    split: int
    chunk: int
    block_d: int
    warps_first: int = 4
    warps_down: int = 4
    stages: int = 3
    gate: str = "fused"  # a key of GATES
    split_k: int = 1  # programs per row block with the "split_k" gate
    tma: bool = False  # read the gate rows through a TMA tensor descriptor ("fused" and "split_k")


# The first kernel's tiles per GPU and batch class (largest batch of the class), read off
# `python bench/sparse_ffn.py --sweep-tiles --shapes llama2-7b --batches 1,4,16 --output sweep.json` on an H200.
# One token: four rows per program, 1024-wide K steps, broadcast-and-sum (no tensor cores). More
# tokens: tensor-core dots on a batch padded to 16. The H100 rows repeat the H200's until the sweep
# has run on an H100; a GPU not in the table gets the H200's.
TILE_TABLE = {
    "H200": {1: dict(block_n=4, block_k=1024, use_dot=False, stages=1),
             8: dict(block_n=64, block_k=128, use_dot=True, stages=4),
             1 << 30: dict(block_n=32, block_k=128, use_dot=True, stages=4)},
}
TILE_TABLE["H100"] = TILE_TABLE["H200"]
# The gate variants the bench compares (`with_gate`): changes to the table's tiles.
GATE_VARIANTS = {
    "fused": dict(gate="fused"),
    "fused_tma": dict(gate="fused", tma=True),
    "split_k": dict(gate="split_k", split_k=8),
    "split_k_tma": dict(gate="split_k", split_k=8, tma=True),
    "cublas": dict(gate="cublas"),
}


def gpu_family(name: str) -> str:
    """The TILE_TABLE row of a GPU, from its name (`torch.cuda.get_device_name`)."""
    return next((family for family in TILE_TABLE if family in name), "H200")


def choose_tiles(batch: int, n: int, d: int, device: torch.device, gate: str = "") -> Tiles:
    """The tiles for `batch` tokens on `device` (`gpu_tiles`; larger blocks under the CPU interpreter),
    with the gate variant `gate` (a key of GATE_VARIANTS; "" keeps the table's)."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        tiles = gpu_tiles(batch, d, properties.multi_processor_count, gpu_family(properties.name))
    else:
        tiles = gpu_tiles(batch, d, multiprocessors=4)
        # Triton's CPU interpreter runs programs one by one: fewer, larger ones
        tiles = dataclasses.replace(tiles, block_n=32) if batch == 1 else tiles
    return with_gate(tiles, gate) if gate else tiles


def gpu_tiles(batch: int, d: int, multiprocessors: int, family: str = "H200") -> Tiles:
    """The TILE_TABLE tiles of `family` for `batch` tokens. The down projection is split so that
    there are several programs per multiprocessor while the fp32 atomics stay few."""
    column_blocks = triton.cdiv(d, 128)
    rows = TILE_TABLE[family]
    first = rows[min(largest for largest in rows if batch <= largest)]
    per_processor = 4 if batch == 1 else 8
    return Tiles(block_b=1 if batch == 1 else max(16, triton.next_power_of_2(batch)), chunk=32, block_d=128,
                 split=max(1, min(64, (per_processor * multiprocessors) // column_blocks)), **first)


def with_gate(tiles: Tiles, variant: str) -> Tiles:
    """`tiles` with the gate variant `variant`. Split-K programs own at least 32 rows in short K
    steps (many rows in flight per load, one program in eight finishing); a TMA box is at most 256
    elements wide."""
    changes = dict(GATE_VARIANTS[variant])
    if changes["gate"] == "split_k":
        changes["block_n"] = max(32, tiles.block_n)
        changes["block_k"] = min(tiles.block_k, 256)
    if changes.get("tma"):
        changes["block_k"] = min(changes.get("block_k", tiles.block_k), 256)
        changes["stages"] = max(tiles.stages, 3)
    return dataclasses.replace(tiles, **{"split_k": 1, "tma": False, **changes})

