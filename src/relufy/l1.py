"""The L1 term of ProSparse training and its autograd op: the only code that adds to x1's gradient.

The probe (`probe.py`, built with `SparsityProbe.for_training`) routes each down projection's input
x1 through `L1Tap` and hands the per-token L1 norms to an `L1Term`; the trainer reads the term once
per forward (`pop`) and adds lambda times it to the LM loss.
"""

from __future__ import annotations

import functools
import os

import torch

# RELUFY_COMPILE_L1=0 keeps the L1 backward eager on CUDA too (for debugging, or where compiling fails)
COMPILE_L1_BACKWARD = os.environ.get("RELUFY_COMPILE_L1", "1") != "0"


class L1Term:
    """The differentiable L1 term of the forwards since the last `pop`: sum over layers of the mean over
    tokens of ||x1_token||_1 (the normalisation relufy's lambda refers to). Each layer's per-token norms
    are added as they come; with a token mask only the masked-in tokens are averaged."""

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []

    def add(self, per_token: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """One layer's per-token L1 norms; averaged here under a mask, else in `value` (all layers at once)."""
        if token_mask is None:
            self.terms.append(per_token)
            return
        mask = token_mask.to(per_token.device, per_token.dtype)
        self.terms.append((per_token * mask).sum() / mask.sum().clamp_min(1))

    def value(self) -> torch.Tensor:
        """The term (zero if nothing was added), without clearing it."""
        terms = self.terms
        if not terms:
            return torch.zeros(())
        if all(term.shape == terms[0].shape for term in terms):
            return torch.stack(terms).reshape(len(terms), -1).mean(1).sum()
        return sum(term.mean() for term in terms)

    def pop(self) -> torch.Tensor:
        """The term, cleared (one call per training forward)."""
        term = self.value()
        self.terms = []
        return term


class L1Tap(torch.autograd.Function):
    """Identity on x1 that also returns ||x1_token||_1 over the last dimension (float32, per token).

    The probe's pre-hook hands the down projection the identity's output, so the L1 term's
    gradient, sign(x1) * dL/d(L1_token), is added to the gradient coming back from the down
    projection inside this backward, in one fused pass on CUDA (`add_l1_gradient`), instead of
    flowing through a second autograd branch that autograd then sums into x1's gradient. Saves
    only x1, which the down projection saves anyway; the forward is one read of x1 (float32
    accumulation and result, bf16 read as such on CUDA: no float32 copy of x1).

    The norm is asked for in float32 (`dtype=`), not converted after: on a float32 x1 (float32
    training, or CUDA autocast, which computes vector_norm in float32) `.float()` returns the norm
    tensor itself, and torch 2.11's dynamo then gives this output's gradient to the norm
    intermediate it aliases, which nothing reads: under torch.compile the L1 gradient would be zero.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)
        return x.view_as(x), torch.linalg.vector_norm(x, ord=1, dim=-1, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor | None, grad_l1: torch.Tensor | None) -> torch.Tensor | None:
        if grad_l1 is None:
            return grad_x
        (x,) = ctx.saved_tensors
        if grad_x is None:
            grad_x = torch.zeros_like(x)
        return add_l1_gradient(grad_x, x, grad_l1)


def _add_l1_gradient(grad: torch.Tensor, x: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """grad + sign(x) * per_token[..., None], computed in float32, returned in grad's dtype."""
    return (grad.float() + torch.sign(x).float() * per_token.float().unsqueeze(-1)).to(grad.dtype)


@functools.cache
def _compiled_add_l1_gradient():
    return torch.compile(_add_l1_gradient, dynamic=True)


def add_l1_gradient(grad: torch.Tensor, x: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """The L1 backward added to x1's incoming gradient: one generated kernel on CUDA (reads grad
    and x1 once, writes the sum), the same expression eagerly elsewhere. Inside a compiled model
    (`torch_compile: true`) the plain expression is traced, and Inductor fuses it with its neighbours."""
    if x.is_cuda and COMPILE_L1_BACKWARD and not torch.compiler.is_compiling():
        return _compiled_add_l1_gradient()(grad, x, per_token)
    return _add_l1_gradient(grad, x, per_token)
