"""The two places where relufy reaches into lm-eval's internals, because lm-eval 0.4.13 has no hook for them.

Each swaps one module-level name of lm-eval for the length of a `with` block and puts it back after.
So they rely on lm-eval calling those names through its module's globals, and they are not
thread-safe (relufy runs one evaluation per process). Upgrading lm-eval means checking both
against its source; `tests/test_evaluate.py` fails if either stops working (padding counted as
tokens, or git's "not a git repository" printed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


@contextlib.contextmanager
def padding_recorded(record: Callable[[torch.Tensor], None]):
    """While active, each batch HFLM's loglikelihood path pads reports its real-token mask (batch x length,
    True where a token is real) to `record`, just before the model sees the batch.

    Why: the probe must not count padding as tokens. For a causal model, `HFLM._loglikelihood_tokens`
    right-pads each batch with `pad_and_concat` and calls the model with the padded ids alone
    (`_model_call(inps)`, no attention mask); the true lengths stay local to that method and no
    overridable method sees them before the forward (`_select_cont_toks` sees them after it).
    Generation needs none of this: it passes an attention mask, which the probe's pre-hook reads.
    Relies on: `_loglikelihood_tokens` calling `lm_eval.models.huggingface.pad_and_concat(max_length,
    tensors, padding_side=...)` once per batch of a causal model, right before that batch's forward.
    """
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
        record(mask)
        return original(max_length, tensors, padding_side=padding_side)

    hf.pad_and_concat = pad_and_concat
    try:
        yield
    finally:
        hf.pad_and_concat = original


@contextlib.contextmanager
def without_environment_report():
    """While active, `simple_evaluate` skips the git hash of the current directory and torch's environment report.

    Why: the git hash runs `git`, which prints "fatal: not a git repository" outside a checkout, and
    the environment report (`torch.utils.collect_env`) costs seconds per task; relufy keeps neither
    in its results. `simple_evaluate` has no switch for them. `lm_eval.evaluate` skips both, but
    calling it would mean copying `simple_evaluate`'s seeding and few-shot rules, which are what
    keep `relufy evaluate` and `lm_eval --tasks` running the same thing.
    Relies on: `simple_evaluate` calling `get_git_commit_hash()` and `add_env_info(results)` as names
    of `lm_eval.evaluator`.
    """
    import lm_eval.evaluator as evaluator

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda storage: None)
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved
