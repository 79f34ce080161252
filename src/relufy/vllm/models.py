"""vLLM's Llama, Mistral, Qwen2 and Qwen3 classes, accepting ReLU-family FFN activations.

vLLM's MLP classes refuse any `hidden_act` but silu when they are built. Each class here builds
vLLM's own model with `hidden_act` set to silu for the duration of the constructor (the MLPs are
the only readers of that key), puts the config's value back, and then gives each decoder layer a
`RelufyMLP` that adopts the layer's gate_up_proj and down_proj. With any other activation the
class is exactly vLLM's. After the weights are loaded, `load_weights` turns the sparse decode path
on where it can run (`RelufyMLP.prepare_sparse`) and puts that choice into vLLM's torch.compile cache
key (`_add_compile_factor`).
"""

from __future__ import annotations

import contextlib

from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ..activations import Activation, parse_activation
from ..per_layer import PER_LAYER, checked, layer_thresholds
from .mlp import RelufyMLP, _log_once, workspace_allocator

# the key of vLLM's `additional_config` that says whether the FFNs run sparse (see _add_compile_factor)
COMPILE_FACTOR = "relufy_sparse_ffn"


@contextlib.contextmanager
def _built_as_silu(vllm_config):
    """Inside the block the text config says silu; yields the ReLU-family activation it really names."""
    config = vllm_config.model_config.hf_config.get_text_config()
    value = getattr(config, "hidden_act", None)
    activation = parse_activation(value) if isinstance(value, str) else None
    if activation is None:
        yield None
        return
    config.hidden_act = "silu"
    try:
        yield activation
    finally:
        config.hidden_act = value


def _adopt_mlps(model: nn.Module, activation: Activation, config) -> None:
    """Replace the MLP of every decoder layer this rank holds by a RelufyMLP around the same linears; with
    per-layer thresholds (the bare `fatrelu`, relufy.per_layer) each layer's FATReLU gets its own."""
    thresholds = layer_thresholds(config) if activation == PER_LAYER else None
    if activation == PER_LAYER:
        thresholds = checked(thresholds, len(model.model.layers), "the model's config")
    for index, layer in enumerate(model.model.layers):  # every layer index, placeholders of other ranks included
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate_up_proj"):
            layer.mlp = RelufyMLP(mlp, activation if thresholds is None else Activation("fatrelu", thresholds[index]))


def _add_compile_factor(vllm_config, sparse: bool) -> None:
    """Make whether the FFNs run sparse part of vLLM's torch.compile cache key.

    vLLM compiles the model once and keeps the graph on disk, under VLLM_CACHE_ROOT/torch_compile_cache/,
    keyed by a hash of `VllmConfig.compute_hash()`, the variables `vllm.envs` knows (`compile_factors()`),
    the traced source files and the compiler; a later start with the same key runs that graph without
    tracing again. `RelufyMLP.forward` takes the sparse op or vLLM's linears depending on what
    `prepare_sparse` decided, which follows RELUFY_VLLM_SPARSE (no vLLM variable), the device, Triton and
    the quantization: without this factor, serving a folder sparse and then with RELUFY_VLLM_SPARSE=0 (or
    the reverse) can run the other setting's graph.

    `VllmConfig.additional_config` is the field vLLM hashes for settings from outside vLLM (a dict, hashed
    as JSON). vLLM computes the key when it first compiles, at the model's first forward, after
    `load_weights` (0.26 and 0.32), so the decision is recorded in time. The decision, not the switch, is
    recorded: where both settings run the same dense graph (CPU, quantized linears) they share one cache
    entry. Models without a RelufyMLP (SiLU folders) record nothing and keep vLLM's own key.
    """
    if isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config[COMPILE_FACTOR] = sparse
    else:  # a user's SupportsHash object: nothing to add a key to
        _log_once("relufy: additional_config is not a dict, so vLLM's compile cache key does not say whether the "
                  "FFNs run sparse; give each RELUFY_VLLM_SPARSE setting its own VLLM_CACHE_ROOT")


class _RelufyModelMixin:
    """The shared constructor and post-load hook; put it before the vLLM class in the bases."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        with _built_as_silu(vllm_config) as activation:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        if activation is not None:
            _adopt_mlps(self, activation, vllm_config.model_config.hf_config.get_text_config())
        self._vllm_config = vllm_config  # the object vLLM hashes for its compile cache, see load_weights

    def load_weights(self, weights):
        """vLLM's loading, then the sparse path where it can run.

        The model's `load_weights` is the post-load hook every supported vLLM release calls (0.32 also
        calls a model's `process_weights_after_loading`, 0.26 does not). It runs before the linears'
        quant methods post-process their weights; `prepare_sparse` only reads unquantized weights,
        which that step leaves as they are on CUDA. A reload (`load_weights` again) recalibrates.
        Whether the sparse path is on then goes into vLLM's compile cache key (`_add_compile_factor`).
        """
        loaded = super().load_weights(weights)
        workspace_for = workspace_allocator()
        mlps = [module for module in self.modules() if isinstance(module, RelufyMLP)]
        sparse = [mlp.prepare_sparse(workspace_for) for mlp in mlps]
        if mlps:
            _add_compile_factor(self._vllm_config, any(sparse))
        return loaded


class ReluLlamaForCausalLM(_RelufyModelMixin, LlamaForCausalLM):
    """LlamaForCausalLM with relu, relu2, fatrelu_<t> (or per-layer fatrelu) or shifted_relu_<b> FFNs."""


class ReluMistralForCausalLM(_RelufyModelMixin, MistralForCausalLM):
    """MistralForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""


class ReluQwen2ForCausalLM(_RelufyModelMixin, Qwen2ForCausalLM):
    """Qwen2ForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""


class ReluQwen3ForCausalLM(_RelufyModelMixin, Qwen3ForCausalLM):
    """Qwen3ForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""
