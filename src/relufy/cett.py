"""PPL-p% sparsity (Sparsing Law, arXiv 2411.02335) built on CETT (ReLU^2 Wins, arXiv 2402.03804).

Neuron i of an FFN outputs n_i = x1_i * W_down[:, i], so ||n_i||_2 = |x1_i| * ||W_down[:, i]||_2.
For a threshold eps, D = {i : ||n_i|| <= eps} and, per token, CETT = ||sum_{i in D} n_i|| / ||FFN(x)||
(averaged over tokens). One CETT target is shared by all layers; each layer's eps comes from a
binary search on cached dense activations (no forward pass), on the device of the layer's down
projection: on a GPU machine the search's thousands of small products take milliseconds there
where they took seconds per pass on the host. Zeroing the x1 entries in D (a
pre-hook on each down projection, found through `relufy.architectures.down_projections`) gives the
thresholded model; its sparsity is the fraction of x1 entries in D. An outer binary search on
CETT (tolerance 1e-3) finds the largest CETT whose held-out perplexity stays within (1 + p%) of
the dense perplexity. Works for any activation: `<=` makes exact zeros of ReLU count as inactive.

Cost per p: one forward pass over the held-out blocks per outer step (about log2(1/tol) = 10),
plus one dense pass shared by all p; perplexities are memoised across p values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError
from .metrics import mean_token_loss, perplexity
from .architectures import down_projections
from .options import DEFAULT_PS
from .probe import SparsityProbe

logger = logging.getLogger(__name__)



def down_matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The down projection as (intermediate x hidden) weight and bias: y = x1 @ W + b (Linear or GPT-2 Conv1D).

    Views of the module's own tensors, in its dtype and on its device: no float32 copy of every layer
    is kept (a Llama-2-7B's would be 5.8 GB); `LayerCalibration` casts per product.
    """
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        weight = weight.t()
    return weight, None if getattr(module, "bias", None) is None else module.bias.detach()


@dataclass
class LayerCalibration:
    """One layer's cached dense x1 sample and what CETT needs from it."""

    x1: torch.Tensor  # tokens x intermediate (float32, calibration sample, on the weight's device)
    weight: torch.Tensor  # intermediate x hidden, any dtype (products are taken in float32)
    bias: torch.Tensor | None
    column_norms: torch.Tensor  # ||W_down[:, i]||_2 per neuron (float32)
    output_norms: torch.Tensor = field(init=False)  # ||FFN(x)||_2 per token
    magnitudes: torch.Tensor = field(init=False)  # ||n_i||_2 per token and neuron
    _seen: dict[float, float] = field(init=False, default_factory=dict)  # eps -> CETT

    def __post_init__(self) -> None:
        out = self.x1 @ self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        self.output_norms = out.norm(dim=-1).clamp_min(1e-12)
        self.magnitudes = self.x1.abs() * self.column_norms

    def cett(self, eps: float) -> float:
        """Mean over tokens of ||sum_{i: ||n_i|| <= eps} n_i|| / ||FFN(x)|| (remembered per eps)."""
        if eps not in self._seen:
            dropped = torch.where(self.magnitudes <= eps, self.x1, torch.zeros_like(self.x1))
            self._seen[eps] = float(((dropped @ self.weight.float()).norm(dim=-1) / self.output_norms).mean())
        return self._seen[eps]

    def eps_for(self, target: float, *, iterations: int = 40, tolerance: float = 1e-4) -> float:
        """Binary search for the eps whose CETT is `target` (CETT grows with eps).

        Starts from the tightest bracket of earlier searches, so the outer search's later steps
        cost a few matrix products each.
        """
        if target <= 0:
            return 0.0
        lo, hi = 0.0, float(self.magnitudes.max())
        if self.cett(hi) <= target:
            return hi
        for eps, value in self._seen.items():
            if value <= target and eps > lo:
                lo = eps
            elif value > target and eps < hi:
                hi = eps
        for _ in range(iterations):
            if abs(self.cett(lo) - target) <= tolerance or hi - lo <= 1e-7 * hi:
                break
            mid = 0.5 * (lo + hi)
            if self.cett(mid) <= target:
                lo = mid
            else:
                hi = mid
        return lo


@dataclass
class Evaluation:
    """Held-out perplexity and sparsity of the model thresholded at one CETT value."""

    cett: float
    ppl: float
    sparsity: float
    per_layer: list[float]
    thresholds: list[float]


class LayerMask:
    """Hooks on one module per FFN layer that zero what falls under that layer's threshold, and count the
    zeros that leave it (`per_layer`). A subclass names the modules and registers its hook (`_register`)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.thresholds = [0.0] * len(self.modules)
        self.masked = [0] * len(self.modules)
        self.elements = [0] * len(self.modules)
        self._handles: list = []

    def __enter__(self) -> "LayerMask":
        self._handles = [self._register(i, m) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set(self, thresholds: list[float]) -> None:
        self.thresholds = list(thresholds)
        self.masked = [0] * len(self.modules)
        self.elements = [0] * len(self.modules)

    def _count(self, index: int, zeros: torch.Tensor) -> None:
        self.masked[index] = self.masked[index] + zeros.sum()  # a tensor: no device sync per layer
        self.elements[index] += zeros.numel()

    def _register(self, index: int, module: nn.Module):
        raise NotImplementedError

    def per_layer(self) -> list[float]:
        return [float(m) / e if e else float("nan") for m, e in zip(self.masked, self.elements)]


class NeuronMask(LayerMask):
    """Pre-hooks on the down projections that zero x1 entries at or below a per-layer threshold.

    With `column_norms` (CETT) an entry's score is |x1_i| * ||W_down[:, i]||, the norm of the
    neuron's output; without them it is |x1_i| itself (magnitude thresholding of x1).
    `<=` makes exact zeros count as masked, so threshold 0 changes nothing.
    """

    def __init__(self, model: nn.Module, column_norms: list[torch.Tensor] | None = None):
        super().__init__(down_projections(model))
        self.column_norms = column_norms

    def _register(self, index: int, module: nn.Module):
        def mask(module: nn.Module, args: tuple):
            x1 = args[0]
            score = x1.abs()
            if self.column_norms is not None:
                score = score * self.column_norms[index].to(x1.device, x1.dtype)
            drop = score <= self.thresholds[index]
            self._count(index, drop)
            return (x1.masked_fill(drop, 0),) + tuple(args[1:])

        return module.register_forward_pre_hook(mask)


@torch.no_grad()
def thresholded_perplexity(model: nn.Module, blocks: torch.Tensor, mask: LayerMask, thresholds: list[float], *,
                           batch_size: int = 4, desc: str = "", progress: bool = False) -> tuple[float, list[float]]:
    """Perplexity over `blocks` with `mask` (a NeuronMask, or matched's ActivationMask) zeroing what falls below
    `thresholds`, and the zero-ratio it leaves per layer.

    The one thresholded pass that PPL-p% sparsity and `relufy matched` share; all-zero thresholds
    give the dense perplexity and the exact-zero ratio.
    """
    with mask:
        mask.set(thresholds)
        loss = mean_token_loss(model, blocks, batch_size=batch_size, desc=desc, progress=progress)
        per_layer = mask.per_layer()
    return perplexity(loss), per_layer


class X1Sample:
    """Up to `tokens` rows of x1 per layer, spread evenly over each batch, kept on the CPU in float32.

    What PPL-p%'s threshold calibration reads: a small sample of every layer from its dense pass.
    """

    def __init__(self, num_layers: int, tokens: int):
        self.tokens, self.kept = tokens, 0
        self.chunks: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def add(self, inputs: list[torch.Tensor | None]) -> None:
        """Keep rows of this forward's x1 (the probe's `last_inputs`) until `tokens` are kept."""
        if self.kept >= self.tokens:
            return
        take = 0
        for index in range(len(self.chunks)):
            flat = inputs[index].reshape(-1, inputs[index].shape[-1])
            take = min(len(flat), self.tokens - self.kept)
            self.chunks[index].append(flat[_spread(len(flat), take)].float().cpu())
        self.kept += take

    def tensors(self) -> list[torch.Tensor | None]:
        return [torch.cat(chunks) if chunks else None for chunks in self.chunks]


@dataclass(frozen=True)
class SearchSettings:
    """How `PPLSearch` spends its forward passes: the batch size of every pass, how many x1 rows per layer the
    dense pass keeps for calibration, when the bisection over CETT stops (interval width `tolerance`, or
    `max_passes_per_p` full passes for one p), and whether each pass shows a progress bar."""

    batch_size: int = 4
    calibration_tokens: int = 256
    tolerance: float = 1e-3
    max_passes_per_p: int = 15
    progress: bool = False


class PPLSearch:
    """PPL-p% sparsity for one model over held-out token blocks; counts its full forward passes."""

    def __init__(self, model: nn.Module, blocks: torch.Tensor, settings: SearchSettings = SearchSettings()):
        if blocks.numel() == 0:
            raise DataError("the held-out text is empty; PPL-p% sparsity needs at least one block of tokens")
        self.model = model.eval()
        self.blocks = blocks
        self.settings = settings
        self._bar = None  # the current p's progress bar, advanced by every full pass
        self.forward_passes = 0
        self._memo: dict[float, Evaluation] = {}
        self.layers = self._calibrate()
        self._mask = NeuronMask(model, [layer.column_norms for layer in self.layers])

    # -- the dense pass: perplexity and cached x1 sample ---------------------------------------
    @torch.no_grad()
    def _calibrate(self) -> list[LayerCalibration]:
        with SparsityProbe.for_sampling(self.model) as probe:
            sample = X1Sample(probe.num_layers, self.settings.calibration_tokens)
            loss = mean_token_loss(self.model, self.blocks, batch_size=self.settings.batch_size,
                                   after_batch=lambda: sample.add(probe.last_inputs), desc="PPL-p% dense pass",
                                   progress=self.settings.progress)
            zeros = probe.zero_ratio_per_layer()
        self.forward_passes += 1
        self.ppl_dense = perplexity(loss)
        # CETT 0 means eps 0: only exact zeros are dropped, which changes nothing -> the dense pass.
        self._memo[0.0] = Evaluation(cett=0.0, ppl=self.ppl_dense, sparsity=sum(zeros) / len(zeros),
                                     per_layer=zeros, thresholds=[0.0] * len(zeros))
        layers = []
        for module, x1 in zip(down_projections(self.model), sample.tensors()):
            weight, bias = down_matrix(module)
            layers.append(LayerCalibration(x1.to(weight.device), weight, bias, weight.float().norm(dim=1)))
        return layers

    # -- thresholds and thresholded evaluation ----------------------------------------------------
    def thresholds_for(self, cett: float) -> list[float]:
        """Per-layer eps giving CETT = `cett` on the cached dense activations (no forward pass)."""
        return [layer.eps_for(cett) for layer in self.layers]

    @torch.no_grad()
    def evaluate(self, cett: float, *, cached: bool = True) -> Evaluation:
        """Perplexity and sparsity with every layer thresholded at `cett` (memoised unless `cached=False`)."""
        key = round(cett, 9)
        if cached and key in self._memo:
            return self._memo[key]
        thresholds = self.thresholds_for(cett)
        ppl, per_layer = thresholded_perplexity(self.model, self.blocks, self._mask, thresholds,
                                                batch_size=self.settings.batch_size, desc=f"CETT {cett:.4f}",
                                                progress=self.settings.progress)
        self.forward_passes += 1
        if self._bar is not None:
            self._bar.update(1)
        result = Evaluation(cett=cett, ppl=ppl, sparsity=sum(per_layer) / len(per_layer), per_layer=per_layer,
                            thresholds=thresholds)
        self._memo[key] = result
        logger.info("CETT %.4f: ppl %.4f (dense %.4f), sparsity %.4f", cett, result.ppl, self.ppl_dense,
                    result.sparsity)
        return result

    def search(self, p: float) -> dict:
        """The largest CETT whose perplexity is <= (1 + p/100) * dense (outer binary search)."""
        if not p > 0:
            raise DataError(f"p must be > 0 (a perplexity rise in percent, e.g. 1), got {p}")
        target = self.ppl_dense * (1 + p / 100)
        before = self.forward_passes
        lo, hi = 0.0, 1.0
        best = self.evaluate(0.0)
        settings = self.settings
        # One bar per p, one step per full pass over the held-out blocks (at most max_passes_per_p).
        with tqdm(total=settings.max_passes_per_p, desc=f"PPL-{p:g}% sparsity search", unit="pass",
                  disable=not settings.progress) as bar:
            self._bar = bar
            try:
                while hi - lo > settings.tolerance and self.forward_passes - before < settings.max_passes_per_p:
                    mid = 0.5 * (lo + hi)
                    result = self.evaluate(mid)
                    if result.ppl <= target:
                        best, lo = result, mid
                    else:
                        hi = mid
            finally:
                self._bar = None
            bar.total = bar.n  # the search usually converges before the cap
            bar.refresh()
        return {"sparsity": best.sparsity, "ppl": best.ppl, "ppl_dense": self.ppl_dense,
                "ppl_target": target, "cett": best.cett, "thresholds": best.thresholds,
                "per_layer_sparsity": best.per_layer, "forward_passes": self.forward_passes - before}


def ppl_p_sparsity(model: nn.Module, blocks: torch.Tensor, ps=DEFAULT_PS,
                   settings: SearchSettings = SearchSettings()) -> dict:
    """PPL-p% sparsity for every p: {str(p): {...}} plus `forward_passes` in total (dense pass included)."""
    ps = [float(p) for p in ps]
    bad = [p for p in ps if not p > 0]
    if bad:
        raise DataError(f"p must be > 0 (perplexity rise in percent), got {bad[0]}")
    search = PPLSearch(model, blocks, settings)
    results = {_p_key(p): search.search(p) for p in ps}
    return {"results": results, "forward_passes": search.forward_passes, "ppl_dense": search.ppl_dense,
            "tokens": int(blocks.numel())}


def _p_key(p: float) -> str:
    return f"{p:g}"


def _spread(length: int, take: int) -> torch.Tensor:
    """`take` indices spread evenly over range(length) (a deterministic sample)."""
    return torch.linspace(0, length - 1, take).round().long() if take < length else torch.arange(length)
