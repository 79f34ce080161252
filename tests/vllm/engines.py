"""Greedy continuations (and log-probabilities) of a tiny checkpoint from vLLM's engine and from transformers."""

import gc
import json
import subprocess
import sys
from pathlib import Path

PROMPTS = ["The quick brown fox", "Once upon a time"]
NEW_TOKENS = 12


def prompt_ids(folder) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]


def transformers_greedy(folder) -> list[list[int]]:
    """Greedy continuations from transformers (the reference), loaded by relufy (its activations registered,
    per-layer thresholds set)."""
    import torch

    from relufy.checkpoint import load_model

    model = load_model(folder, dtype="float32").eval()
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids(folder):
            generated = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                       min_new_tokens=NEW_TOKENS, pad_token_id=0)
            outputs.append(generated[0, len(ids):].tolist())
    return outputs


# Two engines' float32 log-probabilities of one token differ by up to ~2e-3 on a GPU (vLLM's Triton
# attention multiplies in TF32): a greedy choice closer than this is a tie either engine may break.
TIE = 5e-3


def assert_same_greedy(folder, tokens) -> None:
    """Each of vLLM's greedy `tokens` is transformers' greedy choice after vLLM's own prefix, or a rounding
    tie with it: within TIE of the best token in transformers' float32 log-probabilities, at every step.

    One transformers forward over prompt + vLLM's tokens checks every step (no prefix is left out after a
    tie). A wrong FFN moves log-probabilities by far more than TIE.
    """
    import torch

    from relufy.checkpoint import load_model

    model = load_model(folder, dtype="float32").eval()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for ids, got in zip(prompt_ids(folder), tokens):
        assert len(got) == NEW_TOKENS, got
        with torch.no_grad():
            logprobs = model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].log_softmax(-1)
        logprobs[:, eos] = -float("inf")  # both engines generate NEW_TOKENS with end-of-sequence held back
        gaps = logprobs.max(-1).values - logprobs.gather(-1, torch.tensor(got)[:, None])[:, 0]
        step = int(gaps.argmax())
        assert gaps[step] <= TIE, (f"vLLM chose {got[step]} at step {step}, {gaps[step]:.2e} below transformers' "
                                   f"{int(logprobs[step].argmax())}")


def transformers_logprobs(folder, sequences) -> list[list[float]]:
    """The log-probability transformers (float32) gives each token of each sequence after the first."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([sequence])).logits[0, :-1].log_softmax(-1)
                .gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0].tolist() for sequence in sequences]


def run_engine(folder, work, inspect=None, **engine_args):
    """(work(llm), inspect(model) or None) from vLLM's LLM on `folder`, float32 unless engine_args say
    otherwise; the engine is freed after."""
    from vllm import LLM

    engine_args = {"dtype": "float32", **engine_args}
    llm = LLM(str(folder), max_model_len=64, max_num_seqs=2, seed=0, gpu_memory_utilization=0.05, **engine_args)
    try:
        seen = llm.apply_model(inspect)[0] if inspect else None
        return work(llm), seen
    finally:
        del llm
        gc.collect()


def greedy(llm, folder) -> list[list[int]]:
    """The engine's greedy continuations of PROMPTS."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0)
    results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids(folder)], params)
    return [list(result.outputs[0].token_ids) for result in results]


def logprobs(llm, sequences) -> list[list[float]]:
    """The log-probability the engine gives each token of each sequence after the first."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in sequences], params)
    return [[entry[token].logprob for token, entry in zip(sequence[1:], result.prompt_logprobs[1:])]
            for sequence, result in zip(sequences, results)]


def vllm_greedy(folder, inspect=None, **engine_args):
    """(greedy continuations of PROMPTS, inspect(model) or None) from vLLM."""
    return run_engine(folder, lambda llm: greedy(llm, folder), inspect, **engine_args)


def vllm_logprobs(folder, sequences, inspect=None, **engine_args):
    """(log-probability vLLM gives each token of each sequence after the first, inspect(model) or None)."""
    return run_engine(folder, lambda llm: logprobs(llm, sequences), inspect, **engine_args)


def vllm_greedy_in_fresh_process(folder, **engine_args) -> list[list[int]]:
    """vllm_greedy's continuations from a new process.

    vLLM's Transformers backend (model_impl="transformers") decorates transformers' model classes in
    place, after which transformers cannot build those models outside a vLLM config: run it apart.
    """
    here = Path(__file__).resolve().parent
    code = (f"import json, sys; sys.path[:0] = {[str(here), str(here.parent)]!r}\n"
            "from engines import vllm_greedy\n"
            f"print('TOKENS', json.dumps(vllm_greedy({str(folder)!r}, **{engine_args!r})[0]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("TOKENS ")][-1][7:])
