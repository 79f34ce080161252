"""relufy: turn Swish/GELU LLMs into sparse ReLU LLMs (ProSparse) and measure the result.

`import relufy` is cheap: it imports neither torch nor transformers. A converted `relu` or `relu2`
folder loads with plain transformers. A `fatrelu_<t>` or `shifted_relu_<b>` folder loads with
`trust_remote_code=True` (it ships `modeling_relufy.py`), or in this process after
`relufy.register_activations()`, which teaches transformers those names. A folder with one FATReLU
threshold per layer (config `fatrelu` + `relufy_layer_thresholds`) loads with `trust_remote_code=True`
or relufy's loader, `relufy.checkpoint.load_model`.
"""

__version__ = "0.1.0"

from .activations import Activation, make_activation, register_activations  # noqa: E402

__all__ = ["Activation", "make_activation", "register_activations", "__version__"]
