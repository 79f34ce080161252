"""Distributed runs on CPU: the shipped DeepSpeed ZeRO-2/ZeRO-3 configs under `accelerate launch`, and DDP.

DeepSpeed 0.19 trains on CPU (its CPU accelerator, gloo plus a shared-memory op it compiles once
into ~/.cache/torch_extensions). One process; the configs are the ones users launch with.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from relufy.recipe import load_recipe

pytest.importorskip("deepspeed")
ACCELERATE = Path(sys.executable).parent / "accelerate"


def launch(config: str, base: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch` on a free port (0: accelerate picks one), not its default 29500, which under
    `make test`'s parallel workers another launch may be taking at the same moment. (torchrun without a
    port already rendezvouses on a free one.)"""
    command = [str(ACCELERATE), "launch", "--config_file", str(REPO / "recipes" / "accelerate" / config),
               "--num_processes", "1", "--main_process_port", "0",
               "-m", "relufy", "train", str(REPO / "recipes" / "tiny-cpu.yaml"),
               "--set", f"model_name_or_path={base}", "--set", "model_config_overrides={}",
               "--set", "block_size=32", "--set", f"output_dir={out}", "--set", "max_steps=4",
               "--set", "save_steps=2", "--set", "threshold_eval_tokens=256", "--set", "threshold_search_steps=2",
               *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def check_run(result: subprocess.CompletedProcess, out: Path, steps: int = 4) -> list[dict]:
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"wrote {out} after {steps} steps" in result.stdout
    assert (out / f"checkpoint-{steps}" / f"global_step{steps}").is_dir(), "not saved by the DeepSpeed engine"
    schedule = load_recipe(REPO / "recipes" / "tiny-cpu.yaml").schedule
    logged = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == list(range(1, steps + 1))
    for entry in logged:
        assert entry["l1_lambda"] == pytest.approx(schedule.lambda_at(entry["step"]))
        assert entry["l1_loss"] > 0 and 0 < entry["activation_sparsity"] < 1
    assert (out / "model.safetensors").is_file() and (out / "training_curves.png").is_file()
    return logged


def test_zero2_trains_the_tiny_recipe_with_the_l1_schedule(silu_base, tmp_path):
    out = tmp_path / "zero2"
    result = launch("zero2.yaml", silu_base, out, "--set", "threshold_shift=false")
    check_run(result, out)


def test_zero3_trains_partitioned_and_applies_the_threshold_shift(silu_base, tmp_path):
    out = tmp_path / "zero3"
    result = launch("zero3.yaml", silu_base, out, "--set", "threshold_shift=true",
                    "--set", "threshold_max_ppl_increase=0.05")
    check_run(result, out)
    config = json.loads((out / "config.json").read_text())
    shift = config["relufy"]["threshold_shift"]
    assert shift["perplexity_after"] <= shift["perplexity_before"] * 1.05
    assert "threshold" in shift and config["relufy"]["training"]["steps"] == 4


def test_two_process_ddp_reduces_the_logged_terms_across_ranks(silu_base, tmp_path):
    """torchrun with 2 CPU processes (gloo): logging reduces over ranks and nothing hangs."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "relufy", "train",
               str(REPO / "recipes" / "tiny-cpu.yaml"), "--set", f"model_name_or_path={silu_base}",
               "--set", "model_config_overrides={}", "--set", "block_size=32", "--set", f"output_dir={out}",
               "--set", "max_steps=4", "--set", "save_steps=2", "--set", "logging_steps=2",
               "--set", "ddp_backend=gloo", "--set", "threshold_shift=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(f"wrote {out} after 4 steps") == 1  # rank 0 alone reports
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == [2, 4]
    assert all(0 < e["activation_sparsity"] < 1 and e["l1_loss"] > 0 for e in logged)
