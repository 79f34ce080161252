"""The dense baselines' down projection: W_down row-major, as an unconverted model holds it, against the
transposed view of a row-major W_down^T, as a sparsified model holds it.

`sparsify` keeps one copy of W_down, as W_down^T row-major (what the kernels read), and gives
`down_proj.weight` a transposed view of it. So every dense arm relufy times runs that layout: `relufy
speed`'s and bench/decode_speed.py's (the sparsified model with its kernels off), bench/sparse_ffn.py's (its
dense FFN multiplies by the same view), and a sparsified model's own prefill. Same values, another cuBLAS
kernel. This times the down projection F.linear(x1, W_down) both ways and the whole dense FFN (gate, up,
ReLU, product, down) both ways, at each --tokens count, in one process: CUDA-graph replays of one pass over
--layers FFNs (so one FFN's weights are not in L2 for the next), the median over --rounds rounds with the
order of the two layouts swapped every round. A ratio above 1 means the view is slower than the row-major
weight, and a sparse/dense ratio timed against the view flatters the sparse arm by that much.

    python bench/down_layout.py --output bench/out/down_layout.json
    python bench/down_layout.py --shapes smollm2-135m --tokens 1,4,16
    python bench/down_layout.py --tiny --output /tmp/down_layout.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

SHAPES = {"smollm2-135m": (576, 1536), "llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336), "tiny": (64, 256)}
LAYOUTS = ("row_major", "transposed_view")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2-135m,llama2-7b,llama3-8b",
                        help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--tokens", default="1,4,16,64,512,2048", help="tokens per call, comma-separated")
    parser.add_argument("--layers", type=int, default=8, help="FFNs one timed pass goes over")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replays", type=int, default=20, help="graph replays per layout and round")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny shape, 2 layers, 1 round")
    parser.add_argument("--output", type=Path, help="write the measurement here as JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes, args.tokens, args.layers, args.rounds, args.replays = "tiny", "1,4", 2, 1, 2
    unknown = [name for name in args.shapes.split(",") if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}: pass some of {', '.join(SHAPES)}")
    if not all(part.isdigit() and int(part) > 0 for part in args.tokens.split(",")):
        parser.error(f"--tokens {args.tokens}: pass positive whole numbers, comma-separated, e.g. 1,4,16")
    return args


def ffn_weights(hidden: int, inter: int, layers: int, dtype, device) -> list[dict]:
    """Per layer: W_gate, W_up, and W_down in both layouts (the same values)."""
    import torch

    def random(rows, cols):
        return (torch.randn(rows, cols, device=device) * cols ** -0.5).to(dtype)

    result = []
    for _ in range(layers):
        down = random(hidden, inter)
        result.append({"gate": random(inter, hidden), "up": random(inter, hidden),
                       "row_major": down, "transposed_view": down.t().contiguous().t()})
    return result


def passes(weights: list[dict], hidden: int, inter: int, tokens: int, dtype, device) -> tuple[dict, float]:
    """For each layout: one pass of the down projections alone, and one of the whole dense FFNs; and the largest
    difference between the two layouts' down projections (summation order only: the values are the same)."""
    import torch
    from torch.nn.functional import linear

    x = torch.randn(tokens, hidden, device=device).to(dtype)
    x1 = torch.randn(tokens, inter, device=device).to(dtype)

    def down_pass(layout):
        return lambda: [linear(x1, w[layout]) for w in weights]

    def ffn_pass(layout):
        return lambda: [linear(torch.relu(linear(x, w["gate"])) * linear(x, w["up"]), w[layout]) for w in weights]

    difference = max(float((linear(x1, w["row_major"]).float() - linear(x1, w["transposed_view"]).float())
                           .abs().max()) for w in weights)
    return {"down": {layout: down_pass(layout) for layout in LAYOUTS},
            "ffn": {layout: ffn_pass(layout) for layout in LAYOUTS}}, difference


def measure_case(weights, hidden, inter, tokens, args, dtype, device) -> dict:
    """Microseconds per FFN of each part and layout, alternated over rounds, and their ratio."""
    from relufy.timing import median_seconds

    parts, difference = passes(weights, hidden, inter, tokens, dtype, device)
    row = {"tokens": tokens, "down_max_abs_difference": difference}
    for part, by_layout in parts.items():
        samples = {layout: [] for layout in LAYOUTS}
        for round_index in range(args.rounds):
            order = LAYOUTS if round_index % 2 == 0 else LAYOUTS[::-1]
            for layout in order:
                seconds = median_seconds(by_layout[layout], device, args.replays)
                samples[layout].append(1e6 * seconds / len(weights))
        medians = {layout: statistics.median(values) for layout, values in samples.items()}
        row[part] = {**{f"{layout}_us": medians[layout] for layout in LAYOUTS},
                     "view_over_row_major": medians["transposed_view"] / medians["row_major"]}
    return row


def table(result: dict) -> str:
    lines = ["| shape | tokens | down: row-major us | down: view us | view / row-major | FFN: row-major us "
             "| FFN: view us | view / row-major |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shape in result["shapes"]:
        for row in shape["rows"]:
            down, ffn = row["down"], row["ffn"]
            lines.append(f"| {shape['shape']} | {row['tokens']} | {down['row_major_us']:.2f} | "
                         f"{down['transposed_view_us']:.2f} | {down['view_over_row_major']:.3f} | "
                         f"{ffn['row_major_us']:.2f} | {ffn['transposed_view_us']:.2f} | "
                         f"{ffn['view_over_row_major']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from relufy.speed import environment

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("this times cuBLAS on a GPU; without one, run the --tiny smoke run")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shapes = []
    for name in args.shapes.split(","):
        hidden, inter = SHAPES[name]
        weights = ffn_weights(hidden, inter, args.layers, dtype, device)
        rows = [measure_case(weights, hidden, inter, int(tokens), args, dtype, device)
                for tokens in args.tokens.split(",")]
        shapes.append({"shape": name, "hidden": hidden, "intermediate": inter, "rows": rows})
        del weights
    result = {**environment(device), "dtype": str(dtype).removeprefix("torch."),
              "config": {key: getattr(args, key) for key in ("layers", "rounds", "replays")}, "shapes": shapes}
    print(table(result))
    if args.output:
        from relufy.atomic import write_json_atomically

        write_json_atomically(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
