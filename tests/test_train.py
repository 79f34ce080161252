"""ProSparse training on CPU with tiny checkpoints: the L1 term, its scaling, logging, resume, failures."""

import errno
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE_TEXT
from safetensors import SafetensorError
from tiny_models import build_tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from relufy.cli import main
from relufy.errors import DataError, TrainingError
from relufy.architectures import down_projections
from relufy.recipe import load_recipe
from relufy.schedule import Schedule
from relufy.threshold import calibrate_threshold
from relufy.train import build_trainer, run_training, train
from relufy.trainer import ProSparseTrainer, last_checkpoint

TINY_RECIPE = REPO / "recipes" / "tiny-cpu.yaml"


def tiny_recipe(base: Path, out: Path, *overrides: str):
    return load_recipe(TINY_RECIPE, [
        f"model_name_or_path={base}", "model_config_overrides={}", "block_size=32", f"output_dir={out}",
        "threshold_shift=false", "threshold_eval_tokens=256", "threshold_search_steps=2", *overrides])


def make_trainer(model, tmp_path, stages, **args) -> ProSparseTrainer:
    from relufy.probe import SparsityProbe

    training = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **args)
    probe = SparsityProbe.for_training(model).attach()
    return ProSparseTrainer(model=model, args=training, schedule=Schedule.from_config(stages), probe=probe)


def relu_model(seed=0):
    return build_tiny_model("llama", seed=seed, hidden_act="relu").train()


def batch(seed=0, size=(2, 16)):
    ids = torch.randint(0, 384, size, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# -- the regularization term -------------------------------------------------------------------
def test_l1_gradient_matches_autograd_of_an_explicit_reference(tmp_path):
    lam = 0.05
    model, reference = relu_model(), relu_model()
    trainer = make_trainer(model, tmp_path, [{"lambda": lam, "end_step": 10}])
    inputs = batch()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()

    captured = []
    handles = [m.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
               for m in down_projections(reference)]
    out = reference(**inputs)
    explicit = out.loss + lam * sum(x1.abs().sum(dim=-1).mean() for x1 in captured)
    explicit.backward()
    for handle in handles:
        handle.remove()

    assert len(captured) == 2
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-6)
    assert loss.item() > out.loss.item()  # the L1 term is really in there
    expected = grads(reference)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="Liger Kernel's Triton kernels run on CUDA only")
def test_liger_kernels_leave_the_relu_mlp_the_loss_and_the_l1_unchanged(tmp_path, monkeypatch):
    """use_liger_kernel: true takes Liger's RMSNorm, RoPE and fused cross-entropy, never its SiLU MLP kernel."""
    from transformers.integrations.liger import apply_liger_kernel
    from transformers.models.llama import modeling_llama

    from relufy.probe import SparsityProbe

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger patches the module globally
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    config = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "use_liger_kernel=true"]).training.liger_kernel_config
    model = relu_model().cuda()
    probe = SparsityProbe.for_training(model).attach()
    inputs = {key: value.cuda() for key, value in batch().items()}
    results = []
    for patched in (False, True):
        if patched:
            apply_liger_kernel(model, config)
        loss = model(**inputs).loss
        results.append((loss.item(), probe.pop_l1().item(), probe.zero_ratio_per_layer()))
        probe.reset()
    (loss, l1, zeros), (loss_liger, l1_liger, zeros_liger) = results
    assert "forward" in vars(model.model.norm) and "forward" in vars(model)  # Liger's RMSNorm and fused CE are in
    assert "forward" not in vars(model.model.layers[0].mlp)
    assert loss_liger == pytest.approx(loss, rel=1e-4) and l1_liger == pytest.approx(l1, rel=1e-4)
    assert zeros_liger == zeros and min(zeros) > 0.2  # ReLU's exact zeros: Liger's SwiGLU would leave none


def test_the_l1_term_and_zero_counts_are_the_same_under_torch_compile():
    """A recipe may set torch_compile: true; dynamo then traces the probe's hooks and L1Tap."""
    from relufy.probe import SparsityProbe

    inputs = batch()
    results = []
    for compiled in (False, True):
        model = relu_model()
        probe = SparsityProbe.for_training(model).attach()
        forward = torch.compile(model) if compiled else model
        out = forward(**inputs)
        l1 = probe.pop_l1()
        (out.loss + 0.05 * l1).backward()
        results.append((out.loss.item(), l1.item(), probe.zero_ratio_per_layer(), grads(model)))
    (loss, l1, zeros, expected), (loss_c, l1_c, zeros_c, compiled_grads) = results
    assert l1 > 0 and l1_c == pytest.approx(l1, rel=1e-5) and loss_c == pytest.approx(loss, rel=1e-5)
    assert zeros_c == zeros
    for name, grad in expected.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torch_compile_training_compiles_two_graphs_however_many_steps_and_logs(tmp_path):
    """torch_compile: true compiles the plain step and the logging step (zeros counted) once each; a guard on
    anything that changes per step (lambda, counts, the step) would recompile every step instead."""
    import datasets
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids = torch.randint(0, 384, (48, 16), generator=torch.Generator().manual_seed(0))
    blocks = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    stages = [{"lambda": 0.0, "end_step": 2}, {"lambda": 1e-3, "end_step": 6}, {"lambda": 2e-3, "end_step": 12}]
    trainer = make_trainer(relu_model(), tmp_path, stages, max_steps=12, per_device_train_batch_size=4,
                           torch_compile=True, logging_steps=3, save_strategy="no", disable_tqdm=True)
    trainer.train_dataset = blocks
    trainer.train()
    logged = [row for row in trainer.state.log_history if "l1_lambda" in row]
    assert len(logged) == 4 and logged[-1]["l1_lambda"] == pytest.approx(2e-3) and logged[-1]["l1_loss"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_counts_once(tmp_path):
    stages = [{"lambda": 0.1, "end_step": 10}]
    plain, checkpointed = relu_model(), relu_model()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    results = []
    for model in (plain, checkpointed):
        trainer = make_trainer(model, tmp_path, stages)
        loss = trainer.compute_loss(model, batch())
        loss.backward()
        assert trainer.probe.layers[0].tokens == 2 * 16  # one forward counted, not the recomputation
        assert trainer.probe.l1.value().item() == 0.0  # nothing left over from the backward pass
        results.append((loss.item(), grads(model)))
    assert checkpointed.is_gradient_checkpointing
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lambda_zero_leaves_the_plain_lm_loss(tmp_path):
    model = relu_model()
    trainer = make_trainer(model, tmp_path, [{"lambda": 0.0, "end_step": 10}])
    inputs = batch()
    assert trainer.compute_loss(model, inputs).item() == pytest.approx(model(**inputs).loss.item(), rel=1e-6)


def test_l1_is_scaled_like_the_lm_loss_under_gradient_accumulation(silu_base, tmp_path):
    """One SGD step on 2 blocks: batch 2 equals batch 1 x 2 accumulation steps (with and without
    gradient checkpointing through the Trainer), L1 included."""
    weights = []
    for name, batch_size, accumulation, checkpointing in (("whole", 2, 1, False), ("accumulated", 1, 2, False),
                                                          ("checkpointed", 1, 2, True)):
        recipe = tiny_recipe(silu_base, tmp_path / name, "max_steps=1", "stages=[{lambda: 0.5, end_step: 1}]",
                             f"per_device_train_batch_size={batch_size}", f"gradient_accumulation_steps={accumulation}",
                             "optim=sgd", "learning_rate=0.5", "lr_scheduler_type=constant", "warmup_steps=0",
                             "max_grad_norm=0", "save_steps=100", f"gradient_checkpointing={str(checkpointing).lower()}")
        train(recipe)
        from safetensors.torch import load_file

        weights.append(load_file(tmp_path / name / "model.safetensors"))
    start = load_file(tmp_path / "whole" / "base-relu" / "model.safetensors")
    moved = [name for name in start if not torch.equal(start[name], weights[0][name])]
    assert moved, "the step changed nothing"
    for other in weights[1:]:
        for name in weights[0]:
            torch.testing.assert_close(other[name], weights[0][name], rtol=1e-5, atol=1e-6, msg=name)


# -- a whole run: logging, plot, config, threshold shift -------------------------------------------
def test_a_run_logs_lambda_l1_and_sparsity_plots_them_and_records_the_threshold(silu_base, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(TINY_RECIPE), "--set", f"model_name_or_path={silu_base}",
                 "--set", "model_config_overrides={}", "--set", "block_size=32", "--set", f"output_dir={out}",
                 "--set", "max_steps=6", "--set", "report_to=[tensorboard]", "--set", "threshold_shift=true",
                 "--set", "threshold_eval_tokens=256", "--set", "threshold_search_steps=2",
                 "--set", "threshold_max_ppl_increase=0.05"])
    assert code == 0
    assert f"wrote {out} after 6 steps" in capsys.readouterr().out

    schedule = load_recipe(TINY_RECIPE).schedule
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]
    for entry in logged:
        assert entry["l1_lambda"] == pytest.approx(schedule.lambda_at(entry["step"]))
        assert entry["l1_loss"] > 0
        assert 0.0 < entry["activation_sparsity"] < 1.0
        if entry["l1_lambda"] > 0:
            assert entry["loss"] == pytest.approx(entry["lm_loss"] + entry["l1_lambda"] * entry["l1_loss"], rel=1e-3)
    assert {entry["l1_lambda"] for entry in logged} == {0.0, 0.002, schedule.lambda_at(5), schedule.lambda_at(6)}

    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["relufy"]["training"]["stages"] == schedule.describe()
    shift = config["relufy"]["threshold_shift"]
    assert 0 <= shift["threshold"] <= 0.05
    assert shift["perplexity_after"] <= shift["perplexity_before"] * 1.05
    assert shift["sparsity_after"] >= shift["sparsity_before"]
    assert config["hidden_act"] == (f"fatrelu_{shift['threshold']!r}" if shift["threshold"] > 0 else "relu")
    assert config["relufy"]["activation"] == config["hidden_act"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p.parent for p in out.rglob("events.out.tfevents.*")]
    assert runs, "report_to tensorboard wrote no event file"
    tags = set().union(*(EventAccumulator(str(run)).Reload().Tags()["scalars"] for run in runs))
    assert {"train/l1_lambda", "train/l1_loss", "train/activation_sparsity", "train/loss"} <= tags


def test_calibration_takes_the_largest_threshold_within_the_bound(monkeypatch):
    """With perplexity 100 * (1 + t), a 1% bound allows t <= 0.01: the search must land just below it."""
    from relufy import metrics
    from relufy.activations import module_class

    def fake_measure(model, blocks, **kwargs):
        shifted = [m.threshold for m in model.modules() if isinstance(m, module_class("fatrelu"))]
        t = shifted[0] if shifted else 0.0
        return {"perplexity": 100 * (1 + t), "overall": 0.5 + t, "tokens": 64}

    monkeypatch.setattr(metrics, "measure_sparsity", fake_measure)
    tight = calibrate_threshold(relu_model().eval(), [], max_ppl_increase=0.01, threshold_max=0.05,
                                steps=8, max_tokens=64)
    assert 0.009 <= tight["threshold"] <= 0.01
    assert tight["perplexity_after"] <= 101.0 and tight["sparsity_after"] > tight["sparsity_before"]
    assert all(t["threshold"] <= 0.05 for t in tight["tried"])
    loose = calibrate_threshold(relu_model().eval(), [], max_ppl_increase=0.1, threshold_max=0.05,
                                steps=8, max_tokens=64)
    assert loose["threshold"] == 0.05
    none = calibrate_threshold(relu_model().eval(), [], max_ppl_increase=0.0, threshold_max=0.05,
                               steps=4, max_tokens=64)
    assert none["threshold"] == 0.0 and none["perplexity_after"] == 100.0


def test_calibration_on_a_real_model_respects_the_bound():
    model = relu_model().eval()
    blocks = {"input_ids": [batch(seed)["input_ids"][0].tolist() for seed in range(4)]}

    class Blocks(list):
        def __getitem__(self, item):
            return {"input_ids": blocks["input_ids"][item]} if isinstance(item, slice) else super().__getitem__(item)

    rows = Blocks([{"input_ids": ids} for ids in blocks["input_ids"]])
    result = calibrate_threshold(model, rows, max_ppl_increase=0.001, threshold_max=0.5, steps=3, max_tokens=64)
    assert result["perplexity_after"] <= result["perplexity_before"] * 1.001
    assert result["sparsity_after"] >= result["sparsity_before"]


# -- resume ------------------------------------------------------------------------------------
def recorded_run(recipe, *, resume=False, stop_at=None):
    """Run a recipe and return (step, lambda, batch digest) for every micro-batch and the log history."""
    trainer, held_out = build_trainer(recipe, resume=resume)
    seen = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            digest = hashlib.sha1(inputs["input_ids"].numpy().tobytes()).hexdigest()
            seen.append((trainer.state.global_step + 1, trainer.lambda_for_next_step(), digest))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    if stop_at is not None:
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == stop_at:
                    control.should_training_stop = True
        trainer.add_callback(Stop())
    run_training(trainer, recipe, held_out, resume=resume)
    return seen, [e for e in trainer.state.log_history if "loss" in e]


def test_resume_continues_the_schedule_and_data_order_exactly(silu_base, tmp_path):
    settings = ["max_steps=8", "save_steps=3", "logging_steps=1"]
    full, full_logs = recorded_run(tiny_recipe(silu_base, tmp_path / "full", *settings))
    first, _ = recorded_run(tiny_recipe(silu_base, tmp_path / "cut", *settings), stop_at=4)
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "checkpoint-6").exists()
    rest, rest_logs = recorded_run(tiny_recipe(silu_base, tmp_path / "cut", *settings), resume=True)

    assert first == full[: len(first)]
    assert rest[0][0] == 4  # resumed from checkpoint-3: step 4 is redone
    assert rest == full[len(full) - len(rest):]
    assert {step for step, _, _ in full} == set(range(1, 9))
    assert [e["step"] for e in rest_logs] == [e["step"] for e in full_logs] == list(range(1, 9))
    for resumed, uninterrupted in zip(rest_logs, full_logs):  # the checkpoint's history, then the resumed steps
        assert resumed["l1_lambda"] == uninterrupted["l1_lambda"]
        assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-4)


def test_max_train_minutes_stops_with_a_checkpoint_that_resume_finishes_exactly(silu_base, tmp_path, capsys):
    settings = ["max_steps=6", "logging_steps=2", "save_steps=100"]
    full, _ = recorded_run(tiny_recipe(silu_base, tmp_path / "full", *settings))
    cut = tmp_path / "cut"
    overrides = [f"model_name_or_path={silu_base}", "model_config_overrides={}", "block_size=32", f"output_dir={cut}",
                 "threshold_shift=false", *settings]
    assert main(["train", str(TINY_RECIPE), *(f"--set={o}" for o in overrides), "--set=max_train_minutes=1e-9"]) == 0
    assert "stopped at step 2 of 6" in capsys.readouterr().out  # the first logging step past the limit
    assert (cut / "checkpoint-2").is_dir() and not (cut / "config.json").exists()  # no final model yet
    rest, _ = recorded_run(tiny_recipe(silu_base, cut, *settings), resume=True)
    assert rest[0][0] == 3 and rest == full[len(full) - len(rest):]
    assert (cut / "config.json").exists()


def test_resume_without_a_checkpoint_and_a_rerun_without_resume_are_refused(silu_base, tmp_path):
    recipe = tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_steps=2")
    with pytest.raises(TrainingError, match="holds no checkpoint-N"):
        train(recipe, resume=True)
    train(recipe)
    with pytest.raises(TrainingError, match="pass --resume to continue"):
        train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_steps=2"))
    summary = train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_steps=2"), force=True)
    assert summary.steps == 2


def test_a_finished_run_without_checkpoints_is_replaced_only_with_force(silu_base, tmp_path):
    recipe = tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_strategy='no'")
    train(recipe)
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds a trained model; pass --force"):
        train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_strategy='no'"))
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    assert train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=2", "save_strategy='no'"), force=True).steps == 2


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_liger_kernel_installed_is_refused_before_any_work(silu_base, tmp_path):
    with pytest.raises(TrainingError, match=r"needs liger-kernel.*relufy\[liger\]"):
        train(tiny_recipe(silu_base, tmp_path / "out", "use_liger_kernel=true"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("zero3", [False, True])
def test_liger_fused_loss_is_turned_off_under_zero3_only(tmp_path, monkeypatch, zero3):
    import transformers.integrations

    from relufy.train import keep_liger_loss_off_under_zero3

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: zero3)
    training = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "use_liger_kernel=true"]).training
    keep_liger_loss_off_under_zero3(training)
    assert training.liger_kernel_config.get("fused_linear_cross_entropy", True) is not zero3
    assert training.liger_kernel_config["swiglu"] is False


def test_a_non_relu_base_with_positive_lambda_is_refused_with_a_hint(silu_base, tmp_path):
    with pytest.raises(TrainingError, match="uses 'silu', not a ReLU-family activation.*activation: relu"):
        train(tiny_recipe(silu_base, tmp_path / "run", "activation=null"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(silu_base, tmp_path):
    recipe = tiny_recipe(silu_base, tmp_path / "run", "max_steps=6", "save_steps=2")
    trainer, held_out = build_trainer(recipe)

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    trainer.add_callback(Poison())
    with pytest.raises(TrainingError, match="NaN/inf at step 3.*checkpoint-2"):
        run_training(trainer, recipe, held_out)
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "checkpoint-4").exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
], ids=["OSError", "SafetensorError", "torch.save"])
def test_running_out_of_disk_while_saving_removes_the_partial_checkpoint(silu_base, tmp_path, monkeypatch, error):
    import transformers.modeling_utils

    original = transformers.modeling_utils.safe_save_file
    saves = []

    def save_file(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 2:  # checkpoint-4: half a file, then the disk is full
            Path(filename).write_bytes(b"half")
            raise error
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    with pytest.raises(TrainingError, match="out of disk space while saving checkpoint-4.*checkpoint-2.*--resume"):
        train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=6", "save_steps=2"))
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_an_interrupted_final_save_leaves_no_half_written_model(silu_base, tmp_path, monkeypatch):
    import transformers.modeling_utils

    original = transformers.modeling_utils.safe_save_file
    saves = []

    def save_file(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 3:  # checkpoint-2, checkpoint-4, then the final model: SIGTERM arrives mid-write
            Path(filename).write_bytes(b"half")
            raise KeyboardInterrupt
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(silu_base, tmp_path / "run", "max_steps=4", "save_steps=2"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".base-relu.relufy-lock", ".relufy-output",
                                                                   "base-relu", "checkpoint-2", "checkpoint-4"]


def test_resume_skips_a_checkpoint_whose_save_was_killed(silu_base, tmp_path, caplog):
    recipe = tiny_recipe(silu_base, tmp_path / "run", "max_steps=4", "save_steps=2")
    train(recipe)
    run = tmp_path / "run"
    assert not list(run.rglob("INCOMPLETE"))
    umask = os.umask(0)
    os.umask(umask)
    for weights in (run / "model.safetensors", run / "checkpoint-4" / "model.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~umask  # as cp writes it; safetensors alone gives 0600
    killed = run / "checkpoint-6"  # what kill -9 in the middle of a save leaves
    killed.mkdir()
    (killed / "INCOMPLETE").write_text("")
    (killed / "model.safetensors").write_bytes(b"half")
    with caplog.at_level("WARNING", logger="relufy.trainer"):
        assert last_checkpoint(run) == run / "checkpoint-4"
    assert "skipping" in caplog.text and "checkpoint-6" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("One short document.\n\nAnother one.\n", "needed"),
    ("A single paragraph without any break at all.\n", "at least 2 are needed"),
])
def test_data_too_short_for_one_step_is_refused(silu_base, tmp_path, text, message):
    data = tmp_path / "tiny.txt"
    data.write_text(text)
    with pytest.raises(DataError, match=message):
        train(tiny_recipe(silu_base, tmp_path / "run", f"data={data}"))


def test_held_out_data_replaces_the_split_and_feeds_the_threshold_search(silu_base, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(SAMPLE_TEXT.read_text().split("\n\n")[:40]))
    with_file, held_out = build_trainer(tiny_recipe(silu_base, tmp_path / "a", f"held_out_data={held}"))
    split, split_held_out = build_trainer(tiny_recipe(silu_base, tmp_path / "b"))
    assert len(with_file.train_dataset) > len(split.train_dataset)  # nothing of `data` was held out
    assert held_out["input_ids"] != split_held_out["input_ids"]
    empty = tmp_path / "empty.txt"
    empty.write_text("Too short.\n")
    with pytest.raises(DataError, match="held-out text"):
        build_trainer(tiny_recipe(silu_base, tmp_path / "c", f"held_out_data={empty}", "threshold_shift=true"))


def test_layers_left_out_on_purpose_are_not_reported_as_unexpected_keys(silu_base, tmp_path):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    transformers_logger.addHandler(handler)
    try:
        build_trainer(tiny_recipe(silu_base, tmp_path / "run", "model_config_overrides={num_hidden_layers: 1}"))
    finally:
        transformers_logger.removeHandler(handler)
    assert not [r for r in records if "UNEXPECTED" in r.getMessage()]
