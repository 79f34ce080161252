"""relufy's vLLM plugin: relufied Llama, Mistral, Qwen2 and Qwen3 models in vLLM's own model classes.

vLLM loads this through the `vllm.general_plugins` entry point (`relufy = "relufy.vllm:register"`,
installed with `pip install 'relufy[vllm]'`) in every process it starts. `register()`:

- teaches transformers relufy's parametrized activation names (`fatrelu_<t>`, `shifted_relu_<b>`),
  so those folders load on vLLM's Transformers backend without remote code;
- registers, under the architecture names of `ARCHITECTURES`, subclasses of vLLM's model classes
  (`relufy.vllm.models`) that build a ReLU-family FFN (`relufy.vllm.mlp.RelufyMLP`) where the
  config's `hidden_act` is relu, relu2, fatrelu_<t> or shifted_relu_<b>, and are vLLM's own
  classes, unchanged, for any other activation.

Importing this package costs neither torch nor vLLM; `register()` imports them.
Set `RELUFY_VLLM_SPARSE=0` to run the ReLU-family FFNs dense through vLLM's linears (no sparse op).
"""

from __future__ import annotations

# vLLM architecture name -> relufy's class in relufy.vllm.models
ARCHITECTURES = {
    "LlamaForCausalLM": "ReluLlamaForCausalLM",
    "MistralForCausalLM": "ReluMistralForCausalLM",
    "Qwen2ForCausalLM": "ReluQwen2ForCausalLM",
    "Qwen3ForCausalLM": "ReluQwen3ForCausalLM",
}


def register() -> None:
    """vLLM's plugin hook: register relufy's activations and model classes. Idempotent and cheap."""
    from vllm import ModelRegistry

    from ..activations import register_activations

    register_activations()
    for architecture, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, f"relufy.vllm.models:{cls}")
