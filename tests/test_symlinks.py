"""Sources reached through symbolic links work everywhere: the Hugging Face cache's layout
(`snapshots/<rev>/<file> -> ../../blobs/<sha>`) for a GGUF file and for a safetensors folder, and a folder
that is itself a link, through convert, sparsity, evaluate and training's base."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_TEXT
from tiny_models import save_tiny_checkpoint, save_tiny_gguf

from relufy.checkpoint import resolve_source
from relufy.cli import main


def cache_layout(root: Path, files: dict[str, Path]) -> Path:
    """Move `files` (name -> file) into an HF-cache-like `models--org--tiny` and return its snapshot folder,
    whose entries are relative links into blobs/."""
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        path.rename(repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snapshot / name)
    return snapshot


@pytest.fixture(scope="module")
def cached_gguf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    gguf = save_tiny_gguf(root / "tiny.gguf", SAMPLE_TEXT)
    return cache_layout(root, {"tiny.gguf": gguf}) / "tiny.gguf"


@pytest.fixture(scope="module")
def cached_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    folder = save_tiny_checkpoint("llama", root / "plain", SAMPLE_TEXT)
    snapshot = cache_layout(root, {p.name: p for p in folder.iterdir()})
    folder.rmdir()
    return snapshot


def test_a_gguf_in_the_hub_cache_layout_resolves_to_a_readable_file(cached_gguf):
    source = resolve_source(cached_gguf)
    assert (source.path / source.gguf_file).is_file() and source.gguf_file == "tiny.gguf"
    assert str(source) == str(cached_gguf)


def test_convert_and_sparsity_read_a_linked_gguf(cached_gguf, tmp_path, capsys):
    assert main(["convert", str(cached_gguf), str(tmp_path / "relu")]) == 0
    config = json.loads((tmp_path / "relu" / "config.json").read_text())
    assert config["hidden_act"] == "relu" and config["relufy"]["source"] == str(cached_gguf)
    assert main(["sparsity", str(cached_gguf), "--data", str(SAMPLE_TEXT), "--block-size", "32",
                 "--max-tokens", "64", "--output", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["activation"] == "silu"


def test_a_link_to_a_missing_blob_is_one_line(tmp_path, capsys):
    os.symlink("../blobs/gone", tmp_path / "tiny.gguf")
    assert main(["convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("relufy convert: error:") and "symbolic link" in err and "huggingface.co" not in err


@pytest.mark.parametrize("layout", ["cache snapshot", "linked folder"])
def test_convert_sparsity_and_evaluate_read_a_folder_through_links(cached_folder, tmp_path, capsys, layout):
    model = cached_folder
    if layout == "linked folder":
        model = tmp_path / "my-model"
        os.symlink(cached_folder, model)
    assert main(["convert", str(model), str(tmp_path / "relu"), "--link"]) == 0
    assert (tmp_path / "relu" / "model.safetensors").is_file()
    assert not (tmp_path / "relu" / "model.safetensors").is_symlink()
    assert main(["sparsity", str(tmp_path / "relu"), "--data", str(SAMPLE_TEXT), "--block-size", "32",
                 "--max-tokens", "64"]) == 0
    assert main(["evaluate", str(model), "--output", str(tmp_path / "eval"), "--tasks", "relufy_dictionary",
                 "--limit", "2", "--p", "none"]) == 0
    identity = json.loads((tmp_path / "eval" / "results.json").read_text())["identity"]
    from relufy.checkpoint import model_identity

    assert identity == model_identity(resolve_source(model), "silu")


def test_training_starts_from_a_linked_base(cached_gguf, cached_folder, tmp_path):
    """The recipe's model_name_or_path through links: a GGUF is dequantized, a folder converted, each once."""
    from relufy.recipe import load_recipe
    from relufy.train_base import prepare_base

    for name, base, activation in (("gguf", cached_gguf, "null"), ("folder", cached_folder, "relu")):
        recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", [
            f"model_name_or_path={base}", f"activation={activation}", f"output_dir={tmp_path / name}",
            "model_config_overrides={}", "block_size=32"])
        prepared = prepare_base(recipe).source.path
        config = json.loads((prepared / "config.json").read_text())
        assert config["relufy"]["source"] == str(resolve_source(base))
        assert prepare_base(recipe).source.path == prepared  # reused, not made again
