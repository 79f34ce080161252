"""Evaluation: lm-eval accuracy with the sparsity reached on each task, plus PPL-p% sparsity.

The model is loaded once and handed to lm-eval's `HFLM`; `simple_evaluate` runs one task at a
time while a `SparsityProbe` records the zero-ratio of x1 (ProSparse Table 8 style: sparsity
depends on the data). Padding tokens are left out of the counts: right padding of lm-eval's
loglikelihood batches is reconstructed from the lengths it pads, and generation uses the
attention mask. Then `cett.ppl_p_sparsity` measures PPL-p% sparsity on held-out text.
Writes DIR/results.json, DIR/report.md and PNG plots (atomically: temp dir, then rename).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_directory
from .cett import DEFAULT_PS, ppl_p_sparsity
from .errors import DataError, OutputExistsError, RelufyError
from .paths import project_file
from .probe import SparsityProbe
from .report import evaluation_report, group_averages, plot_per_layer_sparsity, plot_sparsity_vs_p

logger = logging.getLogger(__name__)

_REPO_TASKS = project_file("evaluate/tasks")
DEFAULT_HELDOUT = _REPO_TASKS / "data" / "heldout.jsonl"

# ProSparse Table 1 benchmark groups (docs/method.md, section 6) as lm-eval task names and few-shot counts.
PROSPARSE_SUITE: dict[str, dict[str, int | None]] = {
    "code": {"humaneval": 0, "mbpp": 3},
    "commonsense": {"piqa": 0, "social_iqa": 0, "hellaswag": 0, "winogrande": 0, "copa": 0},
    "reading": {"boolq": 0, "lambada_openai": 0, "tydiqa_goldp_en": 1},
    "gsm8k": {"gsm8k": 8},
    "mmlu": {"mmlu": 5},
    "bbh": {"bbh_fewshot": 3},
    "agieval": {"agieval_en": 0},
}
OFFLINE_SUITE: dict[str, dict[str, int | None]] = {  # None: the task's own default (0-shot)
    "offline": {"relufy_heldout": None, "relufy_lastword": None, "relufy_dictionary": None},
}
SUITES: dict[str, dict[str, dict[str, int | None]]] = {"prosparse": PROSPARSE_SUITE, "offline": OFFLINE_SUITE}


def tasks_dir() -> Path:
    """relufy's own lm-eval task folder (the `--include_path` for lm-eval)."""
    return _REPO_TASKS


@dataclass
class EvalPlan:
    """What to run: lm-eval task names with few-shot counts, and the benchmark groups they form."""

    tasks: dict[str, int | None]
    groups: dict[str, list[str]] = field(default_factory=dict)


def make_plan(tasks: list[str] | None, suite: str | None, num_fewshot: int | None = None) -> EvalPlan:
    """Tasks from `--tasks` and/or `--suite` (default: the offline suite)."""
    if suite is not None and suite not in SUITES:
        raise DataError(f"unknown suite '{suite}'; choose one of: {', '.join(SUITES)}")
    plan = EvalPlan(tasks={})
    if suite or not tasks:
        for group, members in SUITES[suite or "offline"].items():
            plan.groups[group] = list(members)
            for name, shots in members.items():
                plan.tasks[name] = shots if num_fewshot is None else num_fewshot
    for name in tasks or []:
        plan.tasks[name] = num_fewshot
    return plan


def check_task_names(names: list[str], task_manager) -> None:
    """Fail before loading the model when a task name is unknown, listing close matches."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else "; list tasks with `lm_eval ls tasks`"
            raise DataError(f"unknown lm-eval task '{name}'{hint}")


def task_manager(names: list[str], include_path: list[Path] | None = None):
    """An lm-eval TaskManager that knows `names`: relufy's own tasks only when that is enough (indexing
    all of lm-eval's tasks takes seconds), else lm-eval's as well. Unknown names raise DataError."""
    paths = tuple(str(p) for p in [tasks_dir(), *(include_path or [])])
    manager = _manager(paths, include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = _manager(paths, include_defaults=True)
    check_task_names(names, manager)
    return manager


@functools.lru_cache(maxsize=4)
def _manager(include_path: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path), include_defaults=include_defaults)


class _TokenMasks:
    """Tells the probe which positions of each forward are real tokens (not padding)."""

    def __init__(self, probe: SparsityProbe):
        self.probe = probe
        self.pending: torch.Tensor | None = None

    @contextlib.contextmanager
    def attached(self):
        """While active, every forward of the probed model sets the probe's token mask first."""
        handle = self.probe.model.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            self.probe.token_mask = None

    def before_forward(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        mask = None
        if input_ids is not None and attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask[:, -input_ids.shape[1]:].bool()
        elif input_ids is not None and self.pending is not None and self.pending.shape == input_ids.shape:
            mask = self.pending.to(input_ids.device)
        self.probe.token_mask = mask

    @contextlib.contextmanager
    def record_padding(self):
        """Wrap lm-eval's `pad_and_concat` so the true lengths of a padded batch are known."""
        import lm_eval.models.huggingface as hf

        original = hf.pad_and_concat

        def pad_and_concat(max_length, tensors, padding_side="right"):
            mask = torch.zeros(len(tensors), max_length, dtype=torch.bool)
            for row, tensor in enumerate(tensors):
                length = tensor.shape[-1]
                if padding_side == "right":
                    mask[row, :length] = True
                else:
                    mask[row, max_length - length:] = True
            self.pending = mask
            return original(max_length, tensors, padding_side=padding_side)

        hf.pad_and_concat = pad_and_concat
        try:
            yield
        finally:
            hf.pad_and_concat = original
            self.pending = None


def _probed_lm(model, tokenizer, probe: SparsityProbe, *, batch_size: int, max_length: int | None):
    """An HFLM around the loaded model whose forwards report their real-token mask to the probe
    (inside `lm.token_masks.attached()`)."""
    from lm_eval.models.huggingface import HFLM

    masks = _TokenMasks(probe)

    class ProbedLM(HFLM):
        def _loglikelihood_tokens(self, *args, **kwargs):
            with masks.record_padding():
                return super()._loglikelihood_tokens(*args, **kwargs)

    lm = ProbedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=str(next(model.parameters()).device))
    lm.token_masks = masks
    return lm


@dataclass
class SuiteOptions:
    """How lm-eval runs the tasks: examples per task, batch and context, code execution, per-example records."""

    limit: float | None = None
    batch_size: int = 1
    max_length: int | None = None
    confirm_run_unsafe_code: bool = False
    log_samples: bool = False


@dataclass
class SuiteRun:
    """lm-eval's merged results over the tasks, and the zero-ratio of x1 the probe saw on their real tokens."""

    harness: dict
    per_task: dict[str, dict]
    per_layer: list[float]
    tokens: int
    samples: dict[str, list]

    def sparsity(self) -> dict:
        return {"overall": _mean(self.per_layer), "per_layer": self.per_layer, "per_task": self.per_task,
                "tokens": self.tokens}


def run_suite(model, tokenizer, plan: EvalPlan, manager, options: SuiteOptions) -> SuiteRun:
    """Run the plan's tasks one at a time on a loaded model while a probe counts the zeros of x1.

    The probe attaches last, so it counts what reaches the down projections: a caller that has
    already hooked them (`relufy matched`'s thresholds) gets the sparsity of its thresholded model.
    """
    probe = SparsityProbe(model)
    quiet_lm_eval_logs()
    lm = _probed_lm(model, tokenizer, probe, batch_size=options.batch_size, max_length=options.max_length)
    harness: dict = {"results": {}, "groups": {}, "n-shot": {}, "versions": {}, "n-samples": {},
                     "higher_is_better": {}, "group_subtasks": {}}
    per_task: dict[str, dict] = {}
    samples: dict[str, list] = {}
    totals = [[0.0, 0] for _ in range(probe.num_layers)]
    bar = tqdm(desc="lm-eval tasks", unit="task", total=len(plan.tasks))
    with bar, probe, lm.token_masks.attached():  # the bar is closed on errors too, not left for exit
        for name, shots in plan.tasks.items():
            bar.set_description(f"lm-eval task {name}")
            probe.reset()
            logger.info("lm-eval task %s (%s-shot)", name, "default" if shots is None else shots)
            out = _simple_evaluate(lm, name, shots, options.limit, manager, options.confirm_run_unsafe_code,
                                   options.log_samples)
            samples.update(out.pop("samples", None) or {})
            for key in harness:
                harness[key].update(out.get(key) or {})
            per_task[name] = probe.summary()
            for total, counts in zip(totals, probe.layers):
                total[0] += float(counts.zeros)
                total[1] += counts.elements
            bar.update(1)
    per_layer = [zeros / elements if elements else float("nan") for zeros, elements in totals]
    return SuiteRun(harness, per_task, per_layer, sum(entry["tokens"] for entry in per_task.values()), samples)


def heldout_blocks(spec: str | Path, tokenizer, *, block_size: int, max_tokens: int) -> torch.Tensor:
    """Held-out text packed into (blocks x block_size) token ids, at most `max_tokens` tokens."""
    from .data import load_text_dataset, pack_blocks

    path = Path(spec)
    if path.is_file() and not path.read_text(errors="replace").strip():
        raise DataError(f"held-out text '{spec}' is empty; pass a file with text to --heldout")
    blocks = pack_blocks(load_text_dataset(str(spec)), tokenizer, block_size)
    count = min(len(blocks), max(1, max_tokens // block_size))
    if len(blocks) == 0:
        raise DataError(f"held-out text '{spec}' is shorter than one block of {block_size} tokens; "
                        "add text or lower --block-size")
    return torch.tensor(blocks[:count]["input_ids"], dtype=torch.long)


def evaluate_model(model_src: str, output: str | Path, *, tasks: list[str] | None = None,
                   suite: str | None = None, num_fewshot: int | None = None, limit: float | None = None,
                   batch_size: int = 1, device: str = "cpu", dtype: str = "auto", ps=DEFAULT_PS,
                   heldout: str | Path = DEFAULT_HELDOUT, heldout_tokens: int = 2048, block_size: int = 256,
                   max_length: int | None = None, include_path: list[Path] | None = None,
                   confirm_run_unsafe_code: bool = False, trust_remote_code: bool = False,
                   log_samples: bool = False, speed: bool = True, force: bool = False) -> dict:
    """Run lm-eval + probe + PPL-p% on one model and write results.json, report.md and plots to `output`.

    `limit` is lm-eval's (examples per task, or a fraction); an empty `ps` skips PPL-p% sparsity;
    `log_samples` also writes lm-eval's per-example records to samples_<task>.jsonl; `speed` adds a
    short dense-vs-sparse decode measurement (`relufy speed`'s) when the model runs on CUDA.
    """
    from .checkpoint import load_model, load_tokenizer, model_identity, resolve_source

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise OutputExistsError(f"{output} exists and is not an empty directory; pass --force to replace it")
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and not limit > 0:
        raise DataError(f"--limit must be > 0: examples per task (e.g. 40) or a fraction below 1 (e.g. 0.1), "
                        f"got {limit:g}")
    ps = [float(p) for p in ps or ()]
    if any(not p > 0 for p in ps):
        raise DataError(f"every p must be > 0 (a perplexity rise in percent), got {ps}")
    if heldout_tokens < block_size:
        raise DataError(f"--heldout-tokens ({heldout_tokens}) must be at least --block-size ({block_size})")
    plan = make_plan(tasks, suite, num_fewshot)
    manager = task_manager(list(plan.tasks), include_path)

    source = resolve_source(model_src)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    blocks = heldout_blocks(heldout, tokenizer, block_size=block_size, max_tokens=heldout_tokens) if ps else None
    model = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()

    suite = run_suite(model, tokenizer, plan, manager, SuiteOptions(
        limit=limit, batch_size=batch_size, max_length=max_length,
        confirm_run_unsafe_code=confirm_run_unsafe_code, log_samples=log_samples))

    ppl = {"results": {}, "forward_passes": 0, "tokens": 0}
    if ps:
        ppl = ppl_p_sparsity(model, blocks.to(device), ps=ps, batch_size=max(1, batch_size), progress=True)
    results = {  # names, not local paths: results and the cards made from them are meant for sharing
        "model": model_name(source),
        "model_name": model_name(source),
        "activation": activation_name(model),
        "identity": model_identity(source, activation_name(model)),
        "relufy_version": __version__,
        "lm_eval": suite.harness,
        "scores": group_averages(suite.harness, plan.groups),
        "sparsity": suite.sparsity(),
        "ppl_p_sparsity": ppl["results"],
        "ppl_p_forward_passes": ppl["forward_passes"],
        "heldout": {"source": _data_name(heldout), "tokens": ppl["tokens"], "block_size": block_size},
        "tokens_evaluated": suite.tokens + ppl["tokens"],
        "settings": {"tasks": plan.tasks, "groups": plan.groups, "limit": limit, "batch_size": batch_size,
                     "dtype": dtype, "device": device},
    }
    if speed and torch.device(device).type == "cuda":
        measured = _decode_speed(model)
        if measured is not None:
            results["speed"] = measured
    _write_outputs(output, results, suite.samples, force=force)
    return results


def _decode_speed(model) -> dict | None:
    """`relufy speed` with small settings and no torch.compile: a quick look (`relufy speed` is the full
    measurement). It runs last: `sparsify` hands the FFNs to the sparse kernels, and lm-eval and PPL-p%
    have measured the model as loaded. A model the decode loop cannot drive (another attention
    implementation, say) leaves the section out with a warning rather than failing the evaluation."""
    from .sparse import sparsify
    from .speed import SpeedConfig, measure_speed

    device = next(model.parameters()).device
    config = SpeedConfig(batch_sizes=(1,), prompt_tokens=32, new_tokens=64, generate_tokens=32, compile=False,
                         dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=str(device))
    try:
        return measure_speed(sparsify(model), config)
    except RelufyError as exc:
        logger.warning("decode speed not measured: %s", exc)
        return None


class _QuietLmEval(logging.Filter):
    """Drop lm-eval warnings that relufy's own use always triggers and that mean nothing here: the per-task hint
    about `--metadata` of custom_dataset tasks, and the warning that HFLM got a loaded model instead of a name
    (relufy loads the model once, on purpose)."""

    HARMLESS = ("Custom kwargs can be passed", "`pretrained` model kwarg is not of type `str`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.HARMLESS)


def quiet_lm_eval_logs() -> None:
    for name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
        task_logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLmEval) for f in task_logger.filters):
            task_logger.addFilter(_QuietLmEval())


@contextlib.contextmanager
def _without_environment_report():
    """lm-eval adds the current directory's git hash (running `git`, which prints 'fatal: not a git repository'
    outside a checkout) and torch's environment report (`pip list`, seconds per task) to results relufy does not
    keep: skip both."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda storage: None)
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


def _simple_evaluate(lm, name: str, shots: int | None, limit, manager, unsafe: bool, log_samples: bool) -> dict:
    from lm_eval import simple_evaluate

    with _without_environment_report():
        out = simple_evaluate(model=lm, tasks=[name], num_fewshot=shots, limit=limit, task_manager=manager,
                              log_samples=log_samples, bootstrap_iters=0, confirm_run_unsafe_code=unsafe,
                              verbosity="WARNING")
    return json.loads(json.dumps({k: v for k, v in (out or {}).items() if k != "config" and k != "configs"},
                                 default=str))


def _write_outputs(output: Path, results: dict, samples: dict[str, list], *, force: bool) -> None:
    """results.json, report.md, plots and samples_<task>.jsonl into a temp sibling, renamed over `output` at the end."""
    with atomic_directory(output, replace=force) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        for task, records in samples.items():
            (tmp / f"samples_{task}.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        plots = {"per_layer": "sparsity_per_layer.png", "vs_p": "sparsity_vs_p.png"}
        plot_per_layer_sparsity(results, tmp / plots["per_layer"])
        plot_sparsity_vs_p(results, tmp / plots["vs_p"])
        (tmp / "report.md").write_text(evaluation_report(results, plots) + "\n")


def _data_name(spec: str | Path) -> str:
    """relufy's own held-out file by its place in the project, a local file by its name, a datasets name as is."""
    path = Path(spec)
    if path.resolve() == DEFAULT_HELDOUT.resolve():
        return "evaluate/tasks/data/heldout.jsonl"
    return path.name if path.exists() else str(spec)


def model_name(source) -> str:
    """The hub id, GGUF file stem or folder name a results file calls the model by."""
    if source.hub_id:
        return source.hub_id
    return Path(source.gguf_file).stem if source.gguf_file else Path(source.path).name


def activation_name(model) -> str:
    """The FFN activation as the model's config names it (silu, relu, fatrelu_0.01, ...)."""
    from .architectures import architecture_of

    return str(architecture_of(model.config).activation_of(model.config))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
