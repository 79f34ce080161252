"""The ProSparse Trainer: the HF Trainer plus lambda(step) * L1(x1) (docs/method.md, sections 2-3).

The loss of a micro-batch is

    loss = L_lm + lambda(t) * sum over FFN layers of mean over tokens of ||x1_token||_1

where x1 is the input of each down projection (read by `SparsityProbe`) and t is the 1-based
index of the optimizer step the micro-batch belongs to. Both terms are per-micro-batch means
over the same tokens (packed blocks have no padding), and the Trainer divides their sum by the
gradient-accumulation steps, so lambda * L1 is scaled exactly like the LM loss under gradient
accumulation, DDP and DeepSpeed.

Also here: what keeps a run's output trustworthy. A NaN/inf loss stops training before anything
after it is saved, a checkpoint is complete or absent, and a full disk becomes one error that
names the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .atomic import respect_umask
from .checkpoint import Source
from .configs import ProSparseConfig
from .errors import TrainingError, is_disk_full
from .probe import SparsityProbe
from .schedule import Schedule

logger = logging.getLogger(__name__)

_NO_BAD_STEP = 2**62  # first-bad-step value while every loss so far was finite
CHECKPOINT_PREFIX = "checkpoint-"
INCOMPLETE = "INCOMPLETE"  # in a checkpoint folder while it is being written
# How libraries report a full disk: OSError (ENOSPC/EDQUOT), safetensors' SafetensorError ("os error 28"),
# torch.save's RuntimeError ("file write failed").
class ProSparseTrainer(Trainer):
    """A `Trainer` whose training loss adds lambda(step) * L1 of x1 and logs the sparsity it reaches.

    Logged at every logging step (log_history and every `report_to` backend): `l1_lambda` (the
    lambda of the step just taken), `l1_loss` (the unscaled L1 term, mean over the micro-batches
    since the last log), `lm_loss`, `activation_sparsity` (zero-ratio of x1 over the logged step's batches),
    and with a distiller `distill_loss` (the divergence from the teacher before alpha and T^2).
    """

    # compute_loss returns a per-micro-batch mean, not a sum over the GA window: training_step divides it by the
    # gradient-accumulation steps (the switch the Trainer leaves to subclasses that compute their own loss).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, schedule: Schedule, base_checkpoint: str | Source | None = None, distiller=None,
                 checkpoint_files: dict[str, str] | None = None, **kwargs):
        """`schedule` gives lambda per step (a recipe's `stages`). The trainer attaches its own probe
        (`SparsityProbe.for_training`) to the model it is given, so the L1 term and the zero counts always
        tap the model that trains; `relufy train` detaches it after saving. With a `ProSparseConfig` as
        `args`, `max_train_minutes` applies. `base_checkpoint` is where
        the model was loaded from (LoRA mode merges its adapter into it). `distiller` (a
        `relufy.distill.Distiller`) adds the distillation term; its teacher stays outside the Trainer's model.
        `checkpoint_files` ({name: text}) are written into every checkpoint before it counts as complete (the
        recipe fingerprint, relufy.resume)."""
        super().__init__(*args, **kwargs)
        self.checkpoint_files = dict(checkpoint_files or {})
        config = self.args if isinstance(self.args, ProSparseConfig) else None
        self.schedule = schedule
        probe = self.probe = SparsityProbe.for_training(self.model).attach()  # finds x1 through peft's wrappers
        self.base_checkpoint = base_checkpoint
        self.distiller = distiller
        probe.enabled = False
        # The model must not normalise its LM loss by the GA window's token count (num_items_in_batch): both
        # terms stay per-micro-batch means over the same tokens. Trainer.__init__ sets this from the model.
        self.model_accepts_loss_kwargs = False
        self._window = _LogWindow()
        self._finite: torch.Tensor | None = None  # all micro-batch losses of this step finite
        self._first_bad_step: torch.Tensor | None = None
        self.add_callback(_NonFiniteLossGuard(self))
        self.stopped_for_time = False  # set by _TimeLimit
        if config is not None and config.max_train_minutes:
            self.add_callback(_TimeLimit(self, config.max_train_minutes))

    def lambda_for_next_step(self) -> float:
        """lambda of the optimizer step being accumulated now (global_step counts finished steps)."""
        return self.schedule.lambda_at(self.state.global_step + 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain LM loss, nothing recorded
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lam = self.lambda_for_next_step()
        distiller = self.distiller
        unwrapped = self.accelerator.unwrap_model(model) if distiller else None
        # the teacher first, while the probe is off: its forward must not reach the L1 term or the counts
        teacher = distiller.teacher_outputs(unwrapped, inputs, self.accelerator.autocast()) if distiller else None
        self.probe.count_zeros = self._logs_step(self.state.global_step + 1)
        self.probe.enabled = True
        one_pass = distiller is not None and distiller.one_pass and self.label_smoother is None
        try:
            with distiller.watch_student(unwrapped) if distiller else contextlib.nullcontext() as caught:
                if one_pass:  # the model computes neither logits nor a loss; the one-pass loss below does both
                    lm_loss, outputs = None, model(**distiller.student_features(inputs))
                else:
                    lm_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            l1 = self.probe.pop_l1()
        finally:
            self.probe.enabled = False  # backward's recomputation (checkpointing) must not count again
        loss, lm_loss = self._distilled(unwrapped, lm_loss, outputs, caught, teacher, inputs["labels"]) \
            if distiller else (lm_loss, lm_loss)
        l1 = l1.to(loss.device)
        loss = loss + lam * l1 if lam > 0 else loss
        self._window.add(lm_loss.detach(), l1.detach())
        return (loss, outputs) if return_outputs else loss

    def _distilled(self, unwrapped, lm_loss, outputs, caught: dict, teacher, labels) -> tuple:
        """(alpha * T^2 * D + (1 - alpha) * LM, the LM loss) with the distiller. `lm_loss` None: the one-pass path,
        where Liger's loss computes both terms from the caught hidden states, under the autocast the student's
        forward (and its fused cross-entropy, on the two-pass path) runs in."""
        distiller = self.distiller
        if lm_loss is None:
            with self.accelerator.autocast():
                terms = distiller.one_pass_loss(unwrapped, caught, teacher, labels)
            self._window.add_distill(terms.divergence)
            return terms.total, terms.lm
        kd = distiller.divergence(unwrapped, outputs, caught, teacher, labels)
        self._window.add_distill(kd.detach())
        return distiller.loss.combine(lm_loss, kd), lm_loss

    def _logs_step(self, step: int) -> bool:
        """Whether the Trainer will log at `step` (zeros are only counted on those steps' batches)."""
        if self.args.logging_strategy != "steps":
            return True
        every = int(self.state.logging_steps or self.args.logging_steps or 1)
        return step % max(every, 1) == 0 or (step == 1 and self.args.logging_first_step) or \
            step >= self.state.max_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss)
        self._finite = finite if self._finite is None else self._finite & finite
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._window.count:
            lm, l1 = self._window.means()
            sparsity = _zero_ratio(self.probe, lm.device)
            if self.accelerator.num_processes > 1:
                lm, l1, sparsity = (self.accelerator.reduce(t, reduction="mean") for t in (lm, l1, sparsity))
            logs["l1_lambda"] = self.schedule.lambda_at(max(self.state.global_step, 1))
            logs["l1_loss"] = round(float(l1), 6)
            logs["lm_loss"] = round(float(lm), 6)
            logs["activation_sparsity"] = round(float(sparsity), 6)
            if self._window.distill_count:
                kd = self._window.distill / self._window.distill_count
                if self.accelerator.num_processes > 1:
                    kd = self.accelerator.reduce(kd, reduction="mean")
                logs["distill_loss"] = round(float(kd), 6)
            self._window = _LogWindow()
            self.probe.reset()
        super().log(logs, start_time)

    def record_step_finite(self) -> None:
        """Fold the step just taken into the first step with a NaN/inf loss (on the device, no sync)."""
        if self._finite is None:
            return
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), _NO_BAD_STEP, dtype=torch.long, device=self._finite.device)
        first_unseen = self._first_bad_step == _NO_BAD_STEP
        self._first_bad_step = torch.where(~self._finite & first_unseen, self.state.global_step, self._first_bad_step)
        self._finite = None

    def check_finite_loss(self) -> None:
        """Stop if a step since the last check had a NaN/inf loss: one host sync, made only where the
        Trainer is about to log, save, evaluate or stop, so no checkpoint ever holds that step's update."""
        if self._first_bad_step is None:
            return
        first_bad = self._first_bad_step
        if self.accelerator.num_processes > 1:
            first_bad = self.accelerator.gather(first_bad.reshape(1)).min()
        step = int(first_bad)
        if step == _NO_BAD_STEP:
            return
        last = last_checkpoint(Path(self.args.output_dir))
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise TrainingError(f"the loss became NaN/inf at step {step}; training stopped at step "
                            f"{self.state.global_step} before saving anything after it, {kept}. Lower "
                            "learning_rate or the stage lambdas, then resume with --resume")

    def _save_checkpoint(self, model, trial):
        """A checkpoint is complete or absent: it carries an INCOMPLETE marker until every file is written, a
        failed or interrupted save removes it, and `last_checkpoint` skips one a kill -9 left marked."""
        folder = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / INCOMPLETE).write_text("relufy is still writing this checkpoint\n")
        # inside out: a failed save first removes its folder, then a full disk becomes the one-line error
        with disk_full_stops_training(folder.name, Path(self.args.output_dir)):
            try:
                result = super()._save_checkpoint(model, trial)
                if self.args.should_save:
                    for name, text in self.checkpoint_files.items():
                        (folder / name).write_text(text)
                self.accelerator.wait_for_everyone()  # every rank's shards are written
            except BaseException:
                if self.args.should_save:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
        if self.args.should_save:
            respect_umask(folder)
            (folder / INCOMPLETE).unlink(missing_ok=True)
        return result


@dataclass
class _LogWindow:
    """Sums of the detached LM and L1 terms since the last log (device tensors, no sync per step)."""

    lm: torch.Tensor | float = 0.0
    l1: torch.Tensor | float = 0.0
    count: int = 0
    distill: torch.Tensor | float = 0.0  # the distillation divergence, with a distiller
    distill_count: int = 0

    def add(self, lm: torch.Tensor, l1: torch.Tensor) -> None:
        self.lm, self.l1, self.count = self.lm + lm.float(), self.l1 + l1.float(), self.count + 1

    def add_distill(self, divergence: torch.Tensor) -> None:
        self.distill, self.distill_count = self.distill + divergence.float(), self.distill_count + 1

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(self.lm / self.count), torch.as_tensor(self.l1 / self.count)


class _NonFiniteLossGuard(TrainerCallback):
    """Tracks NaN/inf losses every step without a host sync; checks them before any log or save."""

    def __init__(self, trainer: ProSparseTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.record_step_finite()
        # DefaultFlowCallback ran first, so control says whether this step logs, saves or ends
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.trainer.check_finite_loss()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate:  # epoch strategies
            self.trainer.check_finite_loss()


class _TimeLimit(TrainerCallback):
    """max_train_minutes: save and stop at the first logging step past the limit (all ranks agree there, at a step
    that syncs anyway), so a wall-clock-limited job ends with a checkpoint that --resume continues exactly."""

    def __init__(self, trainer: ProSparseTrainer, minutes: float):
        self.trainer, self.limit_s, self.start = trainer, minutes * 60, time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_log or control.should_training_stop:
            return
        elapsed = torch.tensor(time.monotonic() - self.start, device=self.trainer.accelerator.device)
        if self.trainer.accelerator.num_processes > 1:
            elapsed = self.trainer.accelerator.reduce(elapsed, reduction="max")  # every rank stops at the same step
        if float(elapsed) >= self.limit_s:
            control.should_save = control.should_training_stop = True
            self.trainer.stopped_for_time = True


def _zero_ratio(probe: SparsityProbe, device) -> torch.Tensor:
    """Overall zero-ratio of x1 (mean over layers) as a tensor, without a host sync."""
    ratios = [torch.as_tensor(c.zeros, dtype=torch.float32, device=device) / c.elements
              for c in probe.layers if c.elements]
    return torch.stack(ratios).mean() if ratios else torch.tensor(float("nan"), device=device)


def last_checkpoint(output_dir: Path) -> Path | None:
    """The complete `checkpoint-N` folder with the largest N in `output_dir`, or None.

    A folder still marked INCOMPLETE (its save was killed) is skipped with a warning.
    """
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    for _, folder in sorted(found, reverse=True):
        if not (folder / INCOMPLETE).exists():
            return folder
        logger.warning("skipping %s: its save did not finish (delete it to free the space)", folder)
    return None


@contextlib.contextmanager
def disk_full_stops_training(what: str, output_dir: Path):
    """Turn a full disk (or quota) while saving `what` into one TrainingError naming the last good checkpoint
    in `output_dir`, whatever the library raised; any other error passes through unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        last = last_checkpoint(output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before"
        raise TrainingError(f"out of disk space while saving {what} ({_first_line(exc)}); {kept}. Free space "
                            "(a lower save_total_limit keeps fewer checkpoints) and resume with --resume") from None


def _first_line(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]
