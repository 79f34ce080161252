"""The distillation loss: the divergences D(teacher || student) and how alpha, T and the LM loss combine with them.

`DistillLoss` computes D from both models' logits with torch, through Liger's fused linear JSD from their last
hidden states and head weights, or, with the LM loss, in one pass of Liger's chunked JSD loss over the
student's LM head. `relufy.distill` holds the teacher that feeds it (see its docstring for the formula).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .configs import ProSparseConfig

IGNORE_INDEX = -100  # the label of a position without a target (transformers' convention)


# -- the divergences ------------------------------------------------------------------------------
def kl_divergence(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student) per position, summed over the vocabulary (last dimension).

    Both arguments are log-probabilities; torch's `kl_div(input, target)` computes KL(target || input).
    """
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)


def generalized_jsd(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's generalized Jensen-Shannon divergence per position (Agarwal et al. 2024, arXiv 2306.13649, eq. 4).

    With P the teacher, Q the student and the mixture M = beta * P + (1 - beta) * Q,

        JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M);

    M is formed in log space (a logsumexp of the two log-probabilities shifted by log beta and
    log(1 - beta)), so no probability underflows. At the ends the mixture collapses to one
    distribution and the sum to 0, so the ends are the KL limits instead, as in TRL's GKDTrainer and
    Liger's JSD kernel: beta = 0 is the forward KL(P || Q), beta = 1 the reverse KL(Q || P).
    """
    if beta == 0:
        return kl_divergence(student_log_probs, teacher_log_probs)
    if beta == 1:
        return kl_divergence(teacher_log_probs, student_log_probs)
    mixture = torch.logsumexp(torch.stack([teacher_log_probs + torch.log(torch.tensor(beta)),
                                           student_log_probs + torch.log(torch.tensor(1 - beta))]), dim=0)
    to_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    to_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True).sum(-1)
    return beta * to_teacher + (1 - beta) * to_student


@dataclass(frozen=True)
class DistillLoss:
    """What the recipe asks for: the weight, the temperature and the divergence (kl or jsd, with its beta)."""

    alpha: float = 0.5
    temperature: float = 1.0
    kind: str = "kl"
    beta: float = 0.5

    @classmethod
    def from_config(cls, training: ProSparseConfig) -> DistillLoss:
        return cls(training.distill_alpha, training.distill_temperature, training.distill_loss,
                   training.distill_jsd_beta)

    @property
    def liger_beta(self) -> float:
        """Liger's jsd_beta for this divergence (its beta 0 is the forward KL)."""
        return 0.0 if self.kind == "kl" else self.beta

    def combine(self, lm_loss: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
        """alpha * T^2 * D + (1 - alpha) * LM: T^2 keeps the gradient's scale independent of T (Hinton et al.)."""
        return (1 - self.alpha) * lm_loss + self.alpha * self.temperature ** 2 * divergence

    def from_logits(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        """D(teacher || student) from both models' logits, in float32, averaged over the labelled positions.

        Position i predicts token i + 1 (the causal shift the LM loss makes), so the last position and
        every position whose next label is IGNORE_INDEX are left out.
        """
        keep = (labels[:, 1:] != IGNORE_INDEX).to(torch.float32)
        student, teacher = (self._log_probs(logits) for logits in (student_logits, teacher_logits))
        if self.kind == "kl":
            per_position = kl_divergence(student, teacher)
        else:
            per_position = generalized_jsd(student, teacher, self.beta)
        return (per_position * keep).sum() / keep.sum().clamp_min(1)

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 log-softmax at temperature T of every position but the last. At T = 1 the cast is
        log_softmax's own (`dtype=`), so no separate float32 copy of the (batch x seq x vocab) logits is made;
        the values are those of `logits.float()` (the cast is exact, and x / 1 is x)."""
        if self.temperature == 1:
            return torch.log_softmax(logits[:, :-1], dim=-1, dtype=torch.float32)
        return torch.log_softmax(logits[:, :-1].float() / self.temperature, dim=-1)

    def fused(self, student: HeadInput, teacher: HeadInput, labels: torch.Tensor) -> torch.Tensor:
        """The same D through Liger's fused linear JSD (CUDA): the logits are computed chunk by chunk and never
        stored; Liger averages over the positions whose shifted label is not IGNORE_INDEX."""
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=self.liger_beta, ignore_index=IGNORE_INDEX, temperature=self.temperature)
        return loss(*_shifted_head_inputs(student, teacher, labels))

    def one_pass(self, student: HeadInput, teacher: HeadInput, labels: torch.Tensor) -> OnePassLoss:
        """alpha * T^2 * D + (1 - alpha) * LM in one pass over the student's LM head: Liger's chunked
        `LigerFusedLinearJSDLoss` computes each chunk's student logits once and takes both the cross-entropy at
        T = 1 (its hard loss, weight 1 - alpha) and D at temperature T (its soft loss, weight alpha * T^2) from
        them, each a mean over the positions whose shifted label is not IGNORE_INDEX, as the LM loss and
        `from_logits` average. Its JSD is relufy's `generalized_jsd` (M = beta P + (1 - beta) Q, beta 0 the
        forward KL), so every kind, beta and T maps exactly. Its chunk loop is torch.compile'd on CUDA (Liger's
        default) and eager elsewhere."""
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(weight_hard_loss=1 - self.alpha,
                                       weight_soft_loss=self.alpha * self.temperature ** 2,
                                       beta=self.liger_beta, ignore_index=IGNORE_INDEX, temperature=self.temperature,
                                       compiled=student.hidden.is_cuda, return_soft_hard_loss=True)
        total, divergence, lm = loss(*_shifted_head_inputs(student, teacher, labels))
        return OnePassLoss(total, lm.detach(), divergence.detach())


@dataclass
class OnePassLoss:
    """What `DistillLoss.one_pass` gives: the combined loss (with gradients) and its two terms (detached, to log)."""

    total: torch.Tensor
    lm: torch.Tensor
    divergence: torch.Tensor


@dataclass
class HeadInput:
    """A model's last hidden states (the LM head's input) and its head weight: the fused loss's inputs."""

    hidden: torch.Tensor
    weight: torch.Tensor


def _shifted_head_inputs(student: HeadInput, teacher: HeadInput, labels: torch.Tensor) -> tuple:
    """Liger's fused-linear arguments: both models' hidden states at every position but the last, flattened to
    (positions x width), their head weights, and the labels shifted by one (position i predicts token i + 1)."""
    return (student.hidden[:, :-1].reshape(-1, student.hidden.shape[-1]), student.weight,
            teacher.hidden[:, :-1].reshape(-1, teacher.hidden.shape[-1]), teacher.weight, labels[:, 1:].reshape(-1))
