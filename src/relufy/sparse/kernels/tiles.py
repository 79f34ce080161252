"""Block sizes and launch shape of a sparse FFN call, per GPU, batch size and (for narrow FFNs) width."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch shape of one call (`choose_tiles` picks them per GPU, batch and width)."""

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
    stages_down: int = 3
    up_in_down: bool = False  # gated FFNs: W_up read in the second kernel (`up_down_kernel`), not the first
    # programs of the first kernel: 0, one per block of block_n rows (`first_projection_kernel`); else a
    # fixed grid of this many, each walking row blocks in a loop pipelined over `stages`
    # (`persistent_first_projection_kernel`); from a row's `first_per_sm` (absent: 0)
    first_programs: int = 0
    # the per-block first kernel's list append: relaxed (only the next launch reads the list, and the launch
    # boundary orders it) or acquire-release (today's rows, as timed); the persistent kernel's is always relaxed
    relaxed_append: bool = False
    # the second kernel launched as a programmatic dependent of the first (Hopper and later, compiled kernels
    # only): its programs are placed while the first kernel's last ones run and wait on the device for its
    # results, so a CUDA graph loses the launch gap between the two; from a row's `dependent_launch`
    dependent_launch: bool = False


# Per GPU family and batch class (the largest batch of the class), the tiles of both kernels, read off
# `python bench/sparse_ffn.py --sweep-tiles --shapes llama2-7b --batches B --output sweep.json`, which prints
# the rows of the GPU it ran on, ready to paste over its family's. First kernel (block_n, block_k, use_dot,
# warps_first, stages): one token, four rows per program, 1024-wide K steps, broadcast-and-sum (no tensor
# cores); more tokens, tensor-core dots on a batch padded to 16. No row sets first_per_sm (the persistent
# first kernel's programs per multiprocessor, `Tiles.first_programs`): one program per row block. Down
# kernel (block_d columns per program, chunk rows per step, down_per_sm programs per multiprocessor, 0 for one
# per column block, warps_down, stages_down). Each family's rows come from a sweep of both kernels on that GPU
# (docs/results/inference/sweep-h100-llama2-7b-b*.json, sweep-h200-llama2-7b-b*.json). A GPU not in the
# table gets the H200's rows.
TILE_TABLE: dict[str, dict[int, dict]] = {}
TILE_TABLE["H200"] = {
    1: dict(block_n=4, block_k=1024, use_dot=False, warps_first=4, stages=1,
            up_in_down=False, block_d=128, chunk=128, down_per_sm=4, warps_down=4, stages_down=1),
    4: dict(block_n=64, block_k=128, use_dot=True, warps_first=4, stages=4,
            up_in_down=False, block_d=256, chunk=32, down_per_sm=4, warps_down=8, stages_down=1),
    8: dict(block_n=64, block_k=128, use_dot=True, warps_first=4, stages=4,
            up_in_down=False, block_d=256, chunk=32, down_per_sm=4, warps_down=8, stages_down=1),
    1 << 30: dict(block_n=32, block_k=128, use_dot=True, warps_first=4, stages=4,
                  up_in_down=False, block_d=256, chunk=64, down_per_sm=2, warps_down=8, stages_down=1),
}
# The H100's one-token row launches its second kernel as the first's programmatic dependent: 0.6 us less per
# FFN in a graph of 32 Llama-2-7B layers (docs/inference.md, "Dependent launch"); at four tokens it did not win.
TILE_TABLE["H100"] = {
    1: dict(block_n=4, block_k=1024, use_dot=False, warps_first=4, stages=1,
            block_d=128, chunk=128, down_per_sm=4, warps_down=4, stages_down=1, dependent_launch=True),
    4: dict(block_n=64, block_k=128, use_dot=True, warps_first=4, stages=4,
            block_d=128, chunk=64, down_per_sm=4, warps_down=8, stages_down=1),
    8: dict(block_n=32, block_k=128, use_dot=True, warps_first=4, stages=4,
            block_d=128, chunk=32, down_per_sm=8, warps_down=4, stages_down=1),
    1 << 30: dict(block_n=32, block_k=128, use_dot=True, warps_first=4, stages=4,
                  block_d=128, chunk=64, down_per_sm=4, warps_down=8, stages_down=1),
}
MAX_SPLIT = 64  # programs per column block of the down kernel: bounds the fp32 atomics per output
# FFNs no wider than NARROW_WIDTH (SmolLM2-135M's 576) are latency-bound at decode, and a sweep on such a
# shape finds other rows than the Llama-2-7B shape's (`--sweep-tiles --shapes smollm2-135m --layers 32
# --batches 1,4`, which prints a NARROW_TILE_TABLE statement; in
# docs/results/inference/sweep-h200-smollm2-135m.json one token takes 9.2 us against 10.9 us with the rows
# above, 4 tokens 11.2 us against 13.4 us). On CUDA, where a family has rows here they serve such widths;
# a family without them keeps its TILE_TABLE rows. The bound is chosen, not swept (only 576 was): it
# takes in the small models' widths, such as SmolLM2-360M's 960 and Qwen2.5-0.5B's 896.
NARROW_WIDTH = 1024
NARROW_TILE_TABLE: dict[str, dict[int, dict]] = {}
NARROW_TILE_TABLE["H200"] = {
    1: dict(block_n=4, block_k=1024, use_dot=False, warps_first=4, stages=1,
            up_in_down=True, block_d=1024, chunk=8, down_per_sm=1, warps_down=4, stages_down=1),
    1 << 30: dict(block_n=16, block_k=128, use_dot=True, warps_first=4, stages=4,
                  up_in_down=False, block_d=128, chunk=64, down_per_sm=0.5, warps_down=8, stages_down=1),
}
# docs/results/inference/sweep-h100-smollm2-135m.json: one token 7.9 us against 11.2 us with TILE_TABLE's H100
# rows, 4 tokens 10.5 us against 13.5 us
NARROW_TILE_TABLE["H100"] = {
    1: dict(block_n=4, block_k=1024, use_dot=False, warps_first=4, stages=1, relaxed_append=True,
            up_in_down=True, block_d=1024, chunk=8, down_per_sm=0.5, warps_down=4, stages_down=1, dependent_launch=True),
    1 << 30: dict(block_n=16, block_k=128, use_dot=True, warps_first=4, stages=4,
                  up_in_down=False, block_d=128, chunk=64, down_per_sm=0.5, warps_down=8, stages_down=1,
                  dependent_launch=True),
}


def gpu_family(name: str) -> str:
    """The TILE_TABLE row of a GPU, from its name (`torch.cuda.get_device_name`)."""
    return next((family for family in TILE_TABLE if family in name), "H200")


def family_and_multiprocessors(device: torch.device) -> tuple[str, int]:
    """The TILE_TABLE family of `device` and its multiprocessor count (off CUDA, where only Triton's
    interpreter runs the kernels: the H200's rows, sized for 4 multiprocessors)."""
    if device.type == "cuda":
        name, multiprocessors = _cuda_name_and_multiprocessors(
            device.index if device.index is not None else torch.cuda.current_device())
        return gpu_family(name), multiprocessors
    return "H200", 4


@functools.lru_cache(maxsize=None)
def _cuda_name_and_multiprocessors(index: int) -> tuple[str, int]:
    """A GPU's name and multiprocessor count, queried once per device: every eager decode call chooses its
    tiles, and `torch.cuda.get_device_properties` is microseconds of Python (device index checks) each
    time. The family is looked up from the name on every call, so a table edited in the process still applies."""
    properties = torch.cuda.get_device_properties(index)
    return properties.name, properties.multi_processor_count


def choose_tiles(batch: int, n: int, d: int, device: torch.device) -> Tiles:
    """The tiles for `batch` tokens of width `d` on `device` (the row of `device_row`); under the CPU
    interpreter larger blocks at one token, since it runs programs one by one."""
    _, multiprocessors = family_and_multiprocessors(device)
    row = device_row(batch, d, device)
    return _row_tiles_once(tuple(row.items()), batch, d, multiprocessors, device.type != "cuda")


@functools.lru_cache(maxsize=1024)
def _row_tiles_once(row: tuple, batch: int, d: int, multiprocessors: int, interpreter: bool) -> Tiles:
    """`choose_tiles`' result for one row's contents, computed once: eager decode chooses tiles on every
    call, and building them (Triton's host-side `cdiv`, a frozen dataclass) costs more than the rest of
    the choice. Keyed by the row's items, not the row, so a row edited in place gets tiles of its own."""
    tiles = row_tiles(dict(row), batch, d, multiprocessors)
    return dataclasses.replace(tiles, block_n=32) if batch == 1 and interpreter else tiles


def device_row(batch: int, d: int, device: torch.device) -> dict:
    """The table row calls of `batch` tokens of width `d` take on `device`: on CUDA its family's row for
    the width (`table_row`); under the CPU interpreter, which checks correctness, not speed,
    TILE_TABLE's whatever the width."""
    family, _ = family_and_multiprocessors(device)
    return table_row(family, batch, d if device.type == "cuda" else None)


def gpu_tiles(batch: int, d: int, multiprocessors: int, family: str = "H200") -> Tiles:
    """The tiles of `family` for `batch` tokens of width `d` (`table_row`)."""
    return row_tiles(table_row(family, batch, d), batch, d, multiprocessors)


def table_row(family: str, batch: int, d: int | None = None) -> dict:
    """The row of `family` whose batch class holds `batch` (the smallest class at least as large): from
    NARROW_TILE_TABLE for a width `d` up to NARROW_WIDTH where the family has narrow rows, else from
    TILE_TABLE."""
    narrow = d is not None and d <= NARROW_WIDTH and family in NARROW_TILE_TABLE
    rows = (NARROW_TILE_TABLE if narrow else TILE_TABLE)[family]
    return rows[min(largest for largest in rows if batch <= largest)]


def row_tiles(row: dict, batch: int, d: int, multiprocessors: int) -> Tiles:
    """The tiles one TILE_TABLE row gives `batch` tokens of width `d`. The batch is padded to a
    power of two, and to 16 for tensor cores. The down kernel's split makes `down_per_sm` (a fraction
    too; 0: one program per column block) programs per multiprocessor over all its column blocks (at
    most MAX_SPLIT per column block); with `up_in_down`, whose programs each cover every column,
    `down_per_sm` programs per multiprocessor, each a slice of the list. A row with `first_per_sm` runs
    the first kernel on a fixed grid of that many programs per multiprocessor (`Tiles.first_programs`)."""
    fields = {key: value for key, value in row.items() if key not in ("down_per_sm", "first_per_sm")}
    padded = triton.next_power_of_2(batch)
    if row.get("up_in_down"):
        split = max(1, int(row["down_per_sm"] * multiprocessors))
    else:
        split = max(1, min(MAX_SPLIT, int(row["down_per_sm"] * multiprocessors) // triton.cdiv(d, row["block_d"])))
    first_programs = max(1, int(row["first_per_sm"] * multiprocessors)) if row.get("first_per_sm") else 0
    return Tiles(block_b=max(16, padded) if row["use_dot"] else padded, split=split, first_programs=first_programs,
                 **fields)
