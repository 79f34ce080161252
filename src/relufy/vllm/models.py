"""vLLM's Llama, Mistral, Qwen2 and Qwen3 classes, accepting ReLU-family FFN activations.

vLLM's MLP classes refuse any `hidden_act` but silu when they are built. Each class here builds
vLLM's own model with `hidden_act` set to silu for the duration of the constructor (the MLPs are
the only readers of that key), puts the config's value back, and then gives each decoder layer a
`RelufyMLP` that adopts the layer's gate_up_proj and down_proj. With any other activation the
class is exactly vLLM's. After the weights are loaded, `load_weights` turns the sparse decode path
on where it can run (`RelufyMLP.prepare_sparse`).
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
from .mlp import RelufyMLP, workspace_allocator


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


class _RelufyModelMixin:
    """The shared constructor and post-load hook; put it before the vLLM class in the bases."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        with _built_as_silu(vllm_config) as activation:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        if activation is not None:
            _adopt_mlps(self, activation, vllm_config.model_config.hf_config.get_text_config())

    def load_weights(self, weights):
        """vLLM's loading, then the sparse path where it can run.

        The model's `load_weights` is the post-load hook every supported vLLM release calls (0.32 also
        calls a model's `process_weights_after_loading`, 0.26 does not). It runs before the linears'
        quant methods post-process their weights; `prepare_sparse` only reads unquantized weights,
        which that step leaves as they are on CUDA. A reload (`load_weights` again) recalibrates.
        """
        loaded = super().load_weights(weights)
        workspace_for = workspace_allocator()
        for module in self.modules():
            if isinstance(module, RelufyMLP):
                module.prepare_sparse(workspace_for)
        return loaded


class ReluLlamaForCausalLM(_RelufyModelMixin, LlamaForCausalLM):
    """LlamaForCausalLM with relu, relu2, fatrelu_<t> (or per-layer fatrelu) or shifted_relu_<b> FFNs."""


class ReluMistralForCausalLM(_RelufyModelMixin, MistralForCausalLM):
    """MistralForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""


class ReluQwen2ForCausalLM(_RelufyModelMixin, Qwen2ForCausalLM):
    """Qwen2ForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""


class ReluQwen3ForCausalLM(_RelufyModelMixin, Qwen3ForCausalLM):
    """Qwen3ForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""
