"""Every bad input to `relufy convert`: one-line error, non-zero exit, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from relufy.atomic import LOCK_SUFFIX
from relufy.cli import main


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what the test's setup printed
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, parent, expected_entries, *, mentions):
    assert code != 0
    assert len(err.splitlines()) == 1, f"expected one line, got: {err!r}"
    assert err.startswith("relufy convert: error:")
    for word in mentions:
        assert word in err
    left = sorted(p.name for p in parent.iterdir() if not p.name.endswith(LOCK_SUFFIX))  # an empty lock file stays
    assert left == sorted(expected_entries), "nothing may be left behind"


def test_missing_source(tmp_path, capsys):
    code, err = run_cli(capsys, "convert", tmp_path / "nope", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, [], mentions=["does not exist"])


def test_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    code, err = run_cli(capsys, "convert", tmp_path / "notes", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["notes"], mentions=["no config.json"])


def test_directory_with_config_but_no_weights(tmp_path, tiny, capsys):
    (tiny / "model.safetensors").unlink()
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["no weight files"])


def test_truncated_safetensors(tmp_path, tiny, capsys):
    weights = tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["not a valid safetensors file", "model.safetensors"])


def test_corrupt_safetensors_header(tmp_path, tiny, capsys):
    weights = tiny / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"garbage!!!!!"
    weights.write_bytes(bytes(data))
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["not a valid safetensors file"])


def test_shard_missing_from_index(tmp_path, capsys):
    from tiny_models import build_tiny_model

    src = tmp_path / "src"
    build_tiny_model("llama").save_pretrained(src, max_shard_size="20KB")
    sorted(src.glob("*.safetensors"))[0].unlink()
    code, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["missing"])


def test_unknown_architecture_names_model_type_and_how_to_add_it(tmp_path, tiny, capsys):
    config = json.loads((tiny / "config.json").read_text())
    config["model_type"] = "mamba"
    (tiny / "config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["'mamba'", "architectures.yaml"])


def test_model_without_ffn_activation(tmp_path, tiny, capsys):
    config = json.loads((tiny / "config.json").read_text())
    del config["hidden_act"]
    (tiny / "config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["no FFN activation", "hidden_act"])


def test_model_that_is_already_relu(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src", hidden_act="relu")
    code, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["already uses 'relu'", "--force"])


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_existing_folder_relufy_did_not_write_is_refused_even_with_force(tmp_path, tiny, capsys, force):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out", *force)
    assert_clean_failure(code, err, tmp_path, ["src", "out"], mentions=["relufy did not write", "remove it yourself"])
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_an_existing_conversion_is_replaced_only_with_force(tmp_path, tiny, capsys):
    assert run_cli(capsys, "convert", tiny, tmp_path / "out")[0] == 0
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src", "out"], mentions=["exists", "--force"])


def test_output_inside_source(tmp_path, tiny, capsys):
    entries = sorted(p.name for p in tiny.iterdir())
    code, err = run_cli(capsys, "convert", tiny, tiny / "converted")
    assert_clean_failure(code, err, tiny, entries, mentions=["inside the input"])


@pytest.mark.parametrize("flag,value,mentions", [
    ("--threshold", "-0.1", ["--threshold", ">= 0"]),
    ("--threshold", "nan", ["--threshold", "finite"]),
    ("--shift", "-1", ["--shift"]),
])
def test_invalid_activation_parameter(tmp_path, tiny, capsys, flag, value, mentions):
    act = "fatrelu" if flag == "--threshold" else "shifted_relu"
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out", "--activation", act, flag, value)
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=mentions)


def test_unknown_activation_lists_supported_ones(tmp_path, tiny, capsys):
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out", "--activation", "swiglu")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["'swiglu'", "relu, fatrelu, shifted_relu, relu2"])


def test_parameter_for_an_activation_that_takes_none(tmp_path, tiny, capsys):
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out", "--threshold", "0.1")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["--threshold", "fatrelu"])


def test_failure_during_writing_leaves_no_temporary_directory(tmp_path, tiny, monkeypatch):
    import relufy.convert as convert_module
    from relufy.activations import make_activation

    def copy_half(src, dst, link):  # the weights half copied into the temp folder, then the disk fills up
        (dst / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "copy_checkpoint", copy_half)
    with pytest.raises(OSError):
        convert_module.convert_checkpoint(tiny, tmp_path / "out", make_activation("relu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.relufy-lock", "src"]


def test_config_json_that_is_not_an_object(tmp_path, tiny, capsys):
    (tiny / "config.json").write_text("[1, 2, 3]")
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, ["src"], mentions=["config.json", "JSON list, not an object"])


def test_read_only_output_parent(tmp_path, tiny, capsys, monkeypatch):
    import errno

    make_folder = Path.mkdir

    def refuse(self, *args, **kwargs):  # what a read-only folder does for a user who is not root
        if self.name.endswith(".relufy-tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self.parent))
        return make_folder(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    (tmp_path / "locked").mkdir()
    code, err = run_cli(capsys, "convert", tiny, tmp_path / "locked" / "out")
    assert_clean_failure(code, err, tmp_path / "locked", [], mentions=["cannot write", "Permission denied"])


def test_a_gguf_source_may_be_converted_into_its_own_folder(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))  # not a model: the output check passes, reading the file then fails
    code, err = run_cli(capsys, "convert", gguf, tmp_path / "model-relu")
    assert_clean_failure(code, err, tmp_path, ["model.gguf"], mentions=["not a readable GGUF model"])
    code, err = run_cli(capsys, "convert", gguf, tmp_path, "--force")  # OUT holding the file stays refused
    assert_clean_failure(code, err, tmp_path, ["model.gguf"], mentions=["contains the input"])


def test_ctrl_c_before_the_command_starts_is_one_line_and_exit_130(monkeypatch, capsys):
    import relufy.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(relufy.cli, "build_parser", interrupted)
    code, err = run_cli(capsys, "convert", "a", "b")
    assert (code, err) == (130, "relufy: interrupted")


def test_a_package_spelling_of_a_missing_package_or_file_is_one_line(tmp_path):
    from relufy.checkpoint import resolve_source
    from relufy.errors import SourceError

    with pytest.raises(SourceError, match="no installed package 'no_such_package'"):
        resolve_source("pkg:no_such_package/model.gguf")
    with pytest.raises(SourceError, match="package 'relufy' has no file 'missing.gguf'"):
        resolve_source("pkg:relufy/missing.gguf")
