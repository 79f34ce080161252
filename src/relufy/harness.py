"""lm-eval with the probe attached: a plan's tasks, one at a time, on a model loaded once.

The model is handed to lm-eval's `HFLM`; `simple_evaluate` runs one task at a time while a
`SparsityProbe` records the zero-ratio of x1 (ProSparse Table 8 style: sparsity depends on the
data). Padding tokens are left out of the counts: generation passes an attention mask, and the
right padding of loglikelihood batches is recorded where lm-eval pads them
(`lm_eval_patches.padding_recorded`, which says why no hook of HFLM would do).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .lm_eval_patches import padding_recorded, without_environment_report
from .probe import SparsityProbe
from .suites import EvalPlan, SuiteOptions

logger = logging.getLogger(__name__)


class TokenMasks:
    """Tells the probe which positions of each forward are real tokens (not padding)."""

    def __init__(self, probe: SparsityProbe):
        self.probe = probe
        self.pending: torch.Tensor | None = None  # the mask of the batch lm-eval padded last

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
    def recording_padding(self):
        """While active, the mask of each loglikelihood batch lm-eval pads becomes `pending`."""
        try:
            with padding_recorded(self._record):
                yield
        finally:
            self.pending = None

    def _record(self, mask: torch.Tensor) -> None:
        self.pending = mask


def probed_lm(model, tokenizer, probe: SparsityProbe, *, batch_size: int, max_length: int | None):
    """An HFLM around the loaded model whose forwards report their real-token mask to the probe
    (inside `lm.token_masks.attached()`)."""
    from lm_eval.models.huggingface import HFLM

    masks = TokenMasks(probe)

    class ProbedLM(HFLM):
        def _loglikelihood_tokens(self, *args, **kwargs):
            with masks.recording_padding():
                return super()._loglikelihood_tokens(*args, **kwargs)

    lm = ProbedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=str(next(model.parameters()).device))
    lm.token_masks = masks
    return lm


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
    probe = SparsityProbe.for_measurement(model)
    quiet_lm_eval_logs()
    lm = probed_lm(model, tokenizer, probe, batch_size=options.batch_size, max_length=options.max_length)
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
            out = evaluate_task(lm, name, shots, manager, options)
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


def evaluate_task(lm, name: str, shots: int | None, manager, options: SuiteOptions) -> dict:
    """lm-eval's `simple_evaluate` on one task or group, its results as plain JSON (without its configs)."""
    from lm_eval import simple_evaluate

    with without_environment_report():
        out = simple_evaluate(model=lm, tasks=[name], num_fewshot=shots, limit=options.limit, task_manager=manager,
                              log_samples=options.log_samples, bootstrap_iters=0,
                              confirm_run_unsafe_code=options.confirm_run_unsafe_code, verbosity="WARNING")
    return json.loads(json.dumps({k: v for k, v in (out or {}).items() if k != "config" and k != "configs"},
                                 default=str))


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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
