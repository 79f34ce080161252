"""The Makefile's install keeps a torch that is already in the venv and takes TORCH_SPEC for the one it installs."""

import shutil
import subprocess

import pytest
from conftest import REPO


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_install_keeps_an_installed_torch_and_takes_torch_spec(tmp_path):
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    plan = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}", f"TORCH_SPEC={spec}"],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout
    torch_lines = [line for line in plan.splitlines() if "torch" in line]
    assert torch_lines == [f'{tmp_path}/venv/bin/python -c "import torch" 2>/dev/null || '
                           f"{tmp_path}/venv/bin/python -m pip install -q {spec}"]


def make_plan(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args, f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("model, out", [("x/y/", "runs/eval/y"), ("x/y//", "runs/eval/y"), ("x/y", "runs/eval/y"),
                                        ("models/llama-2.7b", "runs/eval/llama-2.7b"), ("dir/m.gguf", "runs/eval/m"),
                                        ("org/name", "runs/eval/name")])
def test_evaluate_names_its_output_after_the_model_and_never_forces(tmp_path, model, out):
    plan = make_plan(tmp_path, "evaluate", f"MODEL={model}")
    line = next(line for line in plan.stdout.splitlines() if " evaluate " in line)
    assert f" --output {out} " in line and "--force" not in line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("model", ["", "/", ".", "..", "a b"])
def test_evaluate_stops_on_a_model_that_names_no_folder(tmp_path, model):
    plan = make_plan(tmp_path, "evaluate", f"MODEL={model}")
    assert plan.returncode != 0 and "MODEL=" in plan.stderr
    assert "relufy evaluate" not in plan.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_demos_pass_no_force_and_skip_the_steps_already_done(tmp_path):
    for target in ("demo", "eval-demo"):
        assert "--force" not in make_plan(tmp_path, target).stdout
    demo = tmp_path / "demo"
    (demo / "smollm2-135m-relu").mkdir(parents=True)
    for done in ("sparsity-original.json", "sparsity-relu.json", "smollm2-135m-relu/config.json"):
        (demo / done).write_text("{}")
    commands = [line for line in make_plan(tmp_path, "demo", f"DEMO={demo}").stdout.splitlines() if "relufy " in line]
    assert len(commands) == 1 and " compare " in commands[0]  # only the table is printed again
