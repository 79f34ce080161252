"""The vLLM plugin's wiring, checked without vLLM (the engine tests are tests/vllm, `make test-vllm`)."""

import ast
import subprocess
import sys
import tomllib

from conftest import REPO


def test_pyproject_declares_the_entry_point_and_the_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"relufy": "relufy.vllm:register"}
    assert any(spec.startswith("vllm") for spec in project["optional-dependencies"]["vllm"])


def test_importing_the_plugin_costs_neither_torch_nor_vllm():
    code = "import sys, relufy.vllm; print(sorted({'torch', 'vllm', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO / "src")})
    assert done.stdout.strip() == "[]"


def test_every_registered_class_is_defined():
    from relufy.vllm import ARCHITECTURES

    tree = ast.parse((REPO / "src" / "relufy" / "vllm" / "models.py").read_text())
    classes = {node.name: [ast.unparse(base) for base in node.bases] for node in tree.body
               if isinstance(node, ast.ClassDef)}
    for architecture, name in ARCHITECTURES.items():
        assert classes[name] == ["_RelufyModelMixin", architecture]
