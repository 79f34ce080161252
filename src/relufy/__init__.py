"""relufy: turn Swish/GELU LLMs into sparse ReLU LLMs (ProSparse) and measure the result.

Importing relufy registers its activations (`fatrelu_<t>`, `shifted_relu_<b>`) with transformers,
so converted checkpoints load with plain `AutoModelForCausalLM.from_pretrained`.
"""

__version__ = "0.1.0"

from .activations import Activation, make_activation, register_on_transformers_import  # noqa: E402

register_on_transformers_import()

__all__ = ["Activation", "make_activation", "__version__"]
