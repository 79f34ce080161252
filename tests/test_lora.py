"""LoRA mode: only adapters train, the merged checkpoint is ordinary, the probe sees the same x1, resume, ZeRO-2."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM, TrainerCallback

from relufy.activations import register_activations
from relufy.cli import main
from relufy.errors import RecipeError, TrainingError
from relufy.lora import ADAPTER_DIR, lora_config
from relufy.architectures import down_projections, ffn_modules
from relufy.probe import SparsityProbe
from relufy.recipe import load_recipe
from relufy.train import build_trainer, run_training, train

LORA_RECIPE = REPO / "recipes" / "tiny-cpu-lora.yaml"
TARGETS = ("gate_proj", "up_proj", "down_proj")


def lora_recipe(base: Path, out: Path, *overrides: str):
    return load_recipe(LORA_RECIPE, [
        f"model_name_or_path={base}", "model_config_overrides={}", "block_size=32", f"output_dir={out}",
        "threshold_shift=false", "max_steps=4", "save_steps=2", "lora_r=4", "lora_alpha=8", *overrides])


@pytest.fixture(scope="module")
def lora_run(silu_base, tmp_path_factory):
    """One 4-step LoRA run with gradient checkpointing; the trainer (its model still wrapped) and output_dir."""
    out = tmp_path_factory.mktemp("lora") / "run"
    recipe = lora_recipe(silu_base, out, "gradient_checkpointing=true")
    trainer, held_out = build_trainer(recipe)
    summary = run_training(trainer, recipe, held_out)
    assert summary.steps == 4 and 0 < summary.activation_sparsity < 1
    assert trainer.model.get_base_model().is_activation_checkpointing
    return trainer, out


def test_only_the_adapters_train_and_the_base_weights_stay_unchanged(lora_run):
    trainer, out = lora_run
    start = load_file(out / "base-relu" / "model.safetensors")
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == set(TARGETS)
    wrapped = dict(trainer.model.named_parameters())
    for name, weight in start.items():
        module, _, leaf = name.rpartition(".")
        key = f"base_model.model.{module}.base_layer.{leaf}" if module.rsplit(".", 1)[-1] in TARGETS \
            else f"base_model.model.{name}"
        if key in wrapped:
            assert torch.equal(wrapped[key].detach(), weight), f"{name} moved before the merge"
    assert any(p.abs().sum() > 0 for n, p in wrapped.items() if "lora_B" in n), "the adapters did not train"


def test_the_merged_checkpoint_is_plain_and_matches_base_plus_adapter(lora_run):
    from peft import PeftModel

    _, out = lora_run
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # vanilla transformers
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(out / "base-relu", dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, out / ADAPTER_DIR).eval()
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-5, atol=1e-5)

    before, after = load_file(out / "base-relu" / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name.rsplit(".", 2)[-2] for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(TARGETS)  # only the adapted projections moved
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu"
    assert config["relufy"]["training"]["lora"]["target_modules"] == sorted(TARGETS)
    assert (out / "tokenizer.json").is_file() and not any(p.name.endswith(".relufy-tmp") for p in out.iterdir())
    assert not (out / ADAPTER_DIR / "training_args.bin").exists()


def test_relufy_evaluate_and_publish_take_the_merged_checkpoint(lora_run, tmp_path):
    from relufy.evaluate import EvalConfig, evaluate_model
    from relufy.publish import publish

    _, out = lora_run
    results = evaluate_model(str(out), tmp_path / "eval", EvalConfig(tasks=["relufy_dictionary"], limit=4, ps=()))
    assert results["activation"] == "relu" and 0 < results["sparsity"]["overall"] < 1
    assert len(results["sparsity"]["per_layer"]) == 2
    folder = publish(out, tmp_path / "eval" / "results.json", tmp_path / "hub", license_id="mit")
    assert (folder / "model.safetensors").is_file() and not (folder / ADAPTER_DIR).exists()


def test_the_probe_measures_the_same_x1_merged_or_not():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    model = build_tiny_model("llama", hidden_act="relu")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False,
                        modules_to_save=["post_attention_layernorm"])
    wrapped = get_peft_model(model, config).eval()  # init_lora_weights=False: B != 0, outputs change
    assert all(isinstance(m, LoraLinear) for m in down_projections(wrapped))
    assert len(ffn_modules(wrapped)) == 2
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))

    def measure(m):
        with torch.no_grad(), SparsityProbe.for_sampling(m) as probe:
            logits = m(ids).logits
        return probe.summary(), [x.clone() for x in probe.last_inputs], logits

    unmerged = measure(wrapped)
    merged = measure(wrapped.merge_and_unload())
    assert unmerged[0]["tokens"] == merged[0]["tokens"] == 32
    assert unmerged[0]["per_layer"] == pytest.approx(merged[0]["per_layer"], abs=1e-3)
    for x_unmerged, x_merged in zip(unmerged[1], merged[1]):
        torch.testing.assert_close(x_merged, x_unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged[2], unmerged[2], rtol=1e-4, atol=1e-5)


def test_modules_to_save_train_in_full_next_to_the_adapters(silu_base, tmp_path):
    recipe = lora_recipe(silu_base, tmp_path / "run", "max_steps=2", "lora_modules_to_save=[gate_proj]")
    trainer, _ = build_trainer(recipe)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(".gate_proj.modules_to_save." in name for name in trainable)
    assert not any("gate_proj.lora_" in name for name in trainable)  # taken out of the default targets


# -- resume --------------------------------------------------------------------------------------
class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_reloads_the_adapters_and_continues_the_schedule(silu_base, tmp_path):
    settings = ["max_steps=6", "save_steps=2"]
    full = train(lora_recipe(silu_base, tmp_path / "full", *settings))
    cut = lora_recipe(silu_base, tmp_path / "cut", *settings)
    trainer, held_out = build_trainer(cut, callbacks=[StopAt(4)])
    run_training(trainer, cut, held_out)  # the same recipe: parsing another resets accelerate's state
    assert (tmp_path / "cut" / "checkpoint-4" / "adapter_config.json").is_file()

    with pytest.raises(TrainingError, match=r"recipe changed since checkpoint-4 \(lora_r 4 -> 8\)"):
        train(lora_recipe(silu_base, tmp_path / "cut", *settings, "lora_r=8"), resume=True)
    # --allow-changes passes the recipe check; an adapter that cannot load into the new recipe is still refused
    with pytest.raises(TrainingError, match=r"LoRA config differs from checkpoint-4.*r 4 -> 8"):
        train(lora_recipe(silu_base, tmp_path / "cut", *settings, "lora_r=8"), resume=True, allow_changes=True)
    with pytest.raises(TrainingError, match="holds LoRA adapters but the recipe trains all weights"):
        train(lora_recipe(silu_base, tmp_path / "cut", *settings, "use_peft=false"), resume=True, allow_changes=True)
    resumed = train(lora_recipe(silu_base, tmp_path / "cut", *settings), resume=True)

    assert resumed.steps == full.steps == 6
    logs = {name: [e for e in json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
                   if "loss" in e] for name in ("full", "cut")}
    assert [e["step"] for e in logs["cut"]] == list(range(1, 7))
    for cut, uninterrupted in zip(logs["cut"], logs["full"]):
        assert cut["l1_lambda"] == uninterrupted["l1_lambda"]
        assert cut["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-4)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resuming_a_full_training_checkpoint_in_lora_mode_is_refused(silu_base, tmp_path):
    out = tmp_path / "run"
    train(lora_recipe(silu_base, out, "use_peft=false"))
    shutil.rmtree(out / "checkpoint-4")
    with pytest.raises(TrainingError, match="recipe changed since checkpoint-2 \\(use_peft false -> true"):
        train(lora_recipe(silu_base, out), resume=True)
    with pytest.raises(TrainingError, match="full-training checkpoint.*use_peft: true"):
        train(lora_recipe(silu_base, out), resume=True, allow_changes=True)


def test_the_shipped_lora_recipes_parse_and_adapt_the_ffn_projections():
    tiny = load_recipe(LORA_RECIPE).training
    assert tiny.use_peft and set(lora_config(tiny, "llama").target_modules) == set(TARGETS)
    big = load_recipe(REPO / "recipes" / "prosparse-lora-llama2-7b.yaml", ["bf16=false"])
    assert big.training.use_peft and big.training.lora_target_modules == ["all-linear"]
    assert big.training.gradient_checkpointing and big.schedule.last_step == big.training.max_steps


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("lora_r=0", "lora_r must be an integer from 1 to 65536"),
    ("lora_r=-4", "lora_r must be an integer from 1 to 65536"),
    ("lora_alpha=0", r"lora_alpha must be a finite number in \(0, 1048576\]"),
    ("lora_dropout=1.5", r"lora_dropout must be in \[0, 1\)"),
    ("lora_target_modules=[]", "lora_target_modules must be a non-empty list"),
])
def test_bad_lora_values_are_refused_when_the_recipe_is_read(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(LORA_RECIPE, [override])


def test_4bit_without_peft_is_refused():
    with pytest.raises(RecipeError, match="load_in_4bit needs use_peft: true"):
        load_recipe(LORA_RECIPE, ["use_peft=false", "load_in_4bit=true"])


def test_4bit_without_bitsandbytes_says_what_to_install():
    pytest.importorskip("peft")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(RecipeError, match="load_in_4bit needs bitsandbytes.*pip install bitsandbytes"):
        load_recipe(LORA_RECIPE, ["load_in_4bit=true"])


def test_target_modules_matching_nothing_list_the_names_that_exist(silu_base, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(LORA_RECIPE), "--set", f"model_name_or_path={silu_base}",
                 "--set", "model_config_overrides={}", "--set", "block_size=32", "--set", f"output_dir={out}",
                 "--set", "lora_target_modules=[w1, down_proj]"])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: datasets' progress bars
    assert code != 0 and error.startswith("relufy train: error: lora_target_modules: w1 match(es) nothing")
    assert all(name in error for name in ("gate_proj", "up_proj", "down_proj", "q_proj", "lm_head"))
    assert not (out / "model.safetensors").exists() and not (out / ADAPTER_DIR).exists()
    with pytest.raises(RecipeError, match="lora_modules_to_save: final_norm match"):
        build_trainer(lora_recipe(silu_base, out, "lora_modules_to_save=[final_norm]"))


def test_a_module_both_adapted_and_trained_in_full_is_refused():
    args = load_recipe(LORA_RECIPE, ["lora_target_modules=[up_proj, gate_proj]",
                                     "lora_modules_to_save=[gate_proj]"]).training
    with pytest.raises(RecipeError, match="gate_proj is in both"):
        lora_config(args, "llama")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA 4-bit loading needs a CUDA GPU")
def test_qlora_4bit_run_merges_into_an_unquantized_checkpoint(silu_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    recipe = lora_recipe(silu_base, out, "load_in_4bit=true", "use_cpu=false", "max_steps=2")
    assert train(recipe).steps == 2
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32 and not getattr(merged.config, "quantization_config", None)


# -- DeepSpeed ZeRO-2 ------------------------------------------------------------------------------
def test_zero2_launch_trains_adapters_then_shifts_the_threshold_of_the_merged_checkpoint(silu_base, tmp_path):
    pytest.importorskip("deepspeed")
    from test_train_deepspeed import check_run, launch

    out = tmp_path / "zero2"
    result = launch("zero2.yaml", silu_base, out, "--set", "use_peft=true", "--set", "lora_r=4",
                    "--set", "lora_alpha=8", "--set", "threshold_shift=true",
                    "--set", "threshold_max_ppl_increase=0.05")
    check_run(result, out)
    adapter = load_file(out / ADAPTER_DIR / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    config = json.loads((out / "config.json").read_text())
    assert config["relufy"]["training"]["lora"]["r"] == 4
    shift = config["relufy"]["threshold_shift"]
    assert shift["perplexity_after"] <= shift["perplexity_before"] * 1.05
    shutil.rmtree(out / "base-relu")  # the merged model stands alone
    register_activations()  # its fatrelu_<t>: this test must not rely on an earlier test having registered it
    AutoModelForCausalLM.from_pretrained(out)
