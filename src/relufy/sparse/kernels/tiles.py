"""Block sizes and launch shape of a sparse FFN call, per GPU and batch size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch shape of one call (`choose_tiles` picks them per GPU and batch)."""

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


def gpu_family(name: str) -> str:
    """The TILE_TABLE row of a GPU, from its name (`torch.cuda.get_device_name`)."""
    return next((family for family in TILE_TABLE if family in name), "H200")


def choose_tiles(batch: int, n: int, d: int, device: torch.device) -> Tiles:
    """The tiles for `batch` tokens on `device` (`gpu_tiles`; larger blocks under the CPU interpreter)."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return gpu_tiles(batch, d, properties.multi_processor_count, gpu_family(properties.name))
    tiles = gpu_tiles(batch, d, multiprocessors=4)
    # Triton's CPU interpreter runs programs one by one: fewer, larger ones
    return dataclasses.replace(tiles, block_n=32) if batch == 1 else tiles


def gpu_tiles(batch: int, d: int, multiprocessors: int, family: str = "H200") -> Tiles:
    """The TILE_TABLE tiles of `family` for `batch` tokens. The down projection is split so that
    there are several programs per multiprocessor while the fp32 atomics stay few."""
    column_blocks = triton.cdiv(d, 128)
    rows = TILE_TABLE[family]
    first = rows[min(largest for largest in rows if batch <= largest)]
    per_processor = 4 if batch == 1 else 8
    return Tiles(block_b=1 if batch == 1 else max(16, triton.next_power_of_2(batch)), chunk=32, block_d=128,
                 split=max(1, min(64, (per_processor * multiprocessors) // column_blocks)), **first)
