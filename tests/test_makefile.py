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
