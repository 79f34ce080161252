"""relufy's vLLM plugin: relufied models in vLLM's own model classes.

vLLM loads this through the `vllm.general_plugins` entry point (`relufy = "relufy.vllm:register"`,
installed with `pip install 'relufy[vllm]'`) in every process it starts. `register()`:

- teaches transformers relufy's parametrized activation names (`fatrelu_<t>`, `shifted_relu_<b>`),
  so those folders load on vLLM's Transformers backend without remote code. That backend is also
  where vLLM serves, dense, the families it has no class of its own for (OLMo 2; GPT-NeoX in 0.32,
  whose own class in 0.26 builds relu and relu2 and refuses the parametrized names);
- registers, under the architecture names of `ARCHITECTURES`, subclasses of vLLM's model classes
  (`relufy.vllm.models`) that build the FFNs with relufy's activation where the config's activation
  key is relu, relu2, fatrelu_<t> or shifted_relu_<b>, and are vLLM's own classes, unchanged, for
  any other activation. Gated FFNs become a `relufy.vllm.mlp.RelufyMLP` (sparse at decode on CUDA);
  the non-gated ones of `NOT_GATED` keep vLLM's MLP and run dense.

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
    "GraniteForCausalLM": "ReluGraniteForCausalLM",
    "Phi3ForCausalLM": "ReluPhi3ForCausalLM",
    "GemmaForCausalLM": "ReluGemmaForCausalLM",
    "Gemma2ForCausalLM": "ReluGemma2ForCausalLM",
    "Gemma3ForCausalLM": "ReluGemma3ForCausalLM",
    "GPT2LMHeadModel": "ReluGPT2LMHeadModel",
    "FalconForCausalLM": "ReluFalconForCausalLM",
}
# the architectures above whose FFN is act(up), not act(gate) * up: no sparse op, they run dense
NOT_GATED = ("GPT2LMHeadModel", "FalconForCausalLM")


def register() -> None:
    """vLLM's plugin hook: register relufy's activations and model classes. Idempotent and cheap."""
    from vllm import ModelRegistry

    from ..activations import register_activations

    register_activations()
    for architecture, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, f"relufy.vllm.models:{cls}")
