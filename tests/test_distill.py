"""Distillation from the unconverted model (relufy.distill): the divergences, the teacher, the loss, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, SAMPLE_TEXT
from tiny_models import (VOCAB, assert_grads_close, batch, build_tiny_model, save_tiny_checkpoint, save_tiny_model,
                         tiny_tokenizer)
from transformers import TrainingArguments

from relufy.cli import main
from relufy.distill import ActivationSwap, Distiller
from relufy.divergence import DistillLoss, generalized_jsd, kl_divergence
from relufy.errors import RecipeError
from relufy.probe import SparsityProbe
from relufy.recipe import load_recipe
from relufy.schedule import Schedule
from relufy.train import build_trainer, run_training
from relufy.trainer import ProSparseTrainer

TINY_RECIPE = REPO / "recipes" / "tiny-cpu.yaml"


def tiny_recipe(base: Path, out: Path, *overrides: str):
    return load_recipe(TINY_RECIPE, [
        f"model_name_or_path={base}", "model_config_overrides={}", "block_size=32", f"output_dir={out}",
        "threshold_shift=false", "distill=true", *overrides])


def make_trainer(model, tmp_path, lam, distiller=None) -> ProSparseTrainer:
    training = TrainingArguments(output_dir=str(tmp_path), use_cpu=model.device.type == "cpu", report_to=[])
    return ProSparseTrainer(model=model, args=training, schedule=Schedule.from_config([{"lambda": lam, "end_step": 9}]),
                            distiller=distiller)


def loss_and_grads(trainer, inputs):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# -- the divergences against float64 references -------------------------------------------------------------
def reference_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_kl_and_generalized_jsd_match_float64_references(beta):
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(3, 5, 50, generator=generator, dtype=torch.float64) * 3 for _ in range(2))
    q, p = student.softmax(-1), teacher.softmax(-1)
    log_q, log_p = (x.float().log_softmax(-1) for x in (student, teacher))
    torch.testing.assert_close(kl_divergence(log_q, log_p).double(), reference_kl(p, q), rtol=1e-5, atol=1e-6)
    mixture = beta * p + (1 - beta) * q
    expected = {0.0: reference_kl(p, q), 1.0: reference_kl(q, p)}.get(
        beta, beta * reference_kl(p, mixture) + (1 - beta) * reference_kl(q, mixture))
    got = generalized_jsd(log_q, log_p, beta).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (expected > 1e-3).all()  # the check compares real divergences, not zeros


@pytest.mark.parametrize("kind", ["kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_divergence_is_the_mean_over_labelled_shifted_positions_at_temperature(kind, temperature, dtype):
    generator = torch.Generator().manual_seed(1)
    student, teacher = (torch.randn(2, 6, 40, generator=generator).to(dtype) for _ in range(2))
    labels = torch.randint(0, 40, (2, 6), generator=generator)
    labels[0, 3] = labels[1, 1] = -100  # these targets have no loss: positions 2 (row 0) and 0 (row 1) drop out
    loss = DistillLoss(alpha=0.5, temperature=temperature, kind=kind, beta=0.3)
    per_position = []
    for row, position in [(r, i) for r in range(2) for i in range(5)]:
        if labels[row, position + 1] == -100:
            continue
        q = (student[row, position].double() / temperature).softmax(-1)
        p = (teacher[row, position].double() / temperature).softmax(-1)
        m = 0.3 * p + 0.7 * q
        per_position.append(reference_kl(p, q) if kind == "kl" else 0.3 * reference_kl(p, m) + 0.7 * reference_kl(q, m))
    expected = torch.stack(per_position).mean()
    assert len(per_position) == 8
    torch.testing.assert_close(loss.from_logits(student, teacher, labels).double(), expected, rtol=1e-5, atol=1e-7)
    lm = torch.tensor(3.0)
    assert loss.combine(lm, expected).item() == pytest.approx(0.5 * 3.0 + 0.5 * temperature**2 * expected.item())


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="Liger Kernel's fused linear JSD runs on CUDA only")
@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_liger_fused_linear_jsd_matches_the_logits_path(kind):
    """The fused path (hidden states and head weights, no logits) gives the logits path's divergence and gradients."""
    loss = DistillLoss(alpha=0.5, temperature=2.0, kind=kind, beta=0.3)
    inputs = {key: value.cuda() for key, value in batch().items()}
    inputs["labels"][0, 5:9] = -100
    results = []
    for fused in (False, True):
        student = build_tiny_model("llama", seed=0, hidden_act="relu").cuda().train()
        distiller = Distiller(loss, teacher=build_tiny_model("llama", seed=1).cuda(), fused=fused)
        teacher = distiller.teacher_outputs(student, inputs)
        with distiller.watch_student(student) as caught:
            outputs = student(**inputs)
        divergence = distiller.divergence(student, outputs, caught, teacher, inputs["labels"])
        divergence.backward()
        results.append((divergence.item(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (plain, grads), (fused, fused_grads) = results
    # Both paths sum float32 terms of the size of the entropies (log V nats) that cancel down to the divergence:
    # the JSD as beta P log P + (1 - beta) Q log Q - M log M (Liger) or through a logsumexp mixture (torch), so
    # their rounding is absolute, about eps * log V, not relative to a divergence of 1e-3. (Against float64,
    # the torch path is the one further off.) The forward KL cancels less and stays within rel 1e-4.
    rounding = torch.finfo(torch.float32).eps * math.log(VOCAB) if kind == "jsd" else 0.0
    assert plain > 1e-4 and fused == pytest.approx(plain, rel=1e-4, abs=rounding)
    assert_grads_close(fused_grads, grads)


liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
# Liger's Triton kernels run under the CPU interpreter (CI) or compiled on CUDA tensors (RELUFY_TEST_CUDA=1)
LIGER_DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu")


@liger
@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_the_one_pass_loss_is_the_two_pass_loss_without_the_models_own_head(tmp_path, kind):
    """With Liger, one pass of Liger's chunked JSD loss over the student's head gives the two-pass loss (the
    model's cross-entropy, then the fused linear JSD), its logged terms and its gradients; on the one-pass path
    the model's own LM head runs on no position (it makes no logits and no loss of its own)."""
    inputs = {key: value.to(LIGER_DEVICE) for key, value in batch().items()}
    inputs["labels"][0, 5:9] = -100
    results, head_rows = [], []
    for one_pass in (False, True):
        student = build_tiny_model("llama", seed=0, hidden_act="relu").to(LIGER_DEVICE).train()
        student.lm_head.register_forward_hook(lambda _m, args, _out: head_rows.append((one_pass, args[0].shape[1])))
        distiller = Distiller(DistillLoss(alpha=0.7, temperature=2.0, kind=kind, beta=0.3),
                              teacher=build_tiny_model("llama", seed=1).to(LIGER_DEVICE), fused=True,
                              one_pass=one_pass)
        trainer = make_trainer(student, tmp_path / str(one_pass), 0.05, distiller)
        loss, grads = loss_and_grads(trainer, inputs)
        window = trainer._window
        results.append((loss.item(), float(window.lm), float(window.distill), float(window.l1), grads))
    (loss, lm, kd, l1, grads), (one_loss, one_lm, one_kd, one_l1, one_grads) = results
    assert head_rows == [(False, 16), (True, 0)]
    assert kd > 1e-4 and one_kd == pytest.approx(kd, rel=1e-4, abs=torch.finfo(torch.float32).eps * math.log(VOCAB))
    assert one_lm == pytest.approx(lm, rel=1e-6) and one_l1 == l1
    assert one_loss == pytest.approx(loss, rel=1e-5)
    assert one_loss == pytest.approx(0.3 * one_lm + 0.7 * 4 * one_kd + 0.05 * one_l1, rel=1e-6)
    assert_grads_close(one_grads, grads)


# -- the loss inside the Trainer -------------------------------------------------------------------------------
def test_alpha_zero_reproduces_the_loss_and_gradients_bit_for_bit(tmp_path):
    teacher = build_tiny_model("llama", seed=0)  # SiLU
    plain = make_trainer(build_tiny_model("llama", seed=0, hidden_act="relu").train(), tmp_path / "plain", 0.05)
    distilled = make_trainer(build_tiny_model("llama", seed=0, hidden_act="relu").train(), tmp_path / "kd", 0.05,
                             Distiller(DistillLoss(alpha=0.0), teacher=teacher))
    inputs = batch()
    loss, grads = loss_and_grads(plain, inputs)
    kd_loss, kd_grads = loss_and_grads(distilled, inputs)
    assert torch.equal(loss, kd_loss)
    assert grads.keys() == kd_grads.keys() and all(torch.equal(grads[name], kd_grads[name]) for name in grads)
    assert distilled._window.distill_count == 1 and float(distilled._window.distill) > 0  # it was computed
    assert float(distilled._window.l1) == float(plain._window.l1)  # the teacher's x1 never reached the L1 term


def test_the_loss_and_gradients_match_an_explicit_reference(tmp_path):
    alpha, temperature, lam = 0.7, 2.0, 0.05
    teacher = build_tiny_model("llama", seed=0)
    student = build_tiny_model("llama", seed=0, hidden_act="relu").train()
    trainer = make_trainer(student, tmp_path, lam, Distiller(DistillLoss(alpha, temperature), teacher=teacher))
    inputs = batch()
    loss, grads = loss_and_grads(trainer, inputs)

    reference = build_tiny_model("llama", seed=0, hidden_act="relu").train()
    captured = []
    for module in (layer.mlp.down_proj for layer in reference.model.layers):
        module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    out = reference(**inputs)
    with torch.no_grad():
        target = (teacher(input_ids=inputs["input_ids"]).logits[:, :-1] / temperature).softmax(-1)
    log_q = (out.logits[:, :-1] / temperature).log_softmax(-1)
    kd = (target * (target.log() - log_q)).sum(-1).mean()
    explicit = alpha * temperature**2 * kd + (1 - alpha) * out.loss + lam * sum(x.abs().sum(-1).mean() for x in captured)
    explicit.backward()
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-5)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_the_divergence_is_zero_when_the_student_is_the_teacher(tmp_path, kind):
    student = build_tiny_model("llama", seed=0).train()  # no conversion: SiLU student, teacher = the same weights
    trainer = make_trainer(student, tmp_path, 0.0, Distiller(DistillLoss(kind=kind), teacher=build_tiny_model("llama")))
    loss = trainer.compute_loss(student, batch())
    assert abs(float(trainer._window.distill)) < 1e-6
    assert loss.item() == pytest.approx(0.5 * student(**batch()).loss.item(), rel=1e-5)


# -- the LoRA teacher: adapters off, the original activation back ---------------------------------------------
def lora_student():
    from relufy.lora import wrap_with_lora

    args = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                           lora_modules_to_save=None, load_in_4bit=False)
    student = wrap_with_lora(build_tiny_model("llama", seed=0, hidden_act="relu"), args, seed=0).train()
    with torch.no_grad():  # adapters that change the output, so that disabling them shows
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return student


def test_the_lora_teacher_is_the_base_model_with_its_original_activation():
    student = lora_student()
    distiller = Distiller(DistillLoss(), swap=ActivationSwap(student, "relu", "silu"))
    inputs = batch()
    probe = SparsityProbe.for_training(student).attach()
    probe.enabled = False  # as ProSparseTrainer keeps it outside the student's forward
    assert student.config.use_cache  # the student's config asks for a KV cache; the teacher's forward makes none
    caches = []
    student.get_decoder().register_forward_hook(lambda _m, _a, out: caches.append(out.past_key_values))
    logits = distiller.teacher_outputs(student, inputs)
    assert caches == [None]
    silu = build_tiny_model("llama", seed=0)
    torch.testing.assert_close(logits, silu(input_ids=inputs["input_ids"]).logits, rtol=1e-5, atol=1e-6)
    assert not logits.requires_grad and probe.l1.value().item() == 0.0 and probe.layers[0].elements == 0
    # afterwards the student is the ReLU model with its adapters again, in training mode
    assert student.training and all(isinstance(layer.mlp.act_fn, torch.nn.ReLU)
                                    for layer in student.base_model.model.model.layers)
    assert not torch.allclose(student(**inputs).logits, logits, atol=1e-3)


def test_the_activation_swap_is_undone_when_the_teacher_forward_fails():
    student = lora_student()
    distiller = Distiller(DistillLoss(), swap=ActivationSwap(student, "relu", "silu"))
    with pytest.raises(Exception):
        distiller.teacher_outputs(student, {"input_ids": torch.full((1, 4), 10**6)})  # no such token
    layers = student.base_model.model.model.layers
    assert all(isinstance(layer.mlp.act_fn, torch.nn.ReLU) for layer in layers)
    assert student.training


# -- the compiled teacher -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_a_compiled_teacher_gives_the_eager_teachers_outputs_from_one_graph(fused):
    """compile_options compile the separate teacher's forward (its decoder when the fused loss only needs the
    hidden states): the same outputs, one graph however many batches, no graph breaks. The eager backend traces
    what inductor would compile, in a fraction of the time; the GPU runs use inductor."""
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    student = build_tiny_model("llama", seed=0, hidden_act="relu")
    eager = Distiller(DistillLoss(), teacher=build_tiny_model("llama", seed=1), fused=fused)
    compiled = Distiller(DistillLoss(), teacher=build_tiny_model("llama", seed=1), fused=fused,
                         compile_options={"backend": "eager"})
    assert isinstance(compiled.teacher_body, torch._dynamo.eval_frame.OptimizedModule)
    for seed in (0, 1):
        expected, got = (d.teacher_outputs(student, batch(seed)) for d in (eager, compiled))
        if fused:
            assert torch.equal(got.hidden, expected.hidden) and got.weight is compiled.teacher.lm_head.weight
            assert got.hidden.shape == (2, 16, 32)
        else:
            assert torch.equal(got, expected) and got.shape == (2, 16, 384)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_a_recipe_with_torch_compile_compiles_the_separate_teacher_only(silu_base, tmp_path):
    trainer, _ = build_trainer(tiny_recipe(silu_base, tmp_path / "run", "torch_compile=true"))
    body = trainer.distiller.teacher_body
    assert isinstance(body, torch._dynamo.eval_frame.OptimizedModule) and body._orig_mod is trainer.distiller.teacher
    trainer, _ = build_trainer(tiny_recipe(silu_base, tmp_path / "plain"))
    assert trainer.distiller.teacher_body is trainer.distiller.teacher
    trainer, _ = build_trainer(tiny_recipe(silu_base, tmp_path / "lora", "torch_compile=true", "use_peft=true"))
    assert trainer.distiller.teacher is None and trainer.distiller.teacher_body is None


# -- whole runs -------------------------------------------------------------------------------------------------
def test_a_run_keeps_the_teacher_frozen_and_logs_the_distillation_loss(silu_base, tmp_path):
    recipe = tiny_recipe(silu_base, tmp_path / "run", "max_steps=3", "stages=[{lambda: 0.01, end_step: 3}]",
                         "distill_temperature=2.0")
    trainer, held_out = build_trainer(recipe)
    teacher = trainer.distiller.teacher
    before = {name: p.detach().clone() for name, p in teacher.state_dict().items()}
    assert teacher.config.hidden_act == "silu" and "SiLU" in type(teacher.model.layers[0].mlp.act_fn).__name__
    assert trainer.model.config.hidden_act == "relu"
    run_training(trainer, recipe, held_out)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[name], p) for name, p in teacher.state_dict().items())
    assert not any(p is q for p in teacher.parameters() for q in trainer.model.parameters())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        expected = 0.5 * 4 * entry["distill_loss"] + 0.5 * entry["lm_loss"] + 0.01 * entry["l1_loss"]
        assert entry["distill_loss"] > 0 and entry["loss"] == pytest.approx(expected, rel=1e-3)
    assert "distill_loss" in json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"][0]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["relufy"]["training"]["distill"]
    assert recorded == {"alpha": 0.5, "temperature": 2.0, "loss": "kl", "teacher": "source"}


def test_a_gemma3_run_cut_to_fewer_layers_distills_from_gelu_tanh_and_saves(tmp_path):
    """Gemma 3 (GELU-tanh, per-layer attention types), as the frontier's smoke runs train it: a shallower cut
    of the base, converted to ReLU, distilled from the GELU-tanh original, saved (its layer_types cut too)."""
    base = save_tiny_checkpoint("gemma3_text", tmp_path / "gemma3", SAMPLE_TEXT, num_hidden_layers=3,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    recipe = tiny_recipe(base, tmp_path / "run", "model_config_overrides={num_hidden_layers: 2}", "max_steps=2",
                         "stages=[{lambda: 0.01, end_step: 2}]")
    trainer, held_out = build_trainer(recipe)
    teacher = trainer.distiller.teacher
    assert teacher.config.hidden_activation == "gelu_pytorch_tanh" and len(teacher.model.layers) == 2
    assert trainer.model.config.hidden_activation == "relu"
    run_training(trainer, recipe, held_out)
    assert all(entry["distill_loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["layer_types"] == ["sliding_attention"] * 2


def test_a_lora_run_distills_from_its_own_base(silu_base, tmp_path):
    recipe = tiny_recipe(silu_base, tmp_path / "lora", "use_peft=true", "max_steps=2",
                         "stages=[{lambda: 0.01, end_step: 2}]", "distill_loss=jsd")
    trainer, held_out = build_trainer(recipe)
    assert trainer.distiller.teacher is None and len(trainer.distiller.swap.slots) == 2
    run_training(trainer, recipe, held_out)
    assert all(entry["distill_loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)
    assert (tmp_path / "lora" / "adapter").is_dir()


def test_resume_continues_a_distilled_run_exactly(silu_base, tmp_path):
    from tiny_runs import recorded_run

    settings = ["max_steps=4", "save_steps=2", "logging_steps=1", "stages=[{lambda: 0.01, end_step: 4}]"]
    full, full_logs = recorded_run(tiny_recipe(silu_base, tmp_path / "full", *settings))
    recorded_run(tiny_recipe(silu_base, tmp_path / "cut", *settings), stop_at=3)
    rest, rest_logs = recorded_run(tiny_recipe(silu_base, tmp_path / "cut", *settings), resume=True)
    assert rest == full[len(full) - len(rest):] and rest[0][0] == 3  # resumed from checkpoint-2
    for resumed, uninterrupted in zip(rest_logs, full_logs):
        assert resumed["distill_loss"] == pytest.approx(uninterrupted["distill_loss"], rel=1e-4)
        assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-4)


# -- bad input, refused before any step ---------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("distill_alpha=1.5", "distill_alpha must be in [0, 1]"),
    ("distill_alpha=-0.1", "distill_alpha must be in [0, 1]"),
    ("distill_alpha=.nan", "distill_alpha must be in [0, 1]"),
    ("distill_temperature=0", "distill_temperature must be a finite number > 0"),
    ("distill_temperature=-1", "distill_temperature must be a finite number > 0"),
    ("distill_temperature=.inf", "distill_temperature must be a finite number > 0"),
    ("distill_jsd_beta=2", "distill_jsd_beta must be in [0, 1]"),
    ("distill_loss=mse", "distill_loss must be kl or jsd"),
])
def test_bad_distillation_values_are_refused_when_the_recipe_is_read(override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(TINY_RECIPE, ["distill=true", override])


def test_a_teacher_without_distill_is_refused():
    with pytest.raises(RecipeError, match="distill_teacher is set but distill is false"):
        load_recipe(TINY_RECIPE, ["distill_teacher=/some/model"])


def refusal(capsys, base: Path, out: Path, *overrides: str) -> str:
    """Run `relufy train` that must stop before training: its one-line error."""
    sets = [f"model_name_or_path={base}", "model_config_overrides={}", "block_size=32", f"output_dir={out}",
            "distill=true", *overrides]
    code = main(["train", str(TINY_RECIPE), *(part for flag in sets for part in ("--set", flag))])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert not list(out.glob("checkpoint-*"))
    last = err.strip().splitlines()[-1]  # earlier lines: datasets' progress bars
    assert last.startswith("relufy train: error: ")
    return last


def test_a_teacher_that_cannot_load_is_refused(silu_base, tmp_path, capsys):
    err = refusal(capsys, silu_base, tmp_path / "out", f"distill_teacher={tmp_path / 'missing'}")
    assert "distill_teacher" in err and "does not exist" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert "distill_teacher" in refusal(capsys, silu_base, tmp_path / "out", f"distill_teacher={broken}")


def test_a_teacher_with_another_vocabulary_or_tokenizer_is_refused(silu_base, tmp_path, capsys):
    wider = save_tiny_model("llama", tmp_path / "wider", vocab_size=400)
    tiny_tokenizer(SAMPLE_TEXT).save_pretrained(wider)
    assert "predicts 400 tokens but the student 384" in refusal(capsys, silu_base, tmp_path / "out",
                                                               f"distill_teacher={wider}")
    other_text = tmp_path / "other.txt"
    other_text.write_text("".join(f"line {i} of a different text with words like zebra quartz {i * 7}\n"
                                  for i in range(400)))
    other = save_tiny_checkpoint("llama", tmp_path / "other", other_text)
    assert "has another tokenizer" in refusal(capsys, silu_base, tmp_path / "out", f"distill_teacher={other}")
    same = save_tiny_checkpoint("llama", tmp_path / "same", SAMPLE_TEXT, seed=3)  # another model, same tokenizer
    recipe = tiny_recipe(silu_base, tmp_path / "ok", f"distill_teacher={same}")
    trainer, _ = build_trainer(recipe)
    assert trainer.distiller.teacher.config.hidden_act == "silu"


def test_a_relu_base_with_no_original_activation_is_refused_with_the_fix(tmp_path, capsys):
    relu = save_tiny_checkpoint("llama", tmp_path / "relu", SAMPLE_TEXT, hidden_act="relu")
    err = refusal(capsys, relu, tmp_path / "out", "activation=null")
    assert "no unconverted teacher to restore" in err and "distill_teacher" in err


def test_a_base_relufy_trained_is_refused_as_its_own_teacher(tmp_path):
    """A trained checkpoint (or a conversion of one, which carries its record) still names the untouched model's
    activation, but its weights with that activation are not the untouched model: no default teacher."""
    from relufy.checkpoint import Source
    from relufy.distill import original_activation
    from relufy.train_base import Base

    converted = {"model_type": "llama", "hidden_act": "fatrelu",
                 "relufy": {"original_activation": "silu", "activation": "fatrelu"}}
    assert original_activation(Base(Source(tmp_path), converted)) == ("fatrelu", "silu")
    converted["relufy"]["training"] = {"steps": 3}
    with pytest.raises(RecipeError, match="was trained by relufy .* set distill_teacher"):
        original_activation(Base(Source(tmp_path), converted))
