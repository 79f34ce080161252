"""bench/vllm_latency.py without vLLM: its ratios, table and summary from per-arm JSONs (fake ones and the
H200 run in docs/results/serving/h200), the command line and environment of each arm, resuming, a failing
arm, and the one-line error for a missing model folder."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, load_script

bench = load_script("bench/vllm_latency.py", "bench_vllm_latency")
H200 = REPO / "docs" / "results" / "serving" / "h200"


def write_arm(folder, arm, batch, seconds):
    """A per-arm JSON shaped like `vllm bench latency --output-json`'s."""
    latencies = [seconds] * 10
    percentiles = {p: seconds for p in ("10", "25", "50", "75", "90", "99")}
    (folder / f"vllm-{arm}-b{batch}.json").write_text(json.dumps(
        {"avg_latency": seconds, "latencies": latencies, "percentiles": percentiles}))


def test_ratios_and_table_from_per_arm_jsons(tmp_path):
    for arm, seconds in (("sparse", 0.91), ("dense", 1.2), ("silu", 1.23)):
        write_arm(tmp_path, arm, 1, seconds)
    write_arm(tmp_path, "sparse", 4, 1.0)  # an arm missing at batch 4: its ratios are None, its cells "-"
    (tmp_path / "vllm-other.json").write_text("{}")  # not a per-arm JSON: ignored
    summary = bench.summarize(bench.read_latencies(tmp_path), output_len=256)
    one, four = summary["rows"]
    assert one["batch"] == 1 and one["latency_s"] == {"sparse": 0.91, "dense": 1.2, "silu": 1.23}
    assert one["sparse_speedup"] == pytest.approx(1.2 / 0.91)
    assert one["dense_vs_silu"] == pytest.approx(1.23 / 1.2)
    assert one["ms_per_token"]["sparse"] == pytest.approx(1000 * 0.91 / 256)
    assert four["latency_s"] == {"sparse": 1.0, "dense": None, "silu": None}
    assert four["sparse_speedup"] is None and four["dense_vs_silu"] is None
    lines = bench.table(summary).splitlines()
    assert "256 new tokens" in lines[0]
    assert lines[2].split() == ["1", "0.910", "1.200", "1.230", "3.555", "4.688", "4.805", "1.319x", "1.025x"]
    assert lines[3].split() == ["4", "1.000", "-", "-", "3.906", "-", "-", "-", "-"]


def test_the_h200_run_gives_its_summary_txt():
    """The table of docs/results/serving/h200 is the one the measurement printed there: 1.333x / 1.002x at batch 1."""
    summary = bench.summarize(bench.read_latencies(H200), output_len=256)
    first = summary["rows"][0]
    assert (first["batch"], round(first["sparse_speedup"], 3), round(first["dense_vs_silu"], 3)) == (1, 1.333, 1.002)
    assert bench.table(summary) + "\n" == (H200 / "summary.txt").read_text()
    assert bench.vllm_version(H200) == "0.26.0"  # what the engine prints in each log


def test_summarize_only_writes_the_summary_of_a_folder(tmp_path, capsys):
    folder = shutil.copytree(H200, tmp_path / "h200")
    (folder / "summary.txt").unlink()
    assert bench.main(["--summarize-only", "--out", str(folder), "--device", "NVIDIA H200",
                       "--torch-version", "2.11.0+cu130"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["device"], summary["torch"], summary["vllm"]) == ("NVIDIA H200", "2.11.0+cu130", "0.26.0")
    assert [row["batch"] for row in summary["rows"]] == [1, 4, 8] and "settings" not in summary
    assert (folder / "summary.txt").read_text() == (H200 / "summary.txt").read_text()
    assert "1.333x" in capsys.readouterr().out
    # not passed: not known (the logs name neither the GPU nor torch)
    assert bench.main(["--summarize-only", "--out", str(folder)]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["device"], summary["torch"]) == (None, None)
    assert bench.main(["--summarize-only", "--out", str(tmp_path / "empty")]) == 2


def test_a_missing_model_folder_is_one_line_naming_decode_speed(tmp_path, capsys):
    (tmp_path / "model" / "fatrelu").mkdir(parents=True)
    (tmp_path / "model" / "fatrelu" / "config.json").write_text("{}")
    code = bench.main(["--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"no model in {tmp_path / 'model' / 'silu'}" in err
    assert f"python bench/decode_speed.py --save-folder {tmp_path / 'model'}" in err
    assert not (tmp_path / "out").exists()
    # the sparse and dense arms alone need only fatrelu/ (then whether vLLM is installed is checked)
    assert "no model" not in (bench.missing_input(tmp_path / "model", ["sparse", "dense"]) or "")
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(tmp_path)])  # --model-dir is required for a run


def test_each_arm_command_and_environment(tmp_path):
    args = bench.parse_args(["--model-dir", "m", "--out", str(tmp_path), "--input-len", "64", "--output-len", "32",
                             "--iters", "5", "--warmup", "2", "--gpu-memory-utilization", "0.5"])
    command = bench.arm_command("dense", 4, args)
    assert command[:5] == [bench.sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "latency"]
    assert command[5:] == ["--model", "m/fatrelu", "--skip-tokenizer-init", "--disable-detokenize",
                           "--batch-size", "4", "--input-len", "64", "--output-len", "32", "--num-iters-warmup", "2",
                           "--num-iters", "5", "--gpu-memory-utilization", "0.5",
                           "--output-json", str(tmp_path / "vllm-dense-b4.json")]
    assert bench.arm_command("sparse", 1, args)[6] == "m/fatrelu" and bench.arm_command("silu", 1, args)[6] == "m/silu"
    base = {"PATH": "/bin", "RELUFY_VLLM_SPARSE": "0"}  # left in the shell: must not turn the sparse arm dense
    envs = {arm: bench.arm_env(arm, tmp_path, base) for arm in bench.ARMS}
    assert envs["dense"]["RELUFY_VLLM_SPARSE"] == "0"
    assert "RELUFY_VLLM_SPARSE" not in envs["sparse"] and "RELUFY_VLLM_SPARSE" not in envs["silu"]
    assert all(env["PATH"] == "/bin" for env in envs.values())
    roots = {env["VLLM_CACHE_ROOT"] for env in envs.values()}
    assert roots == {str((tmp_path / "vllm-cache" / arm).resolve()) for arm in bench.ARMS}


def test_a_run_resumes_and_reports_a_failed_arm(tmp_path, monkeypatch, capsys):
    """Arms with a JSON are skipped, the others run (here a fake vLLM), a failing one prints its log's tail and
    the run exits 1 with the summary of the rest written."""
    calls = []

    def fake_vllm(command, env, stdout, stderr):
        output = Path(command[command.index("--output-json") + 1])
        arm = output.name.split("-")[1]
        assert (env.get("RELUFY_VLLM_SPARSE") == "0") == (arm == "dense")
        calls.append(arm)
        if arm == "silu":
            stdout.write("".join(f"line {i}\n" for i in range(40)) + "RuntimeError: out of memory\n")
            return subprocess.CompletedProcess(command, 1)
        output.write_text(json.dumps({"avg_latency": 0.9}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench, "missing_input", lambda model_dir, arms: None)
    monkeypatch.setattr(bench.subprocess, "run", fake_vllm)
    write_arm(tmp_path, "sparse", 1, 0.91)
    code = bench.main(["--model-dir", str(tmp_path / "m"), "--out", str(tmp_path), "--batch-sizes", "1"])
    out = capsys.readouterr()
    assert code == 1 and calls == ["dense", "silu"]
    assert "sparse b1: done before" in out.out and "RuntimeError: out of memory" in out.out
    assert "line 39" in out.out and "line 10\n" not in out.out  # the tail only
    assert "failed: silu b1" in out.err and not (tmp_path / "vllm-silu-b1.json").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"][0]["latency_s"] == {"sparse": 0.91, "dense": 0.9, "silu": None}
    assert summary["settings"]["iters"] == 10 and summary["device"] == "cpu"
    calls.clear()
    assert bench.main(["--model-dir", str(tmp_path / "m"), "--out", str(tmp_path), "--batch-sizes", "1",
                       "--arms", "sparse", "--force"]) == 0
    assert calls == ["sparse"]  # --force runs an arm whose JSON exists again
