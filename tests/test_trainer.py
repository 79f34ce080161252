"""ProSparseTrainer (relufy.trainer): the LM + lambda * L1 loss, its scaling and logging, and its guards (NaN/inf,
a full disk, complete-or-absent checkpoints)."""

import errno
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from tiny_models import assert_grads_close, batch, relu_model
from tiny_runs import TINY_RECIPE, tiny_recipe
from transformers import TrainerCallback, TrainingArguments

from relufy.architectures import down_projections
from relufy.errors import TrainingError
from relufy.recipe import load_recipe
from relufy.schedule import Schedule
from relufy.train import build_trainer, run_training, train
from relufy.trainer import ProSparseTrainer, last_checkpoint

def make_trainer(model, tmp_path, stages, **args) -> ProSparseTrainer:
    training = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **args)
    return ProSparseTrainer(model=model, args=training, schedule=Schedule.from_config(stages))


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
    # inductor's backward sums in its own order (fused, vectorised, split across threads): equal up to that
    assert_grads_close(compiled_grads, expected)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="Liger Kernel's Triton kernels run on CUDA only")
def test_liger_kernels_under_torch_compile_keep_every_gradient(tmp_path, monkeypatch):
    """The real runs' settings (`--liger --compile`): Liger's RMSNorm, RoPE and fused cross-entropy, the probe's
    L1 tap and torch.compile together give the eager gradients. Liger's kernels are autograd Functions, the
    kind a torch 2.11 dynamo bug fed a wrong (zero) gradient when an output aliased an intermediate."""
    from transformers.integrations.liger import apply_liger_kernel
    from transformers.models.llama import modeling_llama

    from relufy.probe import SparsityProbe

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger patches the module globally
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    config = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "use_liger_kernel=true"]).training.liger_kernel_config
    inputs = {key: value.cuda() for key, value in batch().items()}
    results = []
    for compiled in (False, True):
        model = relu_model().cuda()
        apply_liger_kernel(model, config)
        probe = SparsityProbe.for_training(model).attach()
        out = (torch.compile(model) if compiled else model)(**inputs)
        l1 = probe.pop_l1()
        (out.loss + 0.05 * l1).backward()
        results.append((out.loss.item(), l1.item(), grads(model)))
    (loss, l1, expected), (loss_c, l1_c, compiled_grads) = results
    assert l1 > 0 and l1_c == pytest.approx(l1, rel=1e-4) and loss_c == pytest.approx(loss, rel=1e-4)
    assert "model.norm.weight" in expected and expected["model.norm.weight"].abs().max() > 0  # Liger's RMSNorm learns
    assert_grads_close(compiled_grads, expected)


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


# -- guards: NaN/inf, a full disk, a killed save --------------------------------------------------
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
