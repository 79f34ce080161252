"""experiments/prosparse-smollm2/run.py: the arms differ only in their regularisation, and every
command it would run is one relufy accepts (checked with --dry-run, nothing trained)."""

from __future__ import annotations

import json
import shlex

import pytest

from conftest import REPO, load_script
from relufy.recipe import load_recipe


@pytest.fixture(scope="module")
def driver():
    return load_script("experiments/prosparse-smollm2/run.py", "prosparse_smollm2_run")


def test_progressive_stages_scale_the_paper_shape(driver):
    stages = driver.progressive_stages(1800, 150, 5e-3)
    assert [s["end_step"] for s in stages] == [150, 315, 810, 975, 1635, 1800]
    assert [s["lambda"] for s in stages] == pytest.approx([0, 1.25e-4, 1.25e-3, 1.25e-3, 5e-3, 5e-3])


def test_progressive_stages_refuse_too_few_steps(driver):
    with pytest.raises(SystemExit, match="at least 10"):
        driver.progressive_stages(105, 100, 1e-2)


def dry_run(driver, capsys, tmp_path, *arms: str, flags: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """step name -> its command, as `run.py run --dry-run` prints them."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "train.txt.gz").write_bytes(b"")
    (corpus / "heldout.txt").write_text("held out\n")
    driver.main(["run", str(tmp_path / "out"), *arms, "--corpus", str(corpus), "--dry-run", *flags])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    return {line[3:].split(":", 1)[0]: shlex.split(line.split(": ", 1)[1]) for line in lines}


CPU = ["bf16=false", "use_cpu=true", "optim=adamw_torch"]  # the recipes' GPU settings, which a CPU refuses


def overrides(command: list[str]) -> list[str]:
    return [command[i + 1] for i, part in enumerate(command) if part == "--set"] + CPU


def test_trained_arms_share_everything_but_the_regularisation(driver, capsys, tmp_path):
    commands = dry_run(driver, capsys, tmp_path, "original", "relu", "prosparse", "fixed-l1",
                       flags=("--steps", "1800", "--stage0", "150", "--peak", "5e-3", "--lr", "3e-4",
                              "--scheduler", "warmup_stable_decay", "--liger"))
    assert list(commands) == ["original-eval", "relu", "relu-eval", "prosparse", "prosparse-noshift",
                              "prosparse-eval", "prosparse+shift-eval", "fixed-l1", "fixed-l1-eval"]
    recipes = {arm: load_recipe(REPO / commands[arm][4], overrides(commands[arm]))
               for arm in ("relu", "prosparse", "fixed-l1")}  # relufy itself validates every override
    for recipe in recipes.values():
        assert recipe.training.max_steps == 1800
        assert recipe.training.learning_rate == pytest.approx(3e-4)
        assert recipe.training.lr_scheduler_kwargs == {"num_decay_steps": 165, "min_lr_ratio": 0.1}
        assert recipe.training.use_liger_kernel
    assert recipes["relu"].schedule.lambda_at(1800) == 0
    assert recipes["prosparse"].schedule.lambda_at(1800) == pytest.approx(5e-3)
    assert recipes["fixed-l1"].schedule.lambda_at(151) == pytest.approx(5e-3)  # no warm-up, no rise
    assert recipes["prosparse"].schedule.lambda_at(151) < 5e-3
    assert recipes["prosparse"].training.threshold_shift and not recipes["fixed-l1"].training.threshold_shift
    # the unshifted evaluation is the trained weights converted back to plain ReLU
    assert commands["prosparse-noshift"][4:] == [str(tmp_path / "out" / "train" / "prosparse"),
                                                 str(tmp_path / "out" / "train" / "prosparse-noshift"),
                                                 "--activation", "relu", "--force"]


def test_lora_arm_trains_adapters_at_its_own_learning_rate(driver, capsys, tmp_path):
    commands = dry_run(driver, capsys, tmp_path, "prosparse-lora", flags=("--lora-lr", "7e-4", "--lora-rank", "8"))
    recipe = load_recipe(REPO / commands["prosparse-lora"][4], overrides(commands["prosparse-lora"]))
    assert recipe.training.use_peft and recipe.training.lora_r == 8
    assert recipe.training.learning_rate == pytest.approx(7e-4)


def test_silu_control_differs_from_relu_only_in_activation(driver, capsys, tmp_path):
    commands = dry_run(driver, capsys, tmp_path, "relu", "silu", flags=("--steps", "600", "--lr", "3e-4"))
    assert list(commands) == ["relu", "relu-eval", "silu", "silu-eval"]
    relu, silu = (dict(o.split("=", 1) for o in overrides(commands[arm])) for arm in ("relu", "silu"))
    assert {k for k in relu if relu[k] != silu.get(k)} == {"output_dir", "activation"}
    assert relu["activation"] == "relu" and silu["activation"] == "null"
    recipe = load_recipe(REPO / commands["silu"][4], overrides(commands["silu"]))
    assert recipe.model.activation is None and recipe.schedule.max_lambda == 0  # trains the SiLU model as is
    assert recipe.training.seed == load_recipe(REPO / commands["relu"][4], overrides(commands["relu"])).training.seed


def test_kd_arms_differ_from_their_arms_only_in_the_distillation(driver, capsys, tmp_path):
    commands = dry_run(driver, capsys, tmp_path, "relu", "relu-kd", "prosparse", "prosparse-kd",
                       flags=("--steps", "600", "--distill-alpha", "0.3", "--distill-temperature", "2"))
    assert list(commands) == ["relu", "relu-eval", "relu-kd", "relu-kd-eval", "prosparse", "prosparse-noshift",
                              "prosparse-eval", "prosparse+shift-eval", "prosparse-kd", "prosparse-kd-noshift",
                              "prosparse-kd-eval", "prosparse-kd+shift-eval"]
    for arm in ("relu", "prosparse"):
        plain, kd = (dict(o.split("=", 1) for o in overrides(commands[name])) for name in (arm, f"{arm}-kd"))
        assert {k for k in kd if kd[k] != plain.get(k)} == {"output_dir", "distill", "distill_alpha",
                                                            "distill_temperature"}
        assert commands[arm][4] == commands[f"{arm}-kd"][4]  # the same recipe
        recipe = load_recipe(REPO / commands[f"{arm}-kd"][4], overrides(commands[f"{arm}-kd"]))
        assert recipe.training.distill and recipe.training.distill_alpha == pytest.approx(0.3)
        assert recipe.training.distill_temperature == pytest.approx(2.0) and recipe.model.activation == "relu"


def test_token_budgets_give_each_budget_its_folder_steps_and_stage0(driver, capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    driver.main(["run", str(tmp_path / "out"), "relu", "prosparse", "--corpus", str(corpus), "--dry-run",
                 "--tokens", "10M,30M,90M", "--scheduler", "warmup_stable_decay", "--compile"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ") and ": " in line
             and not line.startswith("== budget")]
    commands = {line[3:].split(":", 1)[0]: shlex.split(line.split(": ", 1)[1]) for line in lines}
    per_budget = {}
    for budget, steps in (("10M", 610), ("30M", 1831), ("90M", 5493)):
        relu = dict(o.split("=", 1) for o in overrides(commands[f"{budget}/relu"]))
        prosparse = dict(o.split("=", 1) for o in overrides(commands[f"{budget}/prosparse"]))
        assert relu["max_steps"] == prosparse["max_steps"] == str(steps)
        assert relu["output_dir"] == str(tmp_path / "out" / budget / "train" / "relu")
        assert relu["torch_compile"] == "true" and relu["lr_scheduler_type"] == "warmup_stable_decay"
        # within a budget only the regularisation (and its shift) differ
        assert {k for k in relu if relu[k] != prosparse.get(k)} == {"output_dir", "stages", "threshold_shift"}
        per_budget[budget] = relu
    # across budgets only the budget (steps, and the decay that is a share of them) and the folder differ
    assert {k for k in per_budget["10M"] if per_budget["10M"][k] != per_budget["90M"][k]} == \
        {"output_dir", "max_steps", "stages", "lr_scheduler_kwargs"}


def test_grad_accum_keeps_the_tokens_per_step_in_smaller_micro_batches(driver, capsys, tmp_path):
    plain = dry_run(driver, capsys, tmp_path, "prosparse-kd", flags=("--tokens", "30M"))["30M/prosparse-kd"]
    split = dry_run(driver, capsys, tmp_path, "prosparse-kd", flags=("--tokens", "30M", "--batch", "4",
                                                                     "--grad-accum", "4"))["30M/prosparse-kd"]
    plain, split = (dict(o.split("=", 1) for o in overrides(command)) for command in (plain, split))
    assert "gradient_accumulation_steps" not in plain  # without the flag the commands are what they were
    assert {k for k in split if split[k] != plain.get(k)} == {"per_device_train_batch_size",
                                                              "gradient_accumulation_steps"}
    assert split["max_steps"] == plain["max_steps"] == "1831" and split["gradient_accumulation_steps"] == "4"


def test_matched_step_runs_relufy_matched_on_every_route(driver, capsys, tmp_path):
    driver.main(["matched", str(tmp_path / "out"), "--corpus", str(tmp_path), "--match-zero-ratio", "0.869",
                 "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    commands = {line[3:].split(":", 1)[0]: shlex.split(line.split(": ", 1)[1]) for line in lines}
    assert list(commands) == [f"{route}-{kind}" for route in ("relu", "silu", "original", "fixed-l1", "prosparse+shift",
                                                              "relu-kd", "prosparse-kd+shift")
                              for kind in ("matched", "curve")]
    from relufy.cli import build_parser

    for step, command in commands.items():
        args = build_parser().parse_args(command[3:])  # every command is one relufy accepts
        assert args.command == "matched" and args.output.endswith(step.rsplit("-", 1)[0] + (
            ".json" if step.endswith("matched") else "-curve.json"))
    relu = commands["relu-matched"]
    assert relu[relu.index("--target") + 1] == "0.869,0.9" and "--no-suite" in commands["relu-curve"]
    assert relu[relu.index("--threshold-on") + 1] == "activation" and f"{tmp_path}/out/matched/relu.json" in relu
    assert commands["prosparse+shift-matched"][4] == str(tmp_path / "out" / "train" / "prosparse")
    assert commands["prosparse-kd+shift-matched"][4] == str(tmp_path / "out" / "train" / "prosparse-kd")
    assert commands["relu-kd-matched"][4] == str(tmp_path / "out" / "train" / "relu-kd")


def test_matched_on_x1_writes_its_own_folder(driver, capsys, tmp_path):
    """Thresholds on x1 and on the activation are different models: their JSONs never share a folder."""
    driver.main(["matched", str(tmp_path / "out"), "relu", "--corpus", str(tmp_path), "--match-zero-ratio", "0.869",
                 "--threshold-on", "x1", "--dry-run"])
    command = shlex.split(capsys.readouterr().out.splitlines()[0].split(": ", 1)[1])
    assert command[command.index("--threshold-on") + 1] == "x1"
    assert command[command.index("-o") + 1] == str(tmp_path / "out" / "matched-x1" / "relu.json")


def test_matched_matches_the_kd_arm_when_it_is_the_only_prosparse_arm(driver, capsys, tmp_path):
    evaluation = tmp_path / "out" / "eval" / "prosparse-kd+shift"
    evaluation.mkdir(parents=True)
    (evaluation / "results.json").write_text(json.dumps({"sparsity": {"overall": 0.8812345}}))
    driver.main(["matched", str(tmp_path / "out"), "relu-kd", "--corpus", str(tmp_path), "--dry-run"])
    command = shlex.split(capsys.readouterr().out.splitlines()[0].split(": ", 1)[1])
    assert command[command.index("--target") + 1] == "0.8812,0.9"


def test_collect_lists_kd_arms_in_definition_order_and_skips_relufys_lock_files(driver, tmp_path):
    evaluations = tmp_path / "out" / "eval"
    for name in ("prosparse-kd+shift", "relu-kd", "prosparse-kd", "relu"):
        (evaluations / name).mkdir(parents=True)
        (evaluations / name / "results.json").write_text(json.dumps({
            "lm_eval": {"results": {}}, "sparsity": {"overall": 0.5}, "scores": {"average": 40.0}}))
        (evaluations / f".{name}.relufy-lock").write_text("")  # what `relufy evaluate --force` leaves beside it
        (evaluations / name / ".speed.json.relufy-lock").write_text("")  # and `relufy speed --output` in it
        (evaluations / name / ".speed.json.relufy-lock.pid").write_text("{}")  # its holder, while speed runs
    driver.main(["collect", str(tmp_path / "out"), str(tmp_path / "dest")])
    header = (tmp_path / "dest" / "compare.md").read_text().splitlines()[0]
    assert header == "| | relu | relu-kd | prosparse-kd | prosparse-kd+shift |"
    assert [path.name for path in (tmp_path / "dest" / "relu").iterdir()] == ["results.json"]


def test_collect_puts_a_deployed_routes_published_card_and_config_beside_its_numbers(driver, tmp_path):
    """A card is made again only with the checkpoint's config: the published one goes beside model-card.md, and
    the card is the one published last (it replaces any stale model-card.md in the evaluation folder)."""
    name = "prosparse-kd+shift-layers90"
    evaluation, published = tmp_path / "out" / "eval" / name, tmp_path / "out" / "publish" / name
    for folder in (evaluation, published):
        folder.mkdir(parents=True)
    (evaluation / "results.json").write_text(json.dumps({
        "lm_eval": {"results": {}}, "sparsity": {"overall": 0.9}, "scores": {"average": 40.0}}))
    (evaluation / "model-card.md").write_text("# a stale card\n")
    (published / "README.md").write_text("# the card published last\n")
    (published / "config.json").write_text(json.dumps({"hidden_act": "fatrelu", "relufy": {"activation": "fatrelu"}}))
    driver.main(["collect", str(tmp_path / "out"), str(tmp_path / "dest")])
    collected = tmp_path / "dest" / name
    assert (collected / "model-card.md").read_text() == "# the card published last\n"
    assert (collected / "config.json").read_text() == (published / "config.json").read_text()


def test_collect_merges_arms_collected_from_separate_runs(driver, tmp_path):
    """Arms trained on machines that are gone by now collect into one DEST: its tables list every arm and
    route collected so far, its timings keep every run's rows, its settings every run's arms and its logs
    every run's steps."""
    for run, arm in (("one", "relu"), ("two", "prosparse-kd")):
        out = tmp_path / run
        (out / "eval" / arm).mkdir(parents=True)
        (out / "eval" / arm / "results.json").write_text(json.dumps({
            "lm_eval": {"results": {}}, "sparsity": {"overall": 0.5}, "scores": {"average": 40.0}}))
        (out / "timings.tsv").write_text(f"{arm}\tcommand\t1\n")
        (out / "settings.json").write_text(json.dumps({arm: {"lr": 1}}))
        (out / "logs").mkdir()
        (out / "logs" / f"{arm}.log").write_text(f"{arm} trained\n")
        driver.main(["collect", str(out), str(tmp_path / "dest")])
    dest = tmp_path / "dest"
    assert sorted(path.name for path in (dest / "logs").iterdir()) == ["prosparse-kd.log", "relu.log"]
    assert (dest / "compare.md").read_text().splitlines()[0] == "| | relu | prosparse-kd |"
    assert [row.split("\t")[0] for row in (dest / "timings.tsv").read_text().splitlines()] == ["relu", "prosparse-kd"]
    assert set(json.loads((dest / "settings.json").read_text())) == {"relu", "prosparse-kd"}


def test_tables_writes_a_collected_folders_tables_again_and_touches_nothing_else(driver, tmp_path):
    dest = tmp_path / "dest"
    (dest / "relu").mkdir(parents=True)
    harness = {"results": {"relufy_dictionary": {"acc_norm,none": 0.5}},
               "n-samples": {"relufy_dictionary": {"effective": 101}}}
    (dest / "relu" / "results.json").write_text(json.dumps({
        "lm_eval": harness, "sparsity": {"overall": 0.5}, "scores": {"offline": 50.0},
        "settings": {"groups": {"offline": ["relufy_dictionary"]}}}))
    (dest / "compare.md").write_text("| an older table |\n")
    driver.main(["tables", str(dest)])
    assert "| group: offline | 50.00 ± 5.00 |" in (dest / "compare.md").read_text()  # sqrt(0.25 / 100)
    assert sorted(path.name for path in dest.iterdir() if not path.name.startswith(".")) == ["compare.md", "relu"]


@pytest.fixture(scope="module")
def plots():
    return load_script("experiments/prosparse-smollm2/plots.py", "prosparse_smollm2_plots")


def test_fit_trend_finds_slope_and_crossing(plots):
    fit = plots.fit_trend([1e7, 1e8, 1e9], [1.45, 1.35, 1.25])
    assert fit["slope_per_decade"] == pytest.approx(-0.1)
    assert fit["tokens_at_goal"] == pytest.approx(10 ** 11, rel=1e-6) and fit["monotonic_decrease"]
    assert plots.fit_trend([1e7, 1e8], [1.3, 1.4])["tokens_at_goal"] is None


def test_figures_read_collected_runs(plots, tmp_path):
    def route(zeros: float, ppl: float) -> dict:
        return {"dense": {"zero_ratio": zeros, "ppl": ppl},
                "targets": [{"target": t, "zero_ratio": t, "ppl": ppl * (1 + t)} for t in (0.869, 0.9)]}

    (tmp_path / "matched").mkdir()
    for name, result in (("relu", route(0.6, 20)), ("silu", route(0.0, 18)), ("silu-curve", route(0.0, 18)),
                         ("relu-kd", route(0.6, 19))):
        (tmp_path / "matched" / f"{name}.json").write_text(json.dumps(result))
    assert plots.route_points(tmp_path, "silu") == [(0.0, 18), (0.869, 18 * 1.869), (0.9, 18 * 1.9)]
    plots.matched_figure(tmp_path, tmp_path / "matched.png")
    other = tmp_path / "peak2e-3"
    (other / "matched").mkdir(parents=True)
    (other / "matched" / "relu-kd.json").write_text(json.dumps(route(0.7, 17)))
    assert [name for name, _, _ in plots.matched_series(tmp_path, "matched", (("2e-3", other),))] == [
        "relu", "relu-kd", "silu", "relu-kd (2e-3)"]
    plots.matched_figure(tmp_path, tmp_path / "both.png", also=(("2e-3", other),))
    with pytest.raises(SystemExit, match="holds no route's JSON"):  # a mistyped --also DIR
        plots.matched_series(tmp_path, "matched", (("typo", tmp_path / "nowhere"),))
    runs = []
    for steps, ratio, kd_ratio in ((610, 1.5, 1.3), (1831, 1.4, 1.15), (5493, 1.3, None)):
        run = tmp_path / str(steps)
        arms = {"relu": 20.0, "prosparse+shift": 20.0 * ratio}
        if kd_ratio:  # the KD arms ran at two budgets only
            arms.update({"relu-kd": 18.0, "prosparse-kd+shift": 18.0 * kd_ratio})
        for arm, ppl in arms.items():
            (run / arm).mkdir(parents=True)
            (run / arm / "results.json").write_text(json.dumps({
                "ppl_p_sparsity": {"1": {"ppl_dense": ppl}}, "sparsity": {"overall": 0.5}, "scores": {"average": 50}}))
        (run / "settings.json").write_text(json.dumps({"prosparse": {"steps": steps, "batch": 16, "block": 1024}}))
        runs.append(run)
    summary = plots.tokens_figure(runs, tmp_path / "tokens.png")
    assert [row["ppl_ratio"] for row in summary["points"]] == pytest.approx([1.5, 1.4, 1.3])
    assert summary["slope_per_decade"] < 0 and summary["tokens_at_goal"] > 5493 * 16 * 1024
    assert [row["ppl_ratio"] for row in summary["kd"]["points"]] == pytest.approx([1.3, 1.15])
    assert summary["kd"]["slope_per_decade"] < summary["slope_per_decade"]  # KD's ratio falls faster here
    written = json.loads((tmp_path / "tokens.json").read_text())
    assert written["monotonic_decrease"] and written["kd"]["label"] == "ProSparse-KD / ReLU-KD"
    for png in ("matched.png", "both.png", "tokens.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def side_by_side(driver, monkeypatch, tmp_path, arms: tuple[str, ...], failing: str | None = None):
    """`run.py run ... --jobs N` with every child command replaced: a trained arm's command waits until all
    arms' training commands have started (a barrier that only side-by-side arms can pass) and writes its
    config.json, or fails for the arm `failing`. Returns the steps run, in order."""
    import threading

    trained = [arm for arm in arms if driver.ARMS[arm].recipe is not None]
    barrier, steps = threading.Barrier(len(trained), timeout=60), []

    def call(runner, step, command):
        steps.append(step)
        if step in trained:
            barrier.wait()  # BrokenBarrierError (the test fails) unless the arms train at the same time
            if step == failing:
                raise SystemExit(f"{step} failed (exit 1)")
            (runner.out / "train" / step).mkdir(parents=True)
            (runner.out / "train" / step / "config.json").write_text("{}")

    monkeypatch.setattr(driver.Runner, "__call__", call)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    driver.main(["run", str(tmp_path / "out"), *arms, "--corpus", str(corpus), "--jobs", str(len(arms))])
    return steps


def test_jobs_train_arms_side_by_side_and_evaluate_each_after_its_training(driver, monkeypatch, tmp_path):
    steps = side_by_side(driver, monkeypatch, tmp_path, ("relu", "silu", "prosparse"))
    assert sorted(steps) == sorted(["relu", "relu-eval", "silu", "silu-eval", "prosparse", "prosparse-noshift",
                                    "prosparse-eval", "prosparse+shift-eval"])
    for arm, after in (("relu", "relu-eval"), ("silu", "silu-eval"), ("prosparse", "prosparse+shift-eval")):
        assert steps.index(arm) < steps.index(after)


def test_a_failing_arm_side_by_side_lets_the_others_finish_then_fails_the_run(driver, monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"^silu: silu failed \(exit 1\)$"):
        side_by_side(driver, monkeypatch, tmp_path, ("relu", "silu"), failing="silu")
    assert (tmp_path / "out" / "train" / "relu" / "config.json").exists()


def test_jobs_below_one_are_refused(driver, capsys, tmp_path):
    with pytest.raises(SystemExit):
        driver.main(["run", str(tmp_path / "out"), "relu", "--jobs", "0"])
    assert "--jobs 0: pass 1 or more" in capsys.readouterr().err


def test_deploy_ships_the_matched_thresholds_of_the_route_and_checks_them_on_the_gpu(driver, capsys, tmp_path):
    """The checkpoint gets the per-layer thresholds `matched` found for this route at --target, and every later
    step (evaluation, token check, decode timing, card) reads that checkpoint and writes where `collect` looks."""
    driver.main(["deploy", str(tmp_path / "out"), "prosparse-kd+shift", "--corpus", str(tmp_path), "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    commands = {line[3:].split(":", 1)[0]: shlex.split(line.split(": ", 1)[1]) for line in lines}
    name = "prosparse-kd+shift-layers90"
    assert list(commands) == [f"{name}-{step}" for step in ("convert", "eval", "tokens", "speed", "publish")]
    out = tmp_path / "out"
    convert = commands[f"{name}-convert"]
    assert convert[4:6] == [str(out / "train" / "prosparse-kd"), str(out / "train" / name)]
    assert convert[convert.index("--layer-thresholds") + 1] == str(out / "matched" / "prosparse-kd+shift.json")
    assert convert[convert.index("--matched-target") + 1] == "0.9"
    for step in ("eval", "speed", "publish"):
        assert commands[f"{name}-{step}"][4] == str(out / "train" / name)
    tokens, speed = commands[f"{name}-tokens"], commands[f"{name}-speed"]
    assert tokens[tokens.index("--device") + 1] == "cuda" and tokens[tokens.index("--dtype") + 1] == "bfloat16"
    assert tokens[tokens.index("--output") + 1] == str(out / "eval" / name / "check_tokens.json")
    assert speed[speed.index("--output") + 1] == str(out / "eval" / name / "speed.json") and "--profile-steps" in speed
    assert speed[speed.index("--batch-sizes") + 1] == "1,4"  # 16 tokens would run the dense FFN in both arms
    publish = commands[f"{name}-publish"]  # the card quotes the speed just measured, not evaluate's short look
    assert publish[publish.index("--speed") + 1] == str(out / "eval" / name / "speed.json")


def test_deploy_needs_the_routes_matched_thresholds(driver, tmp_path):
    with pytest.raises(SystemExit, match=r"relu\.json does not exist: run `run\.py matched .* relu` first"):
        driver.main(["deploy", str(tmp_path / "out"), "relu", "--corpus", str(tmp_path)])


def test_arms_side_by_side_skip_evaluate_s_decode_timing(driver, capsys, tmp_path):
    """With --jobs above 1 the arms share the GPU, so evaluate's short decode timing would time them all."""
    alone = dry_run(driver, capsys, tmp_path, "original", "prosparse")
    shared = dry_run(driver, capsys, tmp_path, "original", "prosparse", flags=("--jobs", "2"))
    evaluations = ("original-eval", "prosparse-eval", "prosparse+shift-eval")
    assert not any("--no-speed" in alone[step] for step in evaluations)
    assert all(shared[step][-1] == "--no-speed" for step in evaluations)
