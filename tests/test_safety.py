"""Nothing the user owns is destroyed: --force replaces only outputs relufy marked, no output is, holds or lies
inside an input of its command, and one relufy process at a time writes an output."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_TEXT
from tiny_models import save_tiny_checkpoint

from relufy.atomic import MARKER, check_output, claim_output, output_lock, signed, written_by_relufy
from relufy.cli import main
from relufy.errors import OutputExistsError, OutputInUseError

TINY_RECIPE = REPO / "recipes" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def owned(tmp_path_factory) -> Path:
    """A user's folder: a model beside a sibling model, text data, a results file and a folder of notes."""
    root = tmp_path_factory.mktemp("owned")
    save_tiny_checkpoint("llama", root / "models" / "tiny", SAMPLE_TEXT)
    (root / "models" / "sibling").mkdir()
    (root / "models" / "sibling" / "model.safetensors").write_bytes(b"the user's other model")
    (root / "data.txt").write_text(SAMPLE_TEXT.read_text())
    (root / "results.json").write_text(json.dumps({"model": "tiny", "activation": "relu", "overall": 0.5}))
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("keep me")
    return root


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` (lock files aside) by its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".relufy-lock")}


def command(name: str, root: Path, out: Path) -> list[str]:
    """`relufy NAME` with its inputs inside `root` and its output at `out`, always with --force."""
    model, data, results = root / "models" / "tiny", root / "data.txt", root / "results.json"
    argv = {
        "convert": ["convert", model, out],
        "evaluate": ["evaluate", model, "-o", out, "--limit", "1", "--p", "none"],
        "publish": ["publish", model, "--results", results, "--out", out],
        "speed": ["speed", model, "-o", out, "--device", "cpu"],
        "matched": ["matched", model, "--target", "0.5", "-o", out, "--device", "cpu", "--no-suite"],
        "sparsity": ["sparsity", model, "--data", data, "-o", out, "--device", "cpu"],
        "compare": ["compare", results, "--markdown", out],
        "train": ["train", TINY_RECIPE, "--set", f"model_name_or_path={model}", "--set", f"data={data}",
                  "--set", f"output_dir={out}"],
    }[name]
    return [str(arg) for arg in argv] + ["--force"]


COMMANDS = ["convert", "evaluate", "publish", "speed", "matched", "sparsity", "compare", "train"]
TARGETS = {
    "input": lambda root, name: root / "results.json" if name == "compare" else root / "models" / "tiny",
    "parent of an input": lambda root, name: root if name == "compare" else root / "models",
    "unmarked folder": lambda root, name: root / "notes",
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", COMMANDS)
def test_force_onto_an_input_its_parent_or_a_folder_relufy_did_not_write_is_refused(owned, capsys, name, target):
    before = digest(owned)
    capsys.readouterr()
    assert main(command(name, owned, TARGETS[target](owned, name))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"relufy {name}: error: ") and "\n" not in err
    reason = {"input": "input", "parent of an input": "contains the input",
              "unmarked folder": "relufy did not write" if name in ("convert", "evaluate", "publish", "train")
              else "is a folder"}[target]
    assert reason in err
    assert digest(owned) == before, "the user's files must stay as they were"


def test_convert_force_replaces_its_own_output_and_marks_it(tmp_path, owned):
    out = tmp_path / "out"
    assert main(command("convert", owned, out)) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "relufy convert" and {"version", "created"} <= set(marker)
    (out / "config.json").write_text("{}")  # the old conversion: replaced, not merged
    assert main(command("convert", owned, out)) == 0
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "relu"


def test_an_empty_folder_is_an_output_without_force_and_a_symlink_to_an_input_is_the_input(tmp_path, owned):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", force=False) == (tmp_path / "empty").resolve()
    (tmp_path / "link").symlink_to(owned / "models")
    with pytest.raises(OutputExistsError, match="contains the input"):
        check_output(tmp_path / "link", force=True, inputs=[owned / "models" / "tiny"])
    with pytest.raises(OutputExistsError, match="inside the input"):
        check_output(tmp_path / "link" / "tiny" / "eval", force=True, inputs=[owned / "models" / "tiny"])


@pytest.mark.parametrize("content", [{"overall": 0.5}, "| a | b |\n| --- | --- |"])
def test_force_replaces_a_single_file_only_when_relufy_signed_it(tmp_path, content):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(content) if isinstance(content, dict) else content)
    with pytest.raises(OutputExistsError, match="is a file relufy did not write; choose another output or remove"):
        check_output(mine, force=True, kind="file")
    ours = tmp_path / "ours.md"
    ours.write_text(signed(content, "relufy compare"))
    assert written_by_relufy(ours)
    with pytest.raises(OutputExistsError, match="exists; pass --force"):
        check_output(ours, force=False, kind="file")
    assert check_output(ours, force=True, kind="file") == ours.resolve()


def test_compare_markdown_is_signed_and_replaced_only_with_force(tmp_path, owned, capsys):
    out = tmp_path / "compare.md"
    argv = ["compare", str(owned / "results.json"), "--markdown", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out.strip()
    assert out.read_text().startswith(table + "\n") and written_by_relufy(out)
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0


def test_train_refuses_an_output_dir_that_holds_its_recipe(tmp_path, owned):
    recipe = tmp_path / "run" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(TINY_RECIPE.read_text())
    argv = ["train", str(recipe), "--set", f"model_name_or_path={owned / 'models' / 'tiny'}",
            "--set", f"data={owned / 'data.txt'}", "--set", f"output_dir={tmp_path / 'run'}", "--force"]
    assert main(argv) == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.yaml"]


# -- one writer at a time -------------------------------------------------------------------------
HOLDER = """
import sys
from relufy.atomic import output_lock
with output_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until the test answers
"""


@pytest.fixture
def held(tmp_path):
    """Run a process that holds an output's lock until the test lets it go; yields (start, process)."""
    procs = []

    def start(out: Path, command: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:  # not let go by the test itself
            proc.communicate("\n", timeout=60)


def test_a_second_convert_to_a_locked_output_stops_naming_the_holder(tmp_path, owned, held, capsys):
    out = tmp_path / "out"
    holder = held(out, "relufy convert")
    capsys.readouterr()
    assert main(command("convert", owned, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"relufy convert: error: {out} is in use by relufy PID {holder.pid} (relufy convert); "
                   "wait for it or choose another output")
    assert not out.exists()
    holder.communicate("\n", timeout=60)  # the first writer is done: the output is free again
    assert main(command("convert", owned, out)) == 0


def test_a_second_train_into_a_running_output_dir_stops_at_once(tmp_path, owned, held, capsys):
    run = tmp_path / "run"
    holder = held(run, "relufy train")
    argv = command("train", owned, run)[:-1]  # without --force
    capsys.readouterr()
    assert main(argv) == 2
    assert f"in use by relufy PID {holder.pid} (relufy train)" in capsys.readouterr().err
    assert not run.exists()


def test_the_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path, held):
    held(tmp_path / "out.json", "relufy sparsity")
    with pytest.raises(OutputInUseError, match=r"in use by relufy PID \d+ \(relufy sparsity\)"):
        with output_lock(tmp_path / "out.json", "relufy speed"):
            pass
    with claim_output(tmp_path / "mine", command="relufy evaluate", force=False):
        with output_lock(tmp_path / "mine", "relufy evaluate"):  # the same process writing what it claimed
            pass
