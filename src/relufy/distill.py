"""Distillation from the unconverted model: the teacher, its activation swap, and the divergences.

Converting SiLU/GELU to ReLU leaves a free teacher behind: the same weights with their original
activation. With `distill: true` the training loss of a micro-batch becomes

    loss = alpha * T^2 * D(teacher || student at temperature T) + (1 - alpha) * L_lm + lambda(t) * L1

(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531, for the
temperature and its T^2), D averaged over the tokens that have a label (labels != -100 after the
causal shift), like the LM loss. D is the forward KL or GKD's generalized Jensen-Shannon divergence
(Agarwal et al. 2024, "On-Policy Distillation of Language Models", arXiv 2306.13649).

The teacher is one of:
- a separate frozen model (`requires_grad` off, eval mode, run under `torch.no_grad`), by default the
  training base loaded again with its original activation (`relufy.original_activation` of a
  conversion, or the base's own activation when it is not ReLU-family), or `distill_teacher`; it is
  kept out of the Trainer's model, so DeepSpeed, accelerate and checkpoints never see it;
- in LoRA mode without `distill_teacher`: the student's own frozen base with the adapters disabled
  (`peft`'s `disable_adapter`) and every FFN's activation module swapped back to the original for
  that forward (`ActivationSwap`), so no second copy of the weights exists.

The divergence runs in one of two implementations: with Liger Kernel's fused linear cross-entropy
on (CUDA, `use_liger_kernel: true`), Liger's `LigerFusedLinearJSD`, which takes both models' last
hidden states and head weights and never materializes the logits; otherwise `torch.nn.functional.kl_div`
on the log-softmaxed logits, and `generalized_jsd` for the JSD (both in `relufy.divergence`). With Liger, where the LM loss is the plain
cross-entropy and the model takes `logits_to_keep`, the student runs without labels and without logits and
Liger's chunked `LigerFusedLinearJSDLoss` computes the LM loss and D in one pass over its LM head
(`DistillLoss.one_pass`) instead of the model's fused cross-entropy followed by the fused linear JSD.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from .activations import parse_activation, register_activations
from .architectures import architecture_of, ffn_modules
from .divergence import DistillLoss, HeadInput, OnePassLoss
from .errors import RecipeError, TrainingError

if TYPE_CHECKING:
    from .checkpoint import Source
    from .configs import ModelArguments, ProSparseConfig
    from .train_base import Base

logger = logging.getLogger(__name__)


# -- the activation swap of the LoRA teacher ---------------------------------------------------------
class ActivationSwap:
    """Every FFN's activation module of a converted model, and a module of the original activation for each.

    `restored()` puts the original ones in for one forward and the converted ones back on exit, exceptions
    included. The modules are found once (the child of each FFN whose class is the converted activation's,
    as `ACT2FN` builds it) so a step pays only the attribute swaps.
    """

    def __init__(self, model: nn.Module, current: str, original: str):
        from transformers.activations import ACT2FN

        register_activations()
        current_type = type(ACT2FN[current])
        self.slots = [(ffn, name, child) for ffn in ffn_modules(model) for name, child in ffn.named_children()
                      if type(child) is current_type]
        if not self.slots:
            raise TrainingError(f"found no '{current}' activation module in the FFNs of {type(model).__name__}; "
                                "distillation cannot restore the original activation, set distill_teacher")
        self.originals = [ACT2FN[original] for _ in self.slots]

    @contextlib.contextmanager
    def restored(self):
        try:
            for (ffn, name, _), module in zip(self.slots, self.originals):
                setattr(ffn, name, module)
            yield
        finally:
            for ffn, name, converted in self.slots:
                setattr(ffn, name, converted)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (no dropout, no checkpointing) for one forward, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# -- the teacher's forward and the student's side ------------------------------------------------------
class Distiller:
    """The teacher and the divergence, as `ProSparseTrainer.compute_loss` uses them.

    `teacher` is a separate frozen model, or None for the LoRA teacher (the student's base, adapters
    disabled, with `swap` restoring the original activation when the conversion changed it). `fused`
    selects Liger's fused linear JSD over the logits path; `one_pass` (with `fused`) computes the LM loss
    and D together in one pass over the student's LM head (`DistillLoss.one_pass`), the student run
    without labels and without logits, so that the model's own fused cross-entropy does not run the head
    a second time. `compile_options` (torch.compile's keyword arguments, as the recipe's `torch_compile`
    gives the student) compile the separate teacher's forward:
    at the 135M shape an eager step is bound by the host launching kernels, and the teacher's forward is a
    third of a step. The LoRA teacher is not compiled: disabling the adapters and swapping the activation
    change the module tree for its forward, which a compiled graph would guard on and recompile for.
    """

    def __init__(self, loss: DistillLoss, *, teacher: nn.Module | None = None, swap: ActivationSwap | None = None,
                 fused: bool = False, one_pass: bool = False, compile_options: dict | None = None):
        self.loss, self.teacher, self.swap, self.fused = loss, teacher, swap, fused
        self.one_pass = fused and one_pass
        self.teacher_body = None  # what runs the separate teacher: its decoder (fused) or the whole model
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            teacher.config.use_cache = False
            body = teacher.get_decoder() if fused else teacher
            self.teacher_body = torch.compile(body, **compile_options) if compile_options is not None else body

    def teacher_outputs(self, model: nn.Module, inputs: dict, autocast=None):
        """The teacher's logits (or, fused, its HeadInput) for a batch, without gradients.

        `model` is the unwrapped student (a peft model in LoRA mode); `autocast` the Trainer's mixed-precision
        context (accelerate puts it around the student's forward only). Run it before the probe is enabled:
        under no_grad the probe neither counts nor taps, so the teacher's x1 never reaches the L1 term.
        `use_cache=False`: a training forward has no use for a KV cache (the LoRA teacher is the student,
        whose config may ask for one).
        """
        features = _without_labels(inputs)
        features["use_cache"] = False
        with torch.no_grad(), autocast or contextlib.nullcontext():
            if self.teacher is not None:
                self._place(features["input_ids"].device)
                return self._run(self.teacher, self.teacher_body, features)
            with model.disable_adapter(), self.swap.restored() if self.swap else contextlib.nullcontext(), \
                    _eval_mode(model):
                return self._run(model, model.get_decoder() if self.fused else model, features)

    def _place(self, device: torch.device) -> None:
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)

    def _run(self, model: nn.Module, body, features: dict):
        """`body` (the model, or with the fused loss its decoder, either maybe compiled) on `features`."""
        if not self.fused:
            return body(**features).logits
        return HeadInput(body(**features)[0], model.get_output_embeddings().weight)

    @contextlib.contextmanager
    def watch_student(self, model: nn.Module):
        """Around the student's forward: with the fused loss, catch its last hidden states (the decoder's
        output, which Liger's fused cross-entropy consumes without returning logits)."""
        caught: dict = {}
        if not self.fused:
            yield caught
            return
        handle = model.get_decoder().register_forward_hook(lambda _module, _args, out: caught.update(hidden=out[0]))
        try:
            yield caught
        finally:
            handle.remove()

    def divergence(self, model: nn.Module, outputs, caught: dict, teacher, labels: torch.Tensor) -> torch.Tensor:
        """D(teacher || student) of the micro-batch, averaged over its labelled positions."""
        if self.fused:
            return self.loss.fused(_student_head(model, caught), teacher, labels)
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise TrainingError("distillation needs the student's logits, which this forward did not return; set "
                                "liger_kernel_config.fused_linear_cross_entropy: false or use_liger_kernel: false")
        return self.loss.from_logits(logits, teacher, labels)

    @staticmethod
    def student_features(inputs: dict) -> dict:
        """The student's inputs on the one-pass path: no labels, so the model computes no loss of its own, and
        `logits_to_keep` an empty index, so its LM head runs on zero positions and no logits are made."""
        features = _without_labels(inputs)
        features["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        return features

    def one_pass_loss(self, model: nn.Module, caught: dict, teacher: HeadInput, labels: torch.Tensor) -> OnePassLoss:
        """alpha * T^2 * D + (1 - alpha) * LM of the micro-batch from the student's caught hidden states."""
        return self.loss.one_pass(_student_head(model, caught), teacher, labels)


def _without_labels(inputs: dict) -> dict:
    """A batch's model inputs without its labels: a forward given labels computes a loss of its own."""
    return {key: value for key, value in inputs.items() if key != "labels"}


def _student_head(model: nn.Module, caught: dict) -> HeadInput:
    return HeadInput(caught["hidden"], model.get_output_embeddings().weight)


# -- building the teacher from a recipe ------------------------------------------------------------------
def build_distiller(training: ProSparseConfig, args: ModelArguments, base: Base, student: nn.Module,
                    tokenizer) -> Distiller:
    """The Distiller a recipe asks for, every check made before any step runs.

    `base` is the checkpoint the student was loaded from (the conversion, when the recipe converts; resolved
    and read once by the run), `student` the loaded model (a peft model in LoRA mode), `tokenizer` the student's.
    """
    loss = DistillLoss.from_config(training)
    fused = _use_fused_loss(training, student)
    one_pass = fused and _one_pass_fits(training, student)
    if training.distill_teacher:
        teacher = _load_named_teacher(training.distill_teacher, args, student, tokenizer)
    else:
        current, original = original_activation(base)
        if training.use_peft:  # the same weights: no second copy, only the activation put back per forward
            swap = ActivationSwap(student, current, original) if current != original else None
            return Distiller(loss, swap=swap, fused=fused, one_pass=one_pass)
        key = architecture_of(student.config).activation_key
        teacher = _load(base.source, args, {**args.model_config_overrides, key: original},
                        "the distillation teacher")
    logger.info("distillation teacher: %s (%s)", training.distill_teacher or base.source,
                "Liger, LM loss and divergence in one pass" if one_pass else
                "Liger fused linear JSD" if fused else "logits, torch")
    return separate_teacher(loss, teacher, fused=fused, one_pass=one_pass,
                            liger_kernel_config=training.liger_kernel_config,
                            compile_options=teacher_compile_options(training))


def separate_teacher(loss: DistillLoss, teacher: nn.Module, *, fused: bool, one_pass: bool = False,
                     liger_kernel_config: dict | None = None, compile_options: dict | None = None) -> Distiller:
    """A Distiller around a separate teacher; with the fused loss the teacher gets the student's Liger kernels
    (its norms and RoPE; its decoder is all the fused loss runs)."""
    if fused:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(teacher, liger_kernel_config)
    return Distiller(loss, teacher=teacher, fused=fused, one_pass=one_pass, compile_options=compile_options)


def teacher_compile_options(training: ProSparseConfig) -> dict | None:
    """torch.compile's arguments for the teacher when the recipe compiles the student (`torch_compile`, with its
    backend and mode), else None."""
    if not training.torch_compile:
        return None
    return {"backend": training.torch_compile_backend or "inductor", "mode": training.torch_compile_mode}


def describe(training: ProSparseConfig) -> dict:
    """What `relufy.training.distill` records in the trained model's config."""
    described = {"alpha": training.distill_alpha, "temperature": training.distill_temperature,
                 "loss": training.distill_loss, "teacher": training.distill_teacher or "source"}
    if training.distill_loss == "jsd":
        described["jsd_beta"] = training.distill_jsd_beta
    return described


def original_activation(base: Base) -> tuple[str, str]:
    """(the activation `base` has, the one its teacher has): the base's own when it is not ReLU-family,
    else the `relufy.original_activation` its conversion recorded. A base relufy trained is refused: the
    recorded activation is the untouched model's, but these weights with it are not that model."""
    from .checkpoint import Provenance

    current = base.activation
    if parse_activation(str(current)) is None:
        return current, current
    provenance = Provenance.of(base.config)
    recorded = provenance.original_activation
    if recorded and parse_activation(str(recorded)) is None:
        if provenance.training:
            raise RecipeError(f"distill: {base.source} was trained by relufy (relufy.training in its config), so "
                              f"its weights with '{recorded}' are not the unconverted model; set distill_teacher "
                              "to the model it came from, or distill: false")
        return current, recorded
    raise RecipeError(f"distill: {base.source} already uses '{current}' and records no original activation (it was "
                      "not converted by relufy), so there is no unconverted teacher to restore; set "
                      "distill_teacher to the model it came from, or distill: false")


def _use_fused_loss(training: ProSparseConfig, student: nn.Module) -> bool:
    """Liger's fused linear JSD where Liger's fused cross-entropy runs (then the student returns no logits)."""
    config = dict(training.liger_kernel_config or {})
    if not (training.use_liger_kernel and config.get("fused_linear_cross_entropy", True)
            and training.device.type == "cuda"):
        return False
    if getattr(student.config, "final_logit_softcapping", None):
        training.liger_kernel_config = {**config, "fused_linear_cross_entropy": False}
        logger.warning("distillation: the model caps its logits (final_logit_softcapping), which Liger's fused "
                       "losses leave out; Liger's fused cross-entropy is off, the loss uses the logits")
        return False
    return True


def _one_pass_fits(training: ProSparseConfig, student: nn.Module) -> bool:
    """Whether the fused path can compute the LM loss itself, in the pass that computes D: the LM loss must be
    the plain cross-entropy (no label smoothing) and the model must take `logits_to_keep` (transformers' causal
    LMs and Liger's forwards of them do), so that it can run without making logits."""
    if training.label_smoothing_factor:
        return False
    model = student.get_base_model() if hasattr(student, "get_base_model") else student
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _load_named_teacher(path: str, args: ModelArguments, student: nn.Module, tokenizer) -> nn.Module:
    """`distill_teacher` loaded as it is, refused unless its vocabulary and tokenizer are the student's."""
    from .checkpoint import load_tokenizer
    from .errors import RelufyError

    teacher = _load(path, args, {}, f"distill_teacher {path}")
    rows, own = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if rows != own:
        raise RecipeError(f"distill_teacher {path} predicts {rows} tokens but the student {own}; a teacher must "
                          "share the student's vocabulary (use a model of the same family)")
    try:
        vocabulary = load_tokenizer(path, trust_remote_code=args.trust_remote_code).get_vocab()
    except RelufyError:
        raise RecipeError(f"distill_teacher {path} has no tokenizer to compare with the student's; copy its "
                          "tokenizer files into it") from None
    if vocabulary != tokenizer.get_vocab():
        differ = len(set(vocabulary.items()) ^ set(tokenizer.get_vocab().items()))
        raise RecipeError(f"distill_teacher {path} has another tokenizer ({differ} token ids differ from the "
                          "student's); a teacher must share the student's tokenizer")
    return teacher


def _load(path: str | Source, args: ModelArguments, overrides: dict, what: str) -> nn.Module:
    """Load a teacher as the recipe loads its base (dtype, remote code), outside any DeepSpeed ZeRO-3 init:
    the teacher is never handed to DeepSpeed, so its weights must not be partitioned."""
    from transformers.integrations import deepspeed

    from .checkpoint import load_model
    from .errors import RelufyError

    saved = deepspeed._hf_deepspeed_config_weak_ref  # from_pretrained partitions while this names a ZeRO-3 config
    deepspeed.unset_hf_deepspeed_config()
    try:
        return load_model(path, dtype=args.model_dtype, trust_remote_code=args.trust_remote_code,
                          config_overrides=overrides)
    except RelufyError as exc:
        raise RecipeError(f"{what} cannot be loaded: {exc}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RecipeError(f"{what} cannot be loaded ({reason}); distill_teacher must name a causal LM "
                          "checkpoint") from None
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = saved
