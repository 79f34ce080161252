"""Every bench/ script runs end to end on the CPU with a tiny model and writes the JSON keys it promises.

README quotes numbers from these scripts; a refactor of the library must not silently break the
command that reproduces them. Each run is a few steps on a 2-layer model, so the ratios printed
mean nothing here: only that the script still works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def run_bench(script: str, *args: str, cwd: Path = REPO) -> str:
    """Run bench/`script` with this interpreter, offline; return its stdout, failing with its stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-4000:]}"
    return done.stdout


def test_every_bench_script_has_a_smoke_test():
    tested = {"convert.py", "train_overhead.py", "lora_vs_full.py", "probe_host_cost.py", "probe_overhead.py",
              "sparse_ffn.py", "decode_speed.py", "distill_overhead.py", "vllm_latency.py", "sparse_host_cost.py",
              "down_layout.py"}
    assert {path.name for path in BENCH.glob("*.py")} == tested


def test_convert_bench_tiny(tmp_path):
    out = tmp_path / "convert.json"
    stdout = run_bench("convert.py", "--size", "tiny", "--layers", "2", "--repeats", "1",
                       "--workdir", str(tmp_path / "work"), "--json", str(out))
    result = json.loads(out.read_text())
    assert {"size", "layers", "checkpoint_bytes", "copy_s", "convert_s", "ratio", "peak_rss_mb"} <= result.keys()
    assert result["checkpoint_bytes"] > 0 and result["ratio"] > 0
    assert "ratio convert/copy" in stdout
    assert not (tmp_path / "work").exists()  # the benchmark cleans up its checkpoints


def test_train_overhead_tiny(tmp_path):
    out = tmp_path / "overhead.json"
    stdout = run_bench("train_overhead.py", "--model", "tiny", "--steps", "2", "--warmup", "1",
                       "--order", "plain", "prosparse", "--json", str(out))
    (result,) = json.loads(out.read_text())
    assert {"model", "plain", "prosparse", "ratio", "ratio_median", "device", "params"} <= result.keys()
    assert result["device"] == "cpu" and result["ratio"] > 0
    assert {"step_s", "tokens_per_s", "mfu", "peak_mem_gib"} <= result["plain"][0].keys()
    assert "overhead ratio" in stdout


def test_distill_overhead_tiny(tmp_path):
    out = tmp_path / "distill.json"
    stdout = run_bench("distill_overhead.py", "--tiny", "--order", "plain", "distill", "--json", str(out))
    result = json.loads(out.read_text())
    assert {"device", "model", "runs", "ratio", "ratio_median", "memory_ratio", "loss", "fused"} <= result.keys()
    assert result["device"] == "cpu" and result["model"] == "tiny" and result["ratio"] > 0
    assert result["memory_ratio"] is None  # no allocator statistics on the CPU
    assert {"step_s", "tokens_per_s", "peak_mem_gib"} <= result["runs"]["distill"][0].keys()
    assert "step time distill / plain" in stdout


def test_lora_vs_full_tiny(tmp_path):
    out = tmp_path / "lora.json"
    stdout = run_bench("lora_vs_full.py", "--model", "tiny", "--steps", "2", "--warmup", "1",
                       "--order", "full", "lora", "lora-plain", "--json", str(out))
    result = json.loads(out.read_text())
    assert {"runs", "spread", "memory_ratio", "l1_overhead_ratio", "l1_overhead_ratio_median"} <= result.keys()
    assert set(result["runs"]) == {"full", "lora", "lora-plain"}
    assert result["l1_overhead_ratio"] > 0
    assert result["memory_ratio"] is None  # no allocator statistics on the CPU
    # LoRA trains far fewer weights than full training of the same model
    assert result["runs"]["lora"][0]["trainable_params"] < result["runs"]["full"][0]["trainable_params"]
    assert "lora-plain" in stdout


def test_probe_host_cost_tiny(tmp_path):
    out = tmp_path / "host.json"
    run_bench("probe_host_cost.py", "--layers", "2", "--steps", "5", "--json", str(out))
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    assert {"plain_s", "tapped_s", "ratio", "host_cost_us_per_layer"} <= result["rounds"][0].keys()


def test_probe_overhead_tiny(tmp_path, silu_base):
    out = tmp_path / "probe.json"
    stdout = run_bench("probe_overhead.py", "--model", str(silu_base), "--limit", "2", "--rounds", "1",
                       "--batch-size", "2", "--heldout-tokens", "128", "--block-size", "32", "--json", str(out))
    result = json.loads(out.read_text())
    assert {"ratio", "without_probe_s", "with_probe_s", "probe_tokens", "ppl_search", "forward_passes"} <= result.keys()
    assert result["probe_tokens"] > 0
    assert set(result["ppl_search"]) == {"1", "5", "10"}
    assert "PPL-p% total" in stdout


def test_sparse_ffn_tiny(tmp_path):
    out = tmp_path / "sparse_ffn.json"
    stdout = run_bench("sparse_ffn.py", "--tiny", "--batches", "1,2", "--routing-batches", "2", "--output", str(out))
    result = json.loads(out.read_text())
    assert {"device", "copy_bandwidth_gb_s", "rows", "calibration"} <= result.keys()
    (one, two, routed) = result["rows"]
    assert {"dense_us", "sparse_us", "sparse_over_dense", "floor_us", "union_active"} <= one.keys()
    assert all(row["max_rel_error"] < 1e-5 for row in result["rows"])
    assert two["union_active"] >= one["union_active"]
    assert routed["union_active"] > 0.5 and routed["dense_route_calls"] == 2  # above N / 2
    assert one["dense_route_calls"] == 0
    assert "| shape | zeros | batch |" in stdout
    assert run_bench("sparse_ffn.py", "--table", str(out)).strip() in stdout  # the same tables from the JSON


def test_sparse_host_cost_tiny(tmp_path):
    out = tmp_path / "host.json"
    stdout = run_bench("sparse_host_cost.py", "--tiny", "--json", str(out))
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["shape"] == "tiny" and result["device"] == "cpu" and result["batch"] == 1
    for arm in ("dense", "sparse"):
        assert {"host_us", "wall_us", "device_us", "host_us_range", "wall_us_range"} <= row[arm].keys()
        assert 0 < row[arm]["host_us"] <= row[arm]["wall_us"]
    assert row["sparse_over_dense"].keys() == {"host_us", "wall_us", "device_us"} and "extra_host_us" in row
    assert "| tiny | sparse/dense |" in stdout and "extra host time per sparse FFN call" in stdout
    # the interpreter runs eager calls sparse: no default eager call that runs dense to time (a GPU's third arm)
    assert "eager_dense" not in row and row["eager_check_us"] is None and "eager check" not in stdout
    from conftest import load_script

    table = load_script("bench/sparse_host_cost.py", "bench_sparse_host_cost").table
    row["eager_dense"], row["eager_check_us"] = {**row["dense"], "device_us": None}, 0.4
    assert "| tiny | eager_dense |" in table(result) and "over a dense call: tiny +0.4 us" in table(result)


def test_down_layout_tiny(tmp_path):
    out = tmp_path / "down_layout.json"
    stdout = run_bench("down_layout.py", "--tiny", "--output", str(out))
    result = json.loads(out.read_text())
    (shape,) = result["shapes"]
    assert shape["shape"] == "tiny" and [row["tokens"] for row in shape["rows"]] == [1, 4]
    for row in shape["rows"]:
        assert row["down_max_abs_difference"] < 1e-4  # the same values in both layouts
        for part in ("down", "ffn"):
            times = row[part]
            assert times["row_major_us"] > 0 and times["transposed_view_us"] > 0
            assert times["view_over_row_major"] == times["transposed_view_us"] / times["row_major_us"]
    assert "| tiny | 4 |" in stdout


def test_down_layout_refuses_unknown_shapes_and_token_counts():
    for args, message in ((["--shapes", "tiny,nope"], "unknown shape 'nope'"),
                          (["--tokens", "1,0"], "--tokens 1,0: pass positive whole numbers")):
        done = subprocess.run([sys.executable, str(BENCH / "down_layout.py"), *args], capture_output=True, text=True,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=60)
        assert done.returncode == 2 and message in done.stderr


def test_decode_speed_tiny(tmp_path):
    out = tmp_path / "decode.json"
    stdout = run_bench("decode_speed.py", "--tiny", "--profile-steps", "2", "--dependent-launch", "on",
                       "--output", str(out))
    result = json.loads(out.read_text())
    assert result["dependent_launch"] == "on"  # the interpreter launches a dependent row plainly: same tokens
    assert {"decode", "generate", "ffn", "sparsity", "fatrelu_threshold", "bandwidth_limit_tokens_per_s"} <= result.keys()
    assert [row["batch_size"] for row in result["decode"]] == [1, 2]
    assert result["sparse_ffns"] == 2 and all(row["token_match"] == 1.0 for row in result["decode"])
    assert 0.8 < result["sparsity"]["overall"] < 1.0  # the threshold was set for 90% zeros
    assert [entry["batch_size"] for entry in result["profile"]] == [1, 2] and result["config"]["profile_steps"] == 2
    assert all(entry["sparse"]["kernels_per_step"] > 0 and entry["diff"] for entry in result["profile"])
    assert "sparse/dense" in stdout and "Kernels whose time per step differs most, batch 2" in stdout


def test_decode_speed_refuses_a_bad_count_in_one_line_before_building_the_model(tmp_path):
    out = tmp_path / "decode.json"
    done = subprocess.run([sys.executable, str(BENCH / "decode_speed.py"), "--tiny", "--generate-tokens", "0",
                           "--output", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "decode_speed.py: --generate-tokens must be an integer from 1 to 16777216, got 0"
    assert not out.exists()


def test_decode_speed_saves_the_model_for_serving(tmp_path):
    """--save-folder writes the FATReLU model and its SiLU twin (same weights) for vllm bench latency."""
    from safetensors.torch import load_file

    from relufy.checkpoint import read_config

    run_bench("decode_speed.py", "--tiny", "--save-folder", str(tmp_path))
    fatrelu, silu = tmp_path / "fatrelu", tmp_path / "silu"
    assert read_config(fatrelu)["hidden_act"].startswith("fatrelu_") and read_config(silu)["hidden_act"] == "silu"
    weights, twin = load_file(fatrelu / "model.safetensors"), load_file(silu / "model.safetensors")
    assert weights.keys() == twin.keys() and all(weights[name].equal(twin[name]) for name in weights)


def test_vllm_latency_summarize_only(tmp_path):
    """Without vLLM, vllm_latency.py can only summarize a measured folder; the rest of it is in
    test_vllm_latency_bench.py."""
    import shutil

    folder = shutil.copytree(REPO / "docs" / "results" / "serving" / "h200", tmp_path / "h200")
    stdout = run_bench("vllm_latency.py", "--summarize-only", "--out", str(folder))
    assert "1.333x" in stdout and json.loads((folder / "summary.json").read_text())["vllm"] == "0.26.0"


def test_sparse_ffn_sweep_tiles_tiny(tmp_path):
    """The sweep times both kernels' candidates, then "up in down" ones, then a dependent launch, and prints
    the tile table rows that give back the best tiles of each swept batch size (the largest as the class of
    every larger batch), saying which way each row runs, in the table for the swept width."""
    from relufy.sparse.kernels import Tiles, row_tiles

    out = tmp_path / "sweep.json"  # one weight copy, one timed call: an interpreted FFN call takes most of a second
    stdout = run_bench("sparse_ffn.py", "--tiny", "--sweep-tiles", "--batches", "1,2", "--layers", "1",
                       "--replays", "1", "--output", str(out))
    result = json.loads(out.read_text())
    sweep = result["sweep"]["2"]
    assert len(sweep["candidates"]) >= 4
    last = sweep["candidates"][-1]
    assert {**last, "max_rel_error": None} == {**sweep["best"], **sweep["best_tiles"], "us": sweep["best_us"],
                                               "max_rel_error": None}
    # every candidate was checked against the dense FFN (float32 under the interpreter: close)
    assert all(c["max_rel_error"] < 1e-5 for batch in ("1", "2") for c in result["sweep"][batch]["candidates"])
    assert "left out" not in stdout
    assert result["profile"] == {}  # the per-kernel profile needs CUDA
    for batch in ("1", "2"):  # the candidate rows (not the default tiles' timing): both ways of running
        rows = [c for c in result["sweep"][batch]["candidates"] if "down_per_sm" in c]
        assert {row["up_in_down"] for row in rows} == {False, True}
        # the persistent candidates' control: one program per block with a relaxed append
        assert any(row["relaxed_append"] and not row["first_programs"] for row in rows)
        # the last stage: the best row with its second kernel launched as the first's dependent
        assert any(row["dependent_launch"] for row in rows)
    text = run_bench("sparse_ffn.py", "--table", str(out)).strip()
    assert text in stdout and text.count("up_in_down=") == 2
    table = {}
    assert text.startswith("NARROW_TILE_TABLE[")  # the tiny shape is 64 wide: rows for narrow FFNs
    exec(text, {"NARROW_TILE_TABLE": table})  # the statement as it would be pasted into tiles.py
    (rows,) = table.values()
    assert sorted(rows) == [1, 1 << 30]
    for batch, key in ((1, 1), (2, 1 << 30)):  # the tiny shape is 64 wide; off CUDA, 4 multiprocessors
        assert row_tiles(rows[key], batch, 64, 4) == Tiles(**result["sweep"][str(batch)]["best_tiles"])


def test_sparse_ffn_sweep_leaves_out_a_candidate_off_the_dense_ffn(capsys):
    """A fast but wrong candidate must not become a row to paste: the sweep records each candidate's
    error against the dense FFN, and one above 1e-2 is never the best, however fast, and is printed."""
    import torch

    from conftest import load_script
    from relufy.sparse.kernels.launch import interpreted

    bench = load_script("bench/sparse_ffn.py", "bench_sparse_ffn")
    ffn = bench.RandomFFN(64, 96, 2, torch.float32, torch.device("cpu" if interpreted() else "cuda"))
    right, called = ffn.sparse, []

    def sparse(layer, x, threshold, tiles, *args, **kwargs):  # the persistent candidates: twice the output
        called.append(tiles)
        out = right(layer, x, threshold, tiles, *args, **kwargs)
        return 2 * out if tiles.first_programs else out

    # the persistent candidates: the fastest. The candidate is not run again: its error check has just run it
    # (`called[-1]`), and each interpreted call takes most of a second; test_sparse_ffn_sweep_tiles_tiny times them
    def timer(call):
        return 1e-9 if called[-1].first_programs else 1e-3

    ffn.sparse = sparse
    report = bench.sweep_tiles(ffn, [1], timer, save=lambda: None, limit=2)[1]
    wrong = [c for c in report["candidates"] if c["first_programs"]]
    assert len(wrong) == 2 and all(c["max_rel_error"] > 0.5 and c["us"] < 1e-2 for c in wrong)
    assert all(c["max_rel_error"] < 1e-5 for c in report["candidates"] if not c["first_programs"])
    assert "first_per_sm" not in report["best"] and abs(report["best_us"] - 1e6 * 1e-3 / 2) < 1e-6
    assert capsys.readouterr().out.count("left out") == 2
