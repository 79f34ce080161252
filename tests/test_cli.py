"""The command line: it starts without importing torch, and successful runs print no alarming noise."""

import json
import logging
import subprocess
import sys

import pytest
from conftest import REPO

from relufy.cli import main, toy_run_note
from relufy.recipe import load_recipe


@pytest.mark.parametrize("argv", [["--help"], ["evaluate", "--help"], ["sparsity", "--help"]])
def test_the_command_line_starts_without_importing_torch(argv):
    code = ("import sys\nfrom relufy.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_deepspeeds_cpu_accelerator_warning_is_silenced(capsys):
    main(["compare", "missing"])  # any command
    record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to CPU. If you have "
                               "GPU or other accelerator, we were unable to detect it.", None, None)
    assert not logging.getLogger("DeepSpeed").filter(record)
    record.msg = "a real DeepSpeed warning"
    assert logging.getLogger("DeepSpeed").filter(record)


def test_a_toy_recipe_says_its_perplexity_is_expected_to_be_useless():
    assert "toy run" in toy_run_note(load_recipe(REPO / "recipes" / "tiny-cpu.yaml"))
    assert toy_run_note(load_recipe(REPO / "recipes" / "prosparse-smollm2-135m.yaml", ["bf16=false"])) is None


def test_an_unreadable_or_unwritable_file_is_one_line_not_a_traceback(monkeypatch, capsys):
    import dataclasses
    import errno

    import relufy.cli

    def denied(args, config):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/locked.txt")

    monkeypatch.setattr(relufy.cli, "COMMANDS", [dataclasses.replace(command, run=denied) if command.name == "compare"
                                                 else command for command in relufy.cli.COMMANDS])
    assert main(["compare", "x"]) == 1
    assert capsys.readouterr().err.strip() == ("relufy compare: error: Permission denied (/data/locked.txt); check the "
                                               "path, its permissions and free space")


def test_compare_prints_sparsity_jsons_as_the_sparsity_table(tmp_path, capsys):
    for name, act, ratio in (("sparsity-original", "silu", 0.0), ("sparsity-relu", "relu", 0.6515)):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"activation": act, "overall": ratio, "perplexity": 29.88, "tokens": 8192, "per_layer": [ratio]}))
    assert main(["compare", str(tmp_path / "sparsity-original.json"), str(tmp_path / "sparsity-relu.json")]) == 0
    out = capsys.readouterr().out
    assert "| sparsity-relu | relu | 65.15% | 29.88 | 8192 |" in out


def test_compare_refuses_to_mix_sparsity_and_evaluation_results(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps({"activation": "relu", "overall": 0.5}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"lm_eval": {}, "sparsity": {"overall": 0.5}}))
    assert main(["compare", str(tmp_path / "s.json"), str(tmp_path / "eval")]) == 2
    assert "not both" in capsys.readouterr().err
