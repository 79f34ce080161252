"""The checkpoint training starts from (relufy.train_base): resolved once per run, converted once, hashed once."""

import relufy.checkpoint
import relufy.resume
import relufy.train_base
from relufy.checkpoint import Source, resolve_source
from relufy.train import build_trainer
from tiny_runs import tiny_recipe


def test_a_run_resolves_its_base_once_and_hashes_its_weights_once(silu_base, tmp_path, monkeypatch):
    """The recipe's base is resolved (a hub id fetched, links followed) and its weights hashed for the resume
    fingerprint once per run; the conversion, checks, loads and fingerprint all take that resolved base."""
    resolved, hashed = [], []
    real_resolve, real_identity = relufy.checkpoint.resolve_source, relufy.resume.model_identity

    def resolve(value):
        if not isinstance(value, Source):  # a Source passes through: nothing is resolved again
            resolved.append(str(value))
        return real_resolve(value)

    for module in (relufy.checkpoint, relufy.train_base):
        monkeypatch.setattr(module, "resolve_source", resolve)
    monkeypatch.setattr(relufy.resume, "model_identity", lambda source, act: hashed.append(source) or
                        real_identity(source, act))
    out = tmp_path / "run"
    build_trainer(tiny_recipe(silu_base, out))  # tiny-cpu converts the SiLU base to ReLU first
    assert resolved == [str(silu_base), str(out / "base-relu")]
    assert hashed == [resolve_source(silu_base)]
