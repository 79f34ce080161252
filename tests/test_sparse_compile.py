"""The sparse kernels compile for a Hopper GPU (sm_90) with the tiles it runs, on a machine without one.

Triton's CPU interpreter runs the kernels as Python, so it accepts code the GPU compiler rejects
(an unsupported construct, a layout it cannot lower). Compiling the real kernels for sm_90 here,
in a subprocess with the interpreter off, catches those before a GPU run does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import dataclasses
import importlib.util
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from relufy.sparse import kernels as K
from relufy.sparse.kernels.down import down_kernel
from relufy.sparse.kernels.gate_up import first_projection_kernel, persistent_first_projection_kernel
from relufy.sparse.kernels.up_down import up_down_kernel

FP32, I32 = ("acc_ptr",), ("index_ptr", "count_ptr", "state_ptr", "routes_ptr")
ALIGNED = ("N", "K", "D")  # multiples of 16 at the widths of the launches below, as the GPU launcher sees them


# with `aligned`, the pointers and ALIGNED sizes are marked 16-divisible, as Triton's launcher specialises
# them on a GPU: only then are loads vectorised, and pipelined into shared memory
def compile_for_hopper(kernel, constants, warps=4, stages=3, aligned=False):
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32 else "*i32" if name in I32 else "*bf16"
        else:
            signature[name] = "fp32" if name == "act_param" else "i32"
    names = list(signature)
    divisible = [name for name, kind in signature.items() if aligned and (kind.startswith("*") or name in ALIGNED)]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(key),): value for key, value in constants.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in divisible})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def launches():
    # the distinct tiles of every TILE_TABLE row of every GPU family at the Llama-2-7B width, and of every
    # NARROW_TILE_TABLE row at SmolLM2-135M's, for each batch of its class (up to 16 past the class below:
    # the padded batch is a kernel constant too)
    tiles = set()
    for table, width in ((K.TILE_TABLE, 4096), (K.NARROW_TILE_TABLE, 576)):
        for family, rows in table.items():
            below = 0
            for largest in sorted(rows):
                tiles |= {K.gpu_tiles(batch, width, 132, family)
                          for batch in range(below + 1, min(largest, below + 16) + 1)}
                below = largest
    return sorted(tiles, key=repr)


def compile_first(t, gated):
    # the first kernel of tiles `t`: the persistent one where a row asks for it (`first_per_sm`)
    constants = dict(GATED=gated, HAS_BIAS=False, ACT=K.FATRELU, DTYPE=tl.bfloat16, BLOCK_B=t.block_b,
                     BLOCK_N=t.block_n, BLOCK_K=t.block_k, USE_DOT=t.use_dot, PRECISION="tf32",
                     LAUNCH_DEPENDENTS=t.dependent_launch)
    if t.first_programs:
        return compile_for_hopper(persistent_first_projection_kernel, {**constants, "STAGES": t.stages},
                                  t.warps_first, t.stages, aligned=True)
    return compile_for_hopper(first_projection_kernel,
                              {**constants, "APPEND_SEM": "relaxed" if t.relaxed_append else "acq_rel"},
                              t.warps_first, t.stages)


def compile_down(t):
    return compile_for_hopper(down_kernel, dict(
        SPLIT=t.split, HAS_BIAS=True, HAS_ROUTES=True, BLOCK_B=t.block_b, CHUNK=t.chunk, BLOCK_D=t.block_d,
        USE_DOT=t.use_dot, PRECISION="tf32", AFTER_FIRST=t.dependent_launch), t.warps_down, t.stages_down)


for t in launches():
    compile_first(t, gated=True)
    print("compiled first", t)
    compile_down(t)
    print("compiled down", t)
    # "up in down": the row's own when it runs that way, else on the same row a gate-only first kernel
    # and list slices of 8 rows (16 for tensor cores)
    v = t if t.up_in_down else dataclasses.replace(t, up_in_down=True, chunk=16 if t.use_dot else 8, block_d=1024,
                                                    split=132, warps_down=8)
    compile_first(v, gated=False)
    compile_for_hopper(up_down_kernel, dict(
        SPLIT=v.split, HAS_UP_BIAS=True, HAS_BIAS=True, HAS_ROUTES=True, BLOCK_B=v.block_b, CHUNK=v.chunk,
        BLOCK_K=v.block_k, BLOCK_D=v.block_d, USE_DOT=v.use_dot, PRECISION="tf32", AFTER_FIRST=v.dependent_launch),
        v.warps_down, v.stages_down)
    print("compiled up in down", v)
print("launches", len(launches()))
# the sweep's control for the persistent candidates: one program per block with a relaxed append
compile_first(dataclasses.replace(launches()[0], relaxed_append=True), gated=True)
print("compiled relaxed append")
# the second kernel as the first's programmatic dependent (`dependent_launch`): the first kernel lets it
# launch, the down kernel waits for the first's results, in the PTX as grid dependency control
t = dataclasses.replace(launches()[0], dependent_launch=True)
assert "griddepcontrol.launch_dependents" in compile_first(t, gated=True).asm["ptx"]
assert "griddepcontrol.wait" in compile_down(t).asm["ptx"]
assert "griddepcontrol" not in compile_down(launches()[0]).asm["ptx"]
print("compiled dependent launch")

# the persistent first kernel, in no table row yet: the distinct first-kernel tiles of the sweep's candidates
# (bench/sparse_ffn.py, persistent_first_rows) at one and four tokens, gated and gate-only ("up in down"),
# aligned as on a GPU: at more than one stage the gate loads must be pipelined through shared memory
spec = importlib.util.spec_from_file_location("bench_sparse_ffn", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
persistent = {K.row_tiles(row, batch, 4096, 132) for family in K.TILE_TABLE for batch in (1, 4)
              for row in bench.persistent_first_rows({**K.table_row(family, batch), "up_in_down": False}, batch)}
first_tiles = {(t.block_b, t.block_n, t.block_k, t.use_dot, t.warps_first, t.stages): t for t in persistent}
first_tiles = [first_tiles[key] for key in sorted(first_tiles)]  # one launch per distinct first-kernel tiles
for t, gated in [(t, True) for t in first_tiles] + [(first_tiles[0], False)]:
    compiled = compile_first(t, gated)
    assert ("async_copy_global_to_local" in compiled.asm["ttgir"]) == (t.stages > 1), t
    print("compiled persistent", t, gated)
print("persistent", len(first_tiles) + 1)
"""


def test_both_kernels_compile_for_sm90_with_every_row_of_the_tile_table(tmp_path):
    """Every row of every GPU family: the first kernel's tiles and the down kernel's (columns, rows per
    step, split, warps, stages), and the "up in down" pair (gate-only first kernel, `up_down_kernel`)
    on each row's first-kernel tiles; and the persistent first kernel on the sweep's candidate tiles."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
    bench = Path(__file__).resolve().parents[1] / "bench" / "sparse_ffn.py"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(bench)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    launches = int(done.stdout.split("launches ")[1].split()[0])
    assert launches >= 3 and done.stdout.count("compiled first") == done.stdout.count("compiled down") == launches
    assert done.stdout.count("compiled up in down") == launches and "compiled relaxed append" in done.stdout
    persistent = int(done.stdout.split("persistent ")[-1])
    assert persistent >= 10 and done.stdout.count("compiled persistent") == persistent
