"""The package's shape: no import cycles between relufy's modules, no function too long to read at once, no
module too long to hold one job, one definition per test fixture, one clock for every bench script, one reader
of config.json (relufy.checkpoint), and tests that use only relufy's public names.

All are read from the source (ast), so lazy imports inside functions count as edges too: a cycle that only
works because one side imports late is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "relufy"
TESTS = REPO / "tests"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
# Modules still over MAX_MODULE_LINES, each with why it is not split yet; remove an entry once it fits.
LONG_MODULES: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """relufy modules that `path` imports, at module level or inside functions (the package itself excluded)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c not in (name, "relufy")}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with an explicit path)."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            if cycle := visit(target, path + [module]):
                return cycle
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), None)


def test_no_import_cycle():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_fit_on_a_screen(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split these functions of {path.name}: {', '.join(long)}"


def _module_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_hold_one_job(path):
    name = str(path.relative_to(PACKAGE))
    lines = _module_lines(path)
    if name in LONG_MODULES:
        assert lines > MAX_MODULE_LINES, f"{name} fits in {MAX_MODULE_LINES} lines now: drop it from LONG_MODULES"
        return
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (> {MAX_MODULE_LINES}): split it by job"


def _fixtures(path: Path) -> set[str]:
    """Names of the pytest fixtures `path` defines (decorated with pytest.fixture, called or not)."""
    def is_fixture(decorator) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(target, ast.Attribute) and target.attr == "fixture"

    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(is_fixture, node.decorator_list))}


def _defined_twice(paths: list[Path]) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for path in paths:
        for name in _fixtures(path):
            where.setdefault(name, []).append(path.name)
    return {name: files for name, files in where.items() if len(files) > 1}


def test_each_fixture_is_defined_once():
    """A fixture with a body in two test files drifts apart: share it through conftest.py instead."""
    twice = _defined_twice(sorted(TESTS.rglob("*.py")))
    assert not twice, "fixtures defined in more than one file: " + \
        "; ".join(f"{name} in {', '.join(files)}" for name, files in sorted(twice.items()))


def test_the_fixture_check_sees_a_copy(tmp_path):
    body = "import pytest\n\n@pytest.fixture(scope='module')\ndef model():\n    return 1\n"
    (tmp_path / "test_a.py").write_text(body)
    (tmp_path / "test_b.py").write_text(body.replace("(scope='module')", ""))
    assert _defined_twice(sorted(tmp_path.glob("*.py"))) == {"model": ["test_a.py", "test_b.py"]}


@pytest.mark.parametrize("path", sorted((REPO / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_scripts_time_with_relufys_clock(path):
    """Every number in bench/ is taken like relufy's own: through relufy.timing, not a private timer."""
    source = path.read_text()
    tree = ast.parse(source)
    own = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and "timer" in node.name.lower()]
    assert not own and "perf_counter" not in source and "elapsed_time" not in source, \
        f"{path.name} times on its own clock ({', '.join(own) or 'perf_counter/CUDA events'}); use relufy.timing"



def _reads_config_json(path: Path) -> list[int]:
    """Lines of `path` that name "config.json" inside a call that reads a file (read_text, read_bytes, open,
    json.load/loads): every such read belongs in relufy.checkpoint (read_config, read_provenance)."""
    readers = {"read_text", "read_bytes", "open", "load", "loads"}
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in readers and any(isinstance(inner, ast.Constant) and inner.value == "config.json"
                                   for inner in ast.walk(node)):
            lines.append(node.lineno)
    return lines


def test_only_the_checkpoint_module_reads_config_json():
    readers = {f"{path.relative_to(PACKAGE)}:{line}" for path in PACKAGE.rglob("*.py")
               if path.name != "checkpoint.py" or path.parent != PACKAGE for line in _reads_config_json(path)}
    assert not readers, f"config.json read outside relufy.checkpoint (use read_config/read_provenance): {sorted(readers)}"


def test_config_json_scan_sees_a_read(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('import json\nconfig = json.loads((folder / "config.json").read_text())\n'
                      'ok = (folder / "config.json").is_file()\n')
    assert _reads_config_json(sample) == [2, 2]


def _private_uses(path: Path) -> list[str]:
    """Private relufy names a test reaches: `from relufy.x import _y`, `relufy.x._y` in code or in a string (a
    script a test runs), and `setattr(relufy_module, "_y", ...)` / `monkeypatch.setattr(...)` and the other
    attribute calls, whose name is a string. A test goes through a module's public surface, so a refactor of
    its insides does not break tests that check behaviour."""
    import re

    tree = ast.parse(path.read_text())
    relufy_names = _relufy_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "relufy":
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        text = ast.unparse(node) if isinstance(node, ast.Attribute) else \
            node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
        found += [f"{node.lineno}: {m}" for m in re.findall(r"\brelufy(?:\.[a-z_0-9]+)*\._[a-zA-Z]\w*", text)]
        if _named_attribute_call(node) and _root_name(node.args[0]) in relufy_names:
            name = node.args[1].value
            if name.startswith("_") and not name.startswith("__"):
                found.append(f"{node.lineno}: {ast.unparse(node.args[0])}.{name}")
    return found


def _relufy_names(tree: ast.AST) -> set[str]:
    """The names a test file binds to relufy modules or objects (`import relufy.x as y`, `from relufy.x import y`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or "relufy" for a in node.names if a.name.split(".")[0] == "relufy"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "relufy":
            names |= {a.asname or a.name for a in node.names}
    return names


def _named_attribute_call(node: ast.AST) -> bool:
    """`setattr(obj, "name", ...)`, `monkeypatch.setattr(obj, "name", ...)`, getattr/delattr/hasattr alike."""
    if not isinstance(node, ast.Call) or len(node.args) < 2:
        return False
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    name = node.args[1]
    return func in {"setattr", "getattr", "delattr", "hasattr"} and isinstance(name, ast.Constant) \
        and isinstance(name.value, str)


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def test_tests_import_no_private_relufy_name():
    found = [f"{path.name}:{use}" for path in sorted(TESTS.glob("*.py")) if path.name != Path(__file__).name
             for use in _private_uses(path)]  # this file names private uses as its scan's samples
    assert not found, f"tests reach private relufy names (make them public or test through the API): {found}"


def test_private_use_scan_sees_one(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text('from relufy.l1 import L1Tap, _add\nimport relufy.convert\nrelufy.convert._copy = 1\n'
                      'SCRIPT = "relufy.convert._copy = copy"\nfrom relufy.train import train\n'
                      'import relufy.sparse.ffn as ffn\nmonkeypatch.setattr(ffn, "_warned", set())\n'
                      'setattr(relufy.convert, "_copy", 1)\nmonkeypatch.setattr(torch, "_private", 1)\n'
                      'getattr(ffn, "__name__")\n')
    assert _private_uses(sample) == ["1: from relufy.l1 import _add", "3: relufy.convert._copy",
                                     "4: relufy.convert._copy", "7: ffn._warned", "8: relufy.convert._copy"]
