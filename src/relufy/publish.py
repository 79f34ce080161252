"""Publishing: a checkpoint folder with safetensors, tokenizer and a model card, and the Hub upload.

The card (README.md) starts with Hub YAML front matter: `base_model`, `license` (carried over
from the source model), `tags` and a `model-index` holding the measured results of one
`relufy evaluate` run; its body has the accuracy/sparsity table, the decode speed (of a `relufy speed` run
when one is given, else evaluate's short look), the recipe and how to load it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from . import __version__
from .atomic import MARKER, SIGNATURE_KEY, atomic_directory, claim_output
from .checkpoint import Provenance, check_model_dir, read_provenance, update_config
from .errors import DataError, RelufyError, SourceError
from .per_layer import LAYER_THRESHOLDS_KEY, PER_LAYER
from .portable import write_remote_code
from .report import load_result
from .scores import SCORE_METRICS, task_scores

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
TAGS = ["relufy", "prosparse", "activation-sparsity", "relu"]


def publish(model_dir: str | Path, results_path: str | Path, out: str | Path, *, repo_id: str | None = None,
            base_model: str | None = None, license_id: str | None = None, speed: str | Path | None = None,
            force: bool = False) -> Path:
    """Write `out`: weights, tokenizer, remote code if needed, and the model card. Returns `out`.

    `speed`, a `relufy speed` JSON of this model, gives the card its speed section in place of the short look
    that `relufy evaluate` takes on CUDA (batch 1, eager, in the evaluation's dtype): the full measurement, in
    the dtype the model is served in, is the one a reader should see."""
    model_dir = Path(model_dir).expanduser().resolve()
    check_model_dir(model_dir)
    inputs = [model_dir, results_path, *([speed] if speed is not None else [])]
    with claim_output(out, command="relufy publish", force=force, inputs=inputs) as out:
        results = load_result(results_path)
        identity = _identity_of(model_dir)
        _check_results_match(results, identity, model_dir, results_path)
        if speed is not None:
            results = {**results, "speed": _speed_of(speed, identity, model_dir)}
        weights, tokenizer_files = _checkpoint_files(model_dir)
        lineage = _lineage(model_dir)
        base_model = base_model or next(filter(None, map(_base_model_of, lineage)), None)
        license_id = license_id or next(filter(None, map(_license_of, lineage)), None)
        if not license_id:
            raise DataError("could not find the source model's license (no README front matter or GGUF "
                            "general.license); pass --license ID (e.g. apache-2.0)")
        with atomic_directory(out, replace=force, command="relufy publish") as tmp:
            for path in [*weights, *tokenizer_files, *(model_dir / n for n in MODEL_FILES)]:
                if path.is_file():
                    shutil.copyfile(path, tmp / path.name)
            config = update_config(tmp, _make_shareable)
            remote = write_remote_code(tmp)
            card = model_card(results, config, repo_id=repo_id or out.name, base_model=base_model,
                              license_id=license_id, remote_code=remote)
            (tmp / "README.md").write_text(card)
    return out


def _checkpoint_files(model_dir: Path) -> tuple[list[Path], list[Path]]:
    """The weights and tokenizer files a published folder carries; a folder missing either is refused."""
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise SourceError(f"{model_dir} has no *.safetensors weights; re-save it with save_pretrained()")
    tokenizer_files = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in tokenizer_files):
        raise SourceError(f"{model_dir} has no tokenizer files; copy the original model's tokenizer into it")
    return weights, tokenizer_files


def _make_shareable(config: dict) -> None:
    """The published config: no auto_map of the local remote code (rewritten if needed), no local paths."""
    config.pop("auto_map", None)
    if "relufy" in config:
        config["relufy"] = shareable(Provenance.of(config).to_dict())


def push_folder(folder: str | Path, repo_id: str | None, *, private: bool = False) -> str:
    """Upload `folder` to the Hub with the token from the environment; the folder is never changed."""
    if not repo_id:
        raise DataError("--push needs --repo-id ORG/NAME")
    from huggingface_hub import HfApi

    api = HfApi()  # token: HF_TOKEN or the login cache; never printed or written by relufy
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"Upload with relufy {__version__}",
                                   ignore_patterns=[MARKER])  # relufy's local bookkeeping, not the model's
    except Exception as exc:  # offline, no token, no permission: one line, folder left as written
        raise RelufyError(f"could not push to '{repo_id}' ({type(exc).__name__}); check the network, "
                          f"HF_HUB_OFFLINE and HF_TOKEN; {folder} is intact, retry with --push later") from None
    return getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}"


def _identity_of(model_dir: Path) -> dict:
    """`model_identity` of the folder published, computed once (it reads every weight byte) for every
    measurement the card quotes."""
    from .architectures import architecture_of
    from .checkpoint import Source, model_identity, read_config

    config = read_config(model_dir)
    return model_identity(Source(model_dir), str(architecture_of(config).activation_of(config)))


def _differences(recorded, identity: dict, measured: str) -> list[str] | None:
    """The fields of a recorded identity that differ from `identity` (the activation with both values), or
    None when nothing usable is recorded (no identity, or one from an older relufy that hashed samples)."""
    from .checkpoint import WEIGHTS_HASHED

    if not isinstance(recorded, dict) or recorded.get("weights_hashed") != WEIGHTS_HASHED:
        return None
    return [f"{key} ({recorded.get(key)} {measured}, {identity[key]} here)" if key == "activation" else key
            for key in identity if recorded.get(key) != identity[key]]


def _check_results_match(results: dict, identity: dict, model_dir: Path, results_path) -> None:
    """Refuse an evaluation of another model: the identity recorded by `relufy evaluate` (config and weight
    fingerprints, activation) must be this directory's. A name says nothing: a fatrelu folder may share it."""
    if "lm_eval" not in results or "model" not in results:
        raise DataError(f"{results_path} is not a results.json written by `relufy evaluate`")
    _require_identity(results.get("identity"), identity, f"{results_path} evaluates", "evaluated", model_dir,
                      "evaluate this model with `relufy evaluate` and pass that results.json")


def _require_identity(recorded, identity: dict, subject: str, measured: str, model_dir: Path, fix: str) -> None:
    """Refuse a file whose recorded identity is not `identity` (`subject`: the file and its verb, "... times"),
    or that records none a fingerprint of every weight byte could be checked against; `fix` says what to run."""
    differ = _differences(recorded, identity, measured)
    if differ is None:
        raise DataError(f"{subject.rsplit(' ', 1)[0]} records no fingerprint of every weight byte of the model it "
                        f"{measured} (written by an older relufy); {fix}")
    if differ:
        raise DataError(f"{subject} another model than {model_dir}: {', '.join(differ)} differ; {fix}")


def _speed_of(path, identity: dict, model_dir: Path) -> dict:
    """The measurement in `path`, a `relufy speed` JSON, once it is known to time this model (its recorded
    identity is `identity`); without its local path, identity and signature, which the card does not show, and
    without its kernel-by-kernel profile, which is for whoever tunes the kernels and stays in the JSON."""
    try:
        speed = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"--speed {path} does not exist; pass the --output of `relufy speed {model_dir}`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:  # a folder, unreadable, not JSON
        raise DataError(f"--speed {path} is not a readable JSON file ({exc}); pass the --output of `relufy speed`") \
            from None
    if not isinstance(speed, dict) or not isinstance(speed.get("decode"), list) or "config" not in speed:
        raise DataError(f"--speed {path} is not a JSON written by `relufy speed`; pass the --output of "
                        f"`relufy speed {model_dir}`")
    _require_identity(speed.get("identity"), identity, f"--speed {path} times", "timed", model_dir,
                      f"run `relufy speed {model_dir} --output ...` and pass that JSON")
    return {key: value for key, value in speed.items() if key not in ("model", "identity", "profile", SIGNATURE_KEY)}


def shareable(value):
    """`value` with every absolute local path replaced by its last component: a card or config meant for the Hub
    must not carry the author's folders (home, venv, scratch disk)."""
    if isinstance(value, dict):
        return {key: shareable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shareable(item) for item in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or Path(value).is_absolute()):
        return Path(value).name
    return value


def _lineage(model_dir: Path) -> list[Provenance]:
    """The provenance of `model_dir`, then of each relufy folder it was made from, back to the first model.
    relufy records only a checkpoint's immediate source, and a deployable checkpoint is often two steps from
    the original (trained, then converted with per-layer thresholds): the license and base model are
    the original's."""
    lineage, seen = [read_provenance(model_dir)], {model_dir}
    while (source := lineage[-1].source) and Path(source).is_dir() and Path(source).resolve() not in seen:
        seen.add(Path(source).resolve())
        parent = read_provenance(source)
        if not parent.source:  # not made by relufy: the lineage ends at it (its README is read as the source's)
            break
        lineage.append(parent)
    return lineage


def _base_model_of(provenance: Provenance) -> str | None:
    source = provenance.source or ""
    parts = source.split("/")
    if source and not Path(source).exists() and len(parts) == 2 and all(parts):
        return source
    return None


def _license_of(provenance: Provenance) -> str | None:
    """The source model's license: its README front matter, or a GGUF's general.license."""
    if not provenance.source:
        return None
    source = Path(provenance.source)
    if source.suffix == ".gguf" and source.is_file():
        try:
            from gguf import GGUFReader

            field = GGUFReader(source).fields.get("general.license")
            return str(field.contents()) if field is not None else None
        except Exception:  # unreadable metadata: fall through to --license
            return None
    readme = source / "README.md" if source.is_dir() else None
    if readme is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(provenance.source, "README.md")
            readme = Path(cached) if isinstance(cached, str) else None
        except Exception:
            readme = None
    if readme is not None and readme.is_file():
        front = _front_matter(readme.read_text())
        return front.get("license")
    return None


def _front_matter(text: str) -> dict:
    if not text.startswith("---"):
        return {}
    try:
        return yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}


def _model_index(results: dict, name: str) -> list[dict]:
    entries = []
    for task, (metric, value) in task_scores(results["lm_eval"]).items():
        shown = round(value * 100, 2) if metric in SCORE_METRICS else round(value, 4)
        entries.append({"task": {"type": "text-generation", "name": "Text Generation"},
                        "dataset": {"name": task, "type": task},
                        "metrics": [{"type": metric, "value": shown, "name": metric}],
                        "source": {"name": f"relufy {results.get('relufy_version', __version__)} evaluate",
                                   "url": "https://github.com/EleutherAI/lm-evaluation-harness"}})
    sparsity = [{"type": "activation_sparsity", "value": round(results["sparsity"]["overall"] * 100, 2),
                 "name": "zero-ratio of x1 (%)"}]
    sparsity += [{"type": f"ppl_{p}_sparsity", "value": round(entry["sparsity"] * 100, 2),
                  "name": f"PPL-{p}% sparsity (%)"} for p, entry in results.get("ppl_p_sparsity", {}).items()]
    entries.append({"task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {"name": "held-out text", "type": "relufy_heldout"}, "metrics": sparsity})
    return [{"name": name, "results": entries}]


def model_card(results: dict, config: dict, *, repo_id: str, base_model: str | None, license_id: str,
               remote_code: bool) -> str:
    """README.md text: YAML front matter + accuracy/sparsity table, recipe and loading instructions."""
    from .architectures import architecture_of
    from .report import evaluation_report

    activation = architecture_of(config).activation_of(config) or "?"
    provenance = Provenance.of(config)
    name = repo_id.split("/")[-1]
    front = {"license": license_id, "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": TAGS + [activation.split("_")[0]] if activation.split("_")[0] not in TAGS else TAGS}
    if base_model:
        front["base_model"] = base_model
    front["model-index"] = _model_index(results, name)
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "its source model"
    if provenance.original_activation:
        summary = (f"A sparse-activation version of {origin} made with relufy {__version__}: the FFN activation "
                   f"`{provenance.original_activation}` was replaced by `{activation}` (ProSparse, arXiv "
                   "2402.13516), so much of the FFN intermediate activation x1 is exactly zero.")
    else:
        summary = f"Evaluated with relufy {__version__}; FFN activation `{activation}`."
    body = [f"# {name}", "", summary, "", "## Results", "",
            evaluation_report(results).split("\n", 2)[2].replace("\n## ", "\n### "), "", "## Recipe", ""]
    recipe = {key: value for key, value in provenance.to_dict().items() if key != "relufy_version"}
    if recipe:
        body += ["Recorded by relufy in config.json (`relufy` key):", "", "```yaml",
                 yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    else:
        body += ["config.json records no relufy conversion or training.", ""]
    load = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if activation == PER_LAYER.config_value:
        body += ["## How to load", "", *load,
                 f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
                 f"`{activation}` here has one FATReLU threshold per FFN layer (`{LAYER_THRESHOLDS_KEY}` in "
                 "config.json). transformers builds it through this folder's `modeling_relufy.py` "
                 "(`trust_remote_code=True`), or relufy's loader does (`relufy.checkpoint.load_model`); "
                 "`relufy.register_activations()` alone refuses it rather than run other thresholds."]
        load = []
    elif remote_code:
        load = ["```python", "import relufy",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"relufy.register_activations()  # teaches transformers '{activation}'", ""]
    if load:
        load += [f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```"]
        body += ["## How to load", ""] + load
    if remote_code and activation != PER_LAYER.config_value:
        body += ["", f"`{activation}` is not built into transformers: this folder ships `modeling_relufy.py`, so "
                 "`from_pretrained(..., trust_remote_code=True)` also works without relufy installed."]
    body += [""] + serve_section(config, activation, repo_id, remote_code)
    body += ["", "## Citation", "", "Song et al., *ProSparse: Introducing and Enhancing Intrinsic Activation "
             "Sparsity within Large Language Models*, arXiv 2402.13516. Luo et al., *Sparsing Law*, arXiv 2411.02335."]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body) + "\n"


# what vLLM's own class does with a ReLU-family activation where it does not refuse it (docs/serving.md)
WITHOUT_PLUGIN = {
    "GemmaForCausalLM": "vLLM's class silently runs GELU in its place",
    "FalconForCausalLM": "vLLM's class silently runs GELU in its place",
    "GPT2LMHeadModel": "vLLM's class runs relu and relu2 (dense) and refuses the others",
}


def serve_section(config: dict, activation: str, repo_id: str, remote_code: bool) -> list[str]:
    """The card's "Serve it" lines: the vLLM command for this architecture, and the engines that would run it wrong."""
    from .vllm import ARCHITECTURES, NOT_GATED

    architecture = (config.get("architectures") or ["?"])[0]
    lines = ["## Serve it", "", "```bash"]
    if architecture in ARCHITECTURES:
        speed = "dense: the sparse FFN is for gated FFNs" if architecture in NOT_GATED else "sparse decode on CUDA"
        without = WITHOUT_PLUGIN.get(architecture, "vLLM's class refuses the activation")
        lines += ["pip install 'relufy[vllm]'", f"vllm serve {repo_id}", "```", "",
                  f"relufy's vLLM plugin runs `{activation}` in vLLM's own `{architecture}` class ({speed}); "
                  f"without it {without}."]
    elif activation == PER_LAYER.config_value:
        lines = ["## Serve it", "", f"vLLM serves one FATReLU threshold per layer only through relufy's plugin, for "
                 f"{', '.join(f'`{name}`' for name in ARCHITECTURES)}; this model is a `{architecture}`."]
    else:
        flag = " --trust-remote-code" if remote_code else ""
        lines += [f"vllm serve {repo_id} --model-impl transformers{flag}", "```", "",
                  "vLLM runs it through transformers' modeling code (dense)."]
    return lines + ["", f"**Do not serve it with llama.cpp, Ollama, MLC LLM or ExLlama** (nor a GGUF, EXL2 or MLC "
                        f"conversion of it): they load this architecture and silently run its original "
                        f"activation (SiLU or GELU) instead of `{activation}`, so every output is wrong."]
