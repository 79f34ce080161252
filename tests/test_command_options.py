"""Every command's flags come from its options dataclass: each field is in `--help` with its help text, and
`--config FILE.yaml` gives the same options, strictly, with flags overriding it."""

import dataclasses
import re

import pytest

from relufy.cli import build_parser, main
from relufy.commands import COMMANDS
from relufy.options import SparsityConfig


def _help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([name, "--help"])
    return re.sub(r"\s+", " ", capsys.readouterr().out)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_option_field_is_in_help_with_its_help_text(command, capsys):
    text = _help_text(command.name, capsys)
    for field in dataclasses.fields(command.config):
        assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert re.sub(r"\s+", " ", field.metadata["help"].replace("%%", "%")) in text, field.name
    assert "--config FILE.yaml" in text


def _config(tmp_path, text: str):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    return path


def test_a_config_file_gives_options_and_flags_override_it(tmp_path):
    path = _config(tmp_path, "data: corpus.txt\nblock_size: 64\nbatch_size: 2\n")
    parser = build_parser()
    argv = ["sparsity", "m", "--config", str(path), "--batch-size", "3", "--device", "cpu"]
    from relufy.cli import make_config

    config = make_config(parser, parser.parse_args(argv), argv)
    assert config == SparsityConfig(data="corpus.txt", block_size=64, batch_size=3, device="cpu")


@pytest.mark.parametrize("text, words", [("data: a\nblock_sise: 64\n", ["unknown option 'block_sise'", "block_size"]),
                                         ("data: a\ndata: b\n", ["'data' appears twice", "lines 1 and 2"]),
                                         ("data: a\nblock_size: 0\n", ["--block-size must be an integer"])])
def test_a_config_file_is_strict(tmp_path, capsys, text, words):
    assert main(["sparsity", "m", "--config", str(_config(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relufy sparsity: error:") and err.count("\n") == 1
    for word in words:
        assert word in err, err


def test_one_activation_spelling_with_threshold_as_sugar():
    from relufy.options import ConvertConfig

    assert ConvertConfig(activation="fatrelu", threshold=0.1).activation == "fatrelu_0.1"
    assert ConvertConfig(activation="fatrelu_0.1").resolved() == ConvertConfig(activation="fatrelu",
                                                                                 threshold=0.1).resolved()
