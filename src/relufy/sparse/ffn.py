"""`sparsify(model)`: run every converted FFN of a model through the sparse decode kernels.

The FFN modules stay where they are; each gets an instance `forward` that sends decode-sized
inputs (at most `SparseConfig.max_tokens` tokens) to `torch.ops.relufy.sparse_ffn` and anything
larger (prefill) to the module's own dense forward. On CUDA a decode-sized call made eagerly (HF
`generate` without torch.compile) runs the dense forward too, unless `SparseConfig.eager`: see
`takes_kernels`. The kernels want W_down^T row-major, so the
down projection's weight is replaced by a transposed view of such a copy: the module, its
state_dict shapes and the dense path see the usual [D, N] weight, and no memory is doubled.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..activations import PARAMETRIZED, Activation, module_class, parse_activation
from ..architectures import Architecture, architecture_for, ffn_modules
from ..errors import ActivationError, UnsupportedArchitectureError
from ..per_layer import LAYER_THRESHOLDS_KEY, PER_LAYER, checked, layer_thresholds
from .device import kernels_run_on
from .routing import dense_above as calibrated_dense_above

logger = logging.getLogger(__name__)

# Up to this many tokens per call the sparse kernels run; above it, the dense path. The union of
# active neurons grows with the batch, so large batches gain little; prefill is always dense. On an
# H200 at 90% zeros on the three Llama shapes (bench/sparse_ffn.py, docs/inference.md), independent
# tokens' union is 57% of the neurons at 8 tokens, where the sparse FFN takes 0.72-0.75 of dense time,
# and 82% at 16, where it takes 0.86-0.91.
DEFAULT_MAX_TOKENS = 8


@dataclass
class SparseConfig:
    """How `sparsify` routes calls: sparse kernels for decode-sized calls, dense for the rest.

    Inside the kernels, a call whose union of active neurons exceeds `dense_above` reads every
    down row in order (decided on the device); None measures that count on CUDA once per shape and
    GPU (`relufy.sparse.routing`). `gate` picks a gate variant of `kernels.GATE_VARIANTS` ("": the
    tile table's for the GPU at hand). `eager` runs the kernels in eager CUDA calls too, which by
    default run dense (`takes_kernels`): it only pays where the GPU, not the host, bounds an eager
    step, e.g. much larger models or fast hosts.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    dense_above: int | None = None
    gate: str = ""
    eager: bool = False

    def takes(self, tokens: int) -> bool:
        """Whether a call of `tokens` tokens goes to the kernels (the one rule; the rest run dense)."""
        return 0 < tokens <= self.max_tokens


@dataclass
class SparseFFN:
    """The weights one FFN hands to the kernels, and the switch between sparse and dense."""

    w_first: torch.Tensor  # W_gate (gated) or W_up (non-gated), N x K
    w_up: torch.Tensor | None  # W_up of gated FFNs, N x K
    w_down_t: torch.Tensor  # W_down^T, N x D, row-major
    b_first: torch.Tensor | None
    b_up: torch.Tensor | None
    b_down: torch.Tensor | None
    activation: int
    act_param: float
    workspace: torch.Tensor  # zero at rest; shared by the FFNs of a model (they run one after another)
    dense_forward: types.MethodType
    config: SparseConfig
    dense_above: int  # the active count above which the down kernel reads every row
    cuda_device: int | None  # the GPU the kernels run compiled on; None: Triton's interpreter runs them
    enabled: bool = True
    eager: bool = False  # eager CUDA calls run the kernels too (SparseConfig.eager, `sparse_eager`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        tokens = x.numel() // width
        if not self.enabled or not self.config.takes(tokens):
            return self.dense_forward(x)
        if not takes_kernels(self.cuda_device, self.eager):
            warn_once(EAGER_DENSE_NOTE)
            return self.dense_forward(x)
        y = torch.ops.relufy.sparse_ffn(x.reshape(tokens, width), self.w_first, self.w_up, self.w_down_t,
                                        self.b_first, self.b_up, self.b_down, self.workspace, self.activation,
                                        self.act_param, self.dense_above)
        return y.view(*x.shape[:-1], y.shape[-1])


_ATTRIBUTE = "_relufy_sparse"
EAGER_DENSE_NOTE = ("relufy.sparse: on CUDA the sparse FFNs run their dense forward in eager calls (outside "
                    "torch.compile and CUDA graphs, as in HF generate's default), where the host bounds a decode "
                    "step and the kernels' launches cost more than they save; compile the decode (generate with "
                    "cache_implementation='static') to run the kernels, or sparsify with SparseConfig(eager=True) "
                    "to run them in eager calls too")


def takes_kernels(cuda_device: int | None, eager: bool) -> bool:
    """Whether a decode-sized call runs the sparse kernels now; False: the FFN's dense forward.

    Eager decode on CUDA is bound by the host: the GPU finishes each kernel before Python issues the
    next, so a sparse call's op dispatch and two Triton launches cost more host time than the dense
    FFN's cuBLAS calls, while the GPU time they save is hidden (eager HF generate ran 0.7-0.85x dense on
    an H100). Traced by torch.compile or captured in a CUDA graph, that host work is paid once and the
    kernels win; `is_compiling` is a constant to dynamo, so a compiled graph holds the operator and no
    check. So do calls on a side stream, where CUDA graphs are captured and warmed up (`on_side_stream`).
    `eager` (SparseConfig.eager) asks for the kernels in eager calls anyway, and the interpreter
    (`cuda_device` None: no GPU to ask about) always runs them, since it is there to check them.
    """
    if torch.compiler.is_compiling() or eager or cuda_device is None:
        return True
    return torch.cuda.is_current_stream_capturing() or on_side_stream(cuda_device)


def on_side_stream(cuda_device: int) -> bool:
    """Whether calls on this GPU go to a stream other than its default one (stream id 0): a CUDA graph
    is captured on one (PyTorch refuses the default stream) and, as PyTorch's docs do it, warmed up on
    one first. The warm-up must run the kernels the capture launches: Triton loads a kernel into the GPU
    at its first launch, which a capture forbids. `torch.accelerator.current_stream` returns the stream
    from one C++ call; `torch.cuda.current_stream` also builds a Python `torch.cuda.Stream` around it, which
    cost every eager call about 6 us more on an H100 (docs/inference.md)."""
    return torch.accelerator.current_stream(cuda_device).stream_id != 0


def sparsify(model: nn.Module, config: SparseConfig | None = None) -> nn.Module:
    """Swap the forward of every converted FFN of `model` for the sparse kernels; return `model`.

    Needs a CUDA model (or Triton's interpreter, `TRITON_INTERPRET=1` before the kernels are
    imported, as the CPU tests use) and a
    ReLU-family activation (relu, fatrelu_t, shifted_relu_b, relu2); otherwise the model is left
    unchanged and a warning says why, once. Calling it again changes nothing. Move and cast the
    model first: the kernels keep references to the weights as they are now. On CUDA the kernels run
    in compiled or CUDA-graph-captured calls, and in eager ones only with `config.eager`
    (`takes_kernels`).
    """
    config = config or SparseConfig()
    reason = why_dense(model)
    if reason:
        warn_once(reason)
        return model
    from .kernels import ACTIVATION_CODES, workspace_size

    arch = architecture_for(model.config.model_type)
    activation = parse_activation(arch.activation_of(model.config))
    workspaces: dict[tuple[int, ...], torch.Tensor] = {}

    def workspace_for(w_down_t: torch.Tensor) -> torch.Tensor:
        """One per FFN shape, allocated now, before any CUDA graph capture."""
        shape = tuple(w_down_t.shape)
        if shape not in workspaces:
            workspaces[shape] = torch.zeros(workspace_size(config.max_tokens, *shape), dtype=torch.int32,
                                            device=w_down_t.device)
        return workspaces[shape]

    ffns = ffn_modules(model, arch)
    # per layer (the bare fatrelu), else the one parameter the activation name holds
    expected = (checked(layer_thresholds(model.config), len(ffns), "the model's config") if activation == PER_LAYER
                else [activation.param] * len(ffns))
    todo = [(index, ffn) for index, ffn in enumerate(ffns) if getattr(ffn, _ATTRIBUTE, None) is None]
    params = [_live_param(ffn, index, arch, activation, expected[index]) for index, ffn in todo]  # all checked first
    for (_, ffn), param in zip(todo, params):
        state = _sparse_ffn(ffn, arch, ACTIVATION_CODES[activation.name], param, workspace_for, config)
        setattr(ffn, _ATTRIBUTE, state)
        ffn.forward = state.forward
    return model


def sparse_ffns(model: nn.Module) -> list[SparseFFN]:
    """The sparsified FFNs of `model`, in layer order (empty when `sparsify` changed nothing)."""
    return [state for module in model.modules() if (state := getattr(module, _ATTRIBUTE, None)) is not None]


def sparse_ffn_count(model: nn.Module) -> int:
    """How many FFNs of `model` run through the sparse kernels."""
    return len(sparse_ffns(model))


def sparse_enabled(model: nn.Module, enabled: bool):
    """Run every sparsified FFN as sparsified (True: the kernels where `takes_kernels` says so) or dense
    (False) inside the block.

    The switch is read at call time, so a CUDA graph captured inside the block keeps its path.
    """
    return _switched(model, "enabled", enabled)


def sparse_eager(model: nn.Module, eager: bool = True):
    """Inside the block, eager CUDA calls of every sparsified FFN run the kernels (True) or their dense
    forward (False) on the default stream, whatever `SparseConfig.eager` said: for code that times or
    checks the kernels in eager calls (`relufy speed`'s FFN timings and logit margins, the host-cost
    bench)."""
    return _switched(model, "eager", eager)


def eager_runs_dense(model: nn.Module) -> bool:
    """Whether an eager decode-sized call of `model`'s sparse FFNs runs dense now (`takes_kernels`: on
    CUDA without `eager`); False for a model without sparse FFNs."""
    return any(state.enabled and state.cuda_device is not None and not state.eager for state in sparse_ffns(model))


@contextlib.contextmanager
def _switched(model: nn.Module, attribute: str, value: bool):
    """Every sparsified FFN's `attribute` set to `value` inside the block, then back to what each had."""
    states = sparse_ffns(model)
    before = [getattr(state, attribute) for state in states]
    for state in states:
        setattr(state, attribute, value)
    try:
        yield model
    finally:
        for state, old in zip(states, before):
            setattr(state, attribute, old)


def why_dense(model: nn.Module) -> str | None:
    """Why `sparsify` must leave this model alone (a SiLU FFN, no CUDA...), or None."""
    config = getattr(model, "config", None)
    try:
        arch = architecture_for(getattr(config, "model_type", None))
    except UnsupportedArchitectureError as exc:
        return f"relufy.sparse: {exc}; the model runs dense"
    value = str(arch.activation_of(config))
    if parse_activation(value) is None:
        return (f"relufy.sparse: the FFN activation is '{value}', not a ReLU-family one (relu, fatrelu_t, "
                "shifted_relu_b, relu2), so it has no exact zeros to skip; convert it first. The model runs dense")
    device = next(model.parameters()).device
    if not kernels_run_on(device):
        return (f"relufy.sparse: the model is on {device.type}, and the sparse kernels need CUDA (or Triton's "
                "interpreter, TRITON_INTERPRET=1 before they are imported); the model runs dense")
    return None


def _live_param(ffn: nn.Module, index: int, arch: Architecture, activation: Activation,
                expected: float | None) -> float:
    """The threshold (FATReLU) or shift (ShiftedReLU) this FFN's activation module computes with now.

    The dense path runs the module, so the kernels must use its value, not the config's (`expected`: the
    activation name's parameter, or this layer's entry of per-layer thresholds): a calibration or a hand
    edit may have changed one and not the other. When they disagree one of the two is stale, and
    `sparsify` refuses rather than guess which.
    """
    if not activation.needs_relufy:
        return 0.0
    attribute, cls = PARAMETRIZED[activation.name], module_class(activation.name).__name__
    # by name: a checkpoint loaded through its remote code (modeling_relufy.py) has its own copy of the class
    held = [float(getattr(m, attribute)) for m in ffn.modules() if type(m).__name__ == cls and hasattr(m, attribute)]
    if len(held) != 1:
        raise ActivationError(f"relufy.sparse: FFN {index} ({type(ffn).__name__}) has {len(held)} {cls} modules, "
                              f"expected one for '{activation.config_value}'; build the model from its config "
                              "(from_pretrained) so each FFN holds its activation module")
    if held[0] != expected and activation.param is None:
        raise ActivationError(f"relufy.sparse: FFN {index}'s {cls} has {attribute} {held[0]!r} but the config's "
                              f"{LAYER_THRESHOLDS_KEY} says {expected!r}; set one to the other so both describe the "
                              "activation the model runs")
    if held[0] != expected:
        wanted = Activation(activation.name, held[0]).config_value
        raise ActivationError(f"relufy.sparse: FFN {index}'s {cls} has {attribute} {held[0]!r} but the config says "
                              f"'{activation.config_value}'; set config.{arch.activation_key} = '{wanted}' (or the "
                              f"module's {attribute} back) so both describe the activation the model runs")
    return held[0]


@functools.cache
def warn_once(message: str) -> None:
    """Log `message` the first time only in this process (transformers' `warning_once` rule);
    `warn_once.cache_clear()` forgets what was said."""
    logger.warning(message)


def _sparse_ffn(ffn: nn.Module, arch: Architecture, activation: int, act_param: float, workspace_for,
                config: SparseConfig) -> SparseFFN:
    """The kernel-side view of one FFN module; moves W_down (and GPT-2's W_up) to row-per-neuron layout."""
    down = getattr(ffn, arch.down)
    if arch.gated and arch.gate_up:
        fused = getattr(ffn, arch.gate_up)
        n = fused.weight.shape[0] // 2
        w_first, w_up = fused.weight[:n], fused.weight[n:]
        b_first, b_up = (None, None) if fused.bias is None else (fused.bias[:n], fused.bias[n:])
    elif arch.gated:
        gate, up = getattr(ffn, arch.gate), getattr(ffn, arch.up)
        w_first, w_up, b_first, b_up = gate.weight, up.weight, gate.bias, up.bias
    else:
        up = getattr(ffn, arch.up)
        w_first, w_up, b_first, b_up = _rows_per_neuron(up, output_rows=True), None, up.bias, None
    w_down_t = _rows_per_neuron(down, output_rows=False)
    if w_up is not None and (b_first is None) != (b_up is None):
        raise UnsupportedArchitectureError(f"{type(ffn).__name__}: the sparse kernels need a bias on both gate and up "
                                           "projections or on neither")
    w_first, w_up = w_first.detach(), None if w_up is None else w_up.detach()
    dense_above = config.dense_above
    if dense_above is None:
        dense_above = calibrated_dense_above(w_first, w_up, w_down_t, config.max_tokens)
    return SparseFFN(w_first=w_first, w_up=w_up, w_down_t=w_down_t, b_first=_detached(b_first), b_up=_detached(b_up),
                     b_down=_detached(down.bias), activation=activation, act_param=float(act_param),
                     workspace=workspace_for(w_down_t), dense_forward=ffn.forward, config=config,
                     dense_above=dense_above, eager=config.eager, cuda_device=_compiled_on(w_down_t.device))


def _compiled_on(device: torch.device) -> int | None:
    """The index of the GPU the kernels run compiled on for tensors on `device`; None where Triton's
    interpreter runs them (a CPU model, or TRITON_INTERPRET=1 at import)."""
    from .kernels import interpreted

    if device.type != "cuda" or interpreted():
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _rows_per_neuron(layer: nn.Module, output_rows: bool) -> torch.Tensor:
    """The weight as a row-major N x width matrix with one row per FFN neuron.

    nn.Linear stores [out, in]: an up projection already has a row per neuron, a down projection
    needs its transpose. GPT-2's Conv1D stores [in, out], the other way round. Where a transpose
    is needed, the parameter is replaced by a transposed view of a contiguous copy.
    """
    weight = layer.weight
    conv1d = type(layer).__name__ == "Conv1D"
    rows = weight.t() if output_rows == conv1d else weight
    if not rows.is_contiguous():
        rows = rows.detach().contiguous()
        layer.weight = nn.Parameter(rows.t(), requires_grad=weight.requires_grad)
    return rows.detach()


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()
