"""Per-layer FATReLU thresholds: a threshold t_l for each FFN layer, the model `relufy matched` measures.

transformers builds every FFN activation as `ACT2FN[config.<activation key>]`, with no layer index,
so one activation name cannot hold a threshold per layer. A checkpoint with per-layer thresholds
names the bare family, `fatrelu`, and lists the thresholds in config.json under
`relufy_layer_thresholds`, one per FFN layer in order:

- relufy's loader (`checkpoint.load_model`) builds every FFN with FATReLU(0), then `apply` sets
  each layer's threshold;
- the remote code relufy ships with such a checkpoint (`portable.py`) does the same inside the
  model class, for plain transformers with `trust_remote_code=True`;
- anything else stops with an error that names both ways (`fatrelu` alone is no activation
  `register_activations` will build), so the model never runs with other thresholds than its own.

`relufy convert --layer-thresholds MATCHED.json` writes one from `relufy matched`'s thresholds on
the activation (`thresholds_from_matched`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .activations import Activation, parse_activation
from .errors import ActivationError

LAYER_THRESHOLDS_KEY = "relufy_layer_thresholds"
PER_LAYER = Activation("fatrelu")  # the config value `fatrelu`: thresholds in LAYER_THRESHOLDS_KEY


def layer_thresholds(config):
    """The per-layer thresholds a config (dict or transformers config) holds, as written (`checked` reads them),
    or None for any other model."""
    return config.get(LAYER_THRESHOLDS_KEY) if isinstance(config, dict) else getattr(config, LAYER_THRESHOLDS_KEY,
                                                                                     None)


def ffn_layers(config: dict) -> int | None:
    """How many FFN layers a config.json dict describes, as transformers reads it (GPT-2's `n_layer` too), or None
    when transformers cannot build the config."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**config).num_hidden_layers
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def checked(thresholds, layers: int | None, where: str) -> list[float]:
    """`thresholds` as floats, or a one-line error: one finite number >= 0 per FFN layer."""
    if not isinstance(thresholds, (list, tuple)) or not thresholds:
        raise ActivationError(f"{where}: '{LAYER_THRESHOLDS_KEY}' must be a list of thresholds, one per FFN layer")
    values = []
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ActivationError(f"{where}: every per-layer threshold must be a finite number >= 0, got {t!r}")
        values.append(float(t))
    if layers is not None and len(values) != layers:
        raise ActivationError(f"{where}: {len(values)} per-layer thresholds for a model with {layers} FFN layers; "
                              "write them from a relufy matched JSON of this model (relufy convert --layer-thresholds)")
    return values


def apply(model, thresholds: list[float]) -> None:
    """Set each FFN's FATReLU threshold to its layer's (the FFNs in layer order, as the architecture map names them)."""
    from .architectures import activation_modules

    modules = activation_modules(model)
    checked(thresholds, len(modules), type(model).__name__)
    for index, (module, threshold) in enumerate(zip(modules, thresholds)):
        if type(module).__name__ != "FATReLU":  # by name: the remote code has its own copy of the class
            raise ActivationError(f"FFN {index} of {type(model).__name__} runs {type(module).__name__}, not FATReLU; "
                                  "per-layer thresholds need an FFN built with FATReLU")
        module.threshold = threshold


def thresholds_from_matched(path: str | Path, target: float | None, config: dict, identity: dict) -> list[float]:
    """The per-layer FATReLU thresholds of one target of a `relufy matched` JSON, checked against the model they
    are written into (its config.json dict, and its `checkpoint.model_identity`): thresholds on the activation
    (x1 thresholds are no activation's), measured on this very model (the JSON's `identity`: config, weights and
    activation). A FATReLU model keeps the larger of its own threshold and the layer's."""
    from .architectures import architecture_of

    where = f"--layer-thresholds {path}"
    try:
        result = json.loads(Path(path).read_text())
        entries, settings = result["targets"], result.get("settings", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ActivationError(f"{where}: not a relufy matched JSON ({exc})") from None
    if settings.get("threshold_on", "x1") != "activation":
        raise ActivationError(f"{where}: its thresholds are on x1 (act(gate) * up), which no activation computes; "
                              "measure again with relufy matched --threshold-on activation (the default)")
    own_name = str(architecture_of(config).activation_of(config))
    own = parse_activation(own_name)
    if own is None or own.name not in ("relu", "fatrelu") or own == PER_LAYER:
        raise ActivationError(f"{where}: per-layer FATReLU thresholds need a relu or fatrelu_<t> model, this one "
                              f"uses '{own_name}'")
    if result.get("identity") != identity:
        raise ActivationError(f"{where}: measured on another model than this one (config, weights or activation "
                              "differ); run relufy matched on this model and pass that JSON")
    targets = [entry["target"] for entry in entries]
    if target is None and len(targets) != 1:
        raise ActivationError(f"{where} holds targets {targets}; choose one with --matched-target")
    chosen = [entry for entry in entries if target is None or math.isclose(entry["target"], target)]
    if not chosen:
        raise ActivationError(f"{where} has no target {target}; it holds {targets}")
    floor = own.param or 0.0
    return [max(t, floor) for t in checked(chosen[0]["thresholds"], ffn_layers(config), where)]
