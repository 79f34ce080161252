"""Outputs are complete or absent (errors, Ctrl-C, SIGTERM), stale temp folders are swept, modes follow the
umask."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from relufy.activations import make_activation
from relufy.atomic import atomic_directory, move_into, temp_sibling, write_json_atomically, write_text_atomically
from relufy.convert import convert_checkpoint

# Runs `relufy convert` with a copy step that announces itself and then waits to be signalled.
WAITING_CONVERT = """
import signal, sys
import relufy.convert

def copy(src, dst, link):
    (dst / "model.safetensors").write_bytes(b"half")
    print("copying", flush=True)
    signal.pause()

relufy.convert.copy_checkpoint = copy
from relufy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_convert_exits_130_and_removes_the_temp_folder(tmp_path, tiny):
    proc = subprocess.Popen([sys.executable, "-c", WAITING_CONVERT, "convert", str(tiny), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "copying"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip() == "relufy convert: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.relufy-lock", "src"]  # the lock file stays, empty


def test_temp_folders_left_by_dead_processes_are_swept_and_live_ones_kept(tmp_path, tiny):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.{finished.stdout.strip()}.k2j4hd8s.relufy-tmp"  # killed with kill -9, say
    legacy = tmp_path / ".out.x7q2m9zz.relufy-tmp"  # the older name, without a pid
    live = tmp_path / f".out.{os.getppid()}.a1b2c3d4.relufy-tmp"
    other = tmp_path / ".other.1.a1b2c3d4.relufy-tmp"  # another output's: not ours to judge
    for folder in (dead, legacy, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0" * 1000)
    convert_checkpoint(tiny, tmp_path / "out", make_activation("relu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", "out", live.name, other.name,
                                                                  ".out.relufy-lock"])


def test_written_files_follow_the_umask_like_cp(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", replace=False, command="test") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            (tmp / "model.safetensors").chmod(0o600)  # what safetensors' own temp file leaves
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_file_write_that_fails_leaves_neither_file_nor_temp_and_sweeps_a_dead_writers_temp(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".result.json.{finished.stdout.strip()}.k2j4hd8s.relufy-tmp"
    dead.write_text("half")
    with pytest.raises(TypeError):
        write_text_atomically(tmp_path / "result.json", None)  # fails inside the write
    assert list(tmp_path.iterdir()) == []  # the dead writer's temp swept, the failed one's removed
    write_text_atomically(tmp_path / "result.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_json_result_is_written_whole_or_not_at_all(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomically(str(tmp_path / "result.json"), {"step_s": object()})  # not JSON: nothing written
    assert list(tmp_path.iterdir()) == []
    write_json_atomically(str(tmp_path / "result.json"), {"ratio": 0.5, "runs": [1, 2]})
    assert json.loads((tmp_path / "result.json").read_text()) == {"ratio": 0.5, "runs": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_move_into_moves_a_finished_model_in_with_its_config_last(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-1").mkdir()
    tmp = temp_sibling(out / "final-model", shared=True)
    assert tmp.parent == out and tmp.name == ".final-model.relufy-tmp"
    tmp.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp / name).write_text(name)
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    move_into(tmp, out)
    assert moved[-1] == "config.json" and sorted(moved) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "config.json", "model.safetensors",
                                                    "tokenizer.json"]

