"""vLLM's own model classes of the families relufy converts, accepting ReLU-family FFN activations.

vLLM's MLP classes read the activation key of the config when they are built, and most refuse a
ReLU-family value (Llama's takes only silu, Gemma 2's only gelu_pytorch_tanh); Falcon's and Gemma's
build GELU whatever it says. Each class here names its family's activation key and a placeholder value
vLLM's MLP accepts, builds vLLM's own model with the key set to the placeholder for the duration of the
constructor (the MLPs are the only readers of that key), puts the config's value back, and then:

- gated FFNs (act(gate) * up: Llama, Mistral, Qwen2, Qwen3, Granite, Phi-3, Gemma, Gemma 2, Gemma 3):
  each decoder layer gets a `RelufyMLP` that adopts the layer's gate_up_proj and down_proj;
- non-gated FFNs (act(up): GPT-2, Falcon): each layer's MLP stays vLLM's, with relufy's activation
  module as its `act`. The sparse op is for gated FFNs, so these run dense.

Everything else (attention, norms, Gemma's embedding scaling, weight loading) is vLLM's. With any other
activation the class is exactly vLLM's. After the weights are loaded, `load_weights` turns the sparse
decode path on where it can run (`RelufyMLP.prepare_sparse`) and puts that choice into vLLM's
torch.compile cache key (`_add_compile_factor`).
"""

from __future__ import annotations

import contextlib
import operator

from vllm.model_executor.models.falcon import FalconForCausalLM
from vllm.model_executor.models.gemma import GemmaForCausalLM
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.gpt2 import GPT2LMHeadModel
from vllm.model_executor.models.granite import GraniteForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.phi3 import Phi3ForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ..activations import Activation, parse_activation
from ..per_layer import PER_LAYER, checked, layer_thresholds
from .mlp import RelufyMLP, log_once, workspace_allocator

# the key of vLLM's `additional_config` that says whether the FFNs run sparse (see _add_compile_factor)
COMPILE_FACTOR = "relufy_sparse_ffn"


@contextlib.contextmanager
def _built_with(config, key: str, placeholder: str, others: dict[str, str]):
    """Inside the block `config.<key>` is `placeholder` (and each key of `others` its value); yields the
    ReLU-family activation `key` really names, or None (and changes nothing) for any other value."""
    value = getattr(config, key, None)
    activation = parse_activation(value) if isinstance(value, str) else None
    if activation is None:
        yield None
        return
    held = {name: getattr(config, name, None) for name in {key, *others}}
    for name, placeholder_value in {**others, key: placeholder}.items():
        setattr(config, name, placeholder_value)
    try:
        yield activation
    finally:
        for name, original in held.items():
            setattr(config, name, original)


def _relufy_ffns(layers, activation: Activation, config, gated: bool) -> None:
    """Give the FFN of every decoder layer this rank holds relufy's activation: a RelufyMLP around the same
    linears (gated), or relufy's module as the MLP's `act` (non-gated). With per-layer thresholds (the bare
    `fatrelu`, relufy.per_layer) each layer's FATReLU gets its own."""
    thresholds = None
    if activation == PER_LAYER:
        thresholds = checked(layer_thresholds(config), len(layers), "the model's config")
    for index, layer in enumerate(layers):  # every layer index, placeholders of other ranks included
        if not hasattr(layer, "mlp"):  # another pipeline rank's layer (vLLM's PPMissingLayer)
            continue
        own = activation if thresholds is None else Activation("fatrelu", thresholds[index])
        if gated:
            layer.mlp = RelufyMLP(layer.mlp, own)
        elif hasattr(layer.mlp, "act"):
            layer.mlp.act = own.module()
        else:  # never leave the placeholder's activation in place
            raise TypeError(f"relufy: vLLM's {type(layer.mlp).__name__} has no `act` to replace")


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
        log_once("relufy: additional_config is not a dict, so vLLM's compile cache key does not say whether the "
                 "FFNs run sparse; give each RELUFY_VLLM_SPARSE setting its own VLLM_CACHE_ROOT")


class _RelufyModelMixin:
    """The shared constructor and post-load hook; put it before the vLLM class in the bases.

    Each class declares its family's `activation_key` (the config key that names the FFN activation, as in
    convert/architectures.yaml) and `placeholder` (a value of that key vLLM's MLP accepts, set while vLLM
    builds the model). `gated` says whether the FFN is act(gate) * up (RelufyMLP) or act(up) (vLLM's MLP,
    relufy's activation), and `layers_path` where the decoder layers are, from the model (not named
    `layers`: vLLM looks for a `layers` attribute on a model that has no `model`, as GPT-2 and Falcon have not).
    """

    activation_key: str
    placeholder: str
    also_during_build: dict[str, str] = {}  # other keys vLLM's MLP reads, held while it builds
    gated = True
    layers_path = "model.layers"

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        config = vllm_config.model_config.hf_config.get_text_config()
        with _built_with(config, self.activation_key, self.placeholder, self.also_during_build) as activation:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        if activation is not None:
            _relufy_ffns(operator.attrgetter(self.layers_path)(self), activation, config, self.gated)
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


# Gated FFNs: a RelufyMLP around vLLM's gate_up_proj and down_proj, sparse at decode on CUDA.


class ReluLlamaForCausalLM(_RelufyModelMixin, LlamaForCausalLM):
    """LlamaForCausalLM with relu, relu2, fatrelu_<t> (or per-layer fatrelu) or shifted_relu_<b> FFNs."""

    activation_key, placeholder = "hidden_act", "silu"


class ReluMistralForCausalLM(_RelufyModelMixin, MistralForCausalLM):
    """MistralForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""

    activation_key, placeholder = "hidden_act", "silu"


class ReluQwen2ForCausalLM(_RelufyModelMixin, Qwen2ForCausalLM):
    """Qwen2ForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""

    activation_key, placeholder = "hidden_act", "silu"


class ReluQwen3ForCausalLM(_RelufyModelMixin, Qwen3ForCausalLM):
    """Qwen3ForCausalLM with relu, relu2, fatrelu_<t> or shifted_relu_<b> FFNs."""

    activation_key, placeholder = "hidden_act", "silu"


class ReluGraniteForCausalLM(_RelufyModelMixin, GraniteForCausalLM):
    """GraniteForCausalLM with ReLU-family FFNs (vLLM's GraniteMLP takes only silu)."""

    activation_key, placeholder = "hidden_act", "silu"


class ReluPhi3ForCausalLM(_RelufyModelMixin, Phi3ForCausalLM):
    """Phi3ForCausalLM (vLLM's LlamaForCausalLM loading Phi-3's merged gate_up_proj) with ReLU-family FFNs."""

    activation_key, placeholder = "hidden_act", "silu"


class ReluGemmaForCausalLM(_RelufyModelMixin, GemmaForCausalLM):
    """GemmaForCausalLM with ReLU-family FFNs. vLLM's GemmaMLP builds GELU from `hidden_activation`, or
    tanh-GELU where the config has none, and reads `hidden_act` (the key transformers' Gemma uses) only to
    log a warning: without the plugin a relufied Gemma runs GELU. While vLLM builds the model
    `hidden_activation` says tanh-GELU too, so GemmaMLP does not log that it changed the activation to
    GELU, which the RelufyMLP replacing it would make untrue."""

    activation_key, placeholder = "hidden_act", "gelu_pytorch_tanh"
    also_during_build = {"hidden_activation": "gelu_pytorch_tanh"}


class ReluGemma2ForCausalLM(_RelufyModelMixin, Gemma2ForCausalLM):
    """Gemma2ForCausalLM with ReLU-family FFNs (vLLM's Gemma2MLP takes only gelu_pytorch_tanh)."""

    activation_key, placeholder = "hidden_activation", "gelu_pytorch_tanh"


class ReluGemma3ForCausalLM(_RelufyModelMixin, Gemma3ForCausalLM):
    """Gemma3ForCausalLM (text-only Gemma 3, model_type gemma3_text) with ReLU-family FFNs (vLLM's Gemma3MLP
    takes the gated activations of vLLM's registry: gelu, gelu_pytorch_tanh, silu...)."""

    activation_key, placeholder = "hidden_activation", "gelu_pytorch_tanh"


# Non-gated FFNs: vLLM's MLP with relufy's activation module, dense.


class ReluGPT2LMHeadModel(_RelufyModelMixin, GPT2LMHeadModel):
    """GPT2LMHeadModel with ReLU-family FFNs. vLLM's GPT2MLP builds relu and relu2 itself and refuses
    fatrelu_<t> and shifted_relu_<b>; relufy's module serves all of them, with relufy's definitions."""

    activation_key, placeholder, gated, layers_path = "activation_function", "gelu_new", False, "transformer.h"


class ReluFalconForCausalLM(_RelufyModelMixin, FalconForCausalLM):
    """FalconForCausalLM with ReLU-family FFNs. vLLM's FalconMLP builds GELU whatever `activation` says:
    without the plugin a relufied Falcon runs GELU."""

    activation_key, placeholder, gated, layers_path = "activation", "gelu", False, "transformer.h"
