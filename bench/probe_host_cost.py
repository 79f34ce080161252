"""Host-side cost of the sparsity probe's L1 tap: a forward + backward with and without it, on a model
so narrow that kernel time is negligible and what remains is Python and dispatch per layer.

    python bench/probe_host_cost.py          # CPU is fine; prints microseconds per layer and the ratio
    python bench/probe_host_cost.py --layers 2 --steps 5 --json out.json   # smoke run

This is the part of the L1 term that shows when a GPU step is host-bound (the 135M shape in
docs/training.md), which the GPU profile does not see.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch


def median_step_s(layers: int, tap: bool, steps: int) -> float:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from relufy.probe import SparsityProbe
    from relufy.timing import Timer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, hidden_act="relu")
    model = AutoModelForCausalLM.from_config(config).train()
    probe = SparsityProbe.for_training(model, count_zeros=False).attach() if tap else None
    ids = torch.randint(0, 256, (1, 8))
    times = []
    for _ in range(steps):
        timer = Timer().start()
        loss = model(input_ids=ids, labels=ids).loss
        if probe is not None:
            loss = loss + 1e-3 * probe.pop_l1()
        loss.backward()
        times.append(timer.stop())
    return statistics.median(times[steps // 5:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", type=Path, help="write both rounds here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = []
    for _ in range(2):
        plain, tapped = median_step_s(args.layers, False, args.steps), median_step_s(args.layers, True, args.steps)
        rounds.append({"plain_s": plain, "tapped_s": tapped, "ratio": tapped / plain,
                       "host_cost_us_per_layer": (tapped - plain) / args.layers * 1e6})
        print(f"plain {plain * 1e3:.2f} ms  with L1 tap {tapped * 1e3:.2f} ms  ratio {tapped / plain:.3f}  "
              f"host cost {(tapped - plain) / args.layers * 1e6:.0f} us per layer")
    if args.json:
        from relufy.atomic import write_json_atomically

        write_json_atomically(args.json, {"layers": args.layers, "steps": args.steps, "rounds": rounds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
