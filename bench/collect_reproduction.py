"""Copy the small files of a bench/reproduce_prosparse.sh run into a docs/results/ folder.

    python bench/collect_reproduction.py RUN_DIR DEST [--tag wsd] [--suffix peak5e-3]

RUN_DIR is one OUT_DIR of reproduce_prosparse.sh (e.g. /tmp/repro/NAME from gpu_issue5.sh's repro.tgz).
Each arm becomes DEST/<name>: its evaluation (results.json, report.md, plots), the training log
(trainer_state.json, training_curves.png) and relufy_provenance.json (the `relufy` section of its
config.json). The ProSparse arm before the shift is `prosparse-SUFFIX`, after it `prosparse+shift-SUFFIX`;
fixed-l1 is `fixed-l1-SUFFIX`; a TAG goes before the suffix of every trained arm (`relu-wsd`,
`prosparse-wsd-peak5e-3`). Logs are copied as <name>.log and timings.tsv lines are appended under the same names.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# arm folder in RUN_DIR -> (name in DEST, folder whose training log belongs to it)
ARMS = {"original": ("original", None), "relu": ("relu", "relu"), "prosparse-noshift": ("prosparse", "prosparse"),
        "prosparse": ("prosparse+shift", "prosparse"), "fixed-l1": ("fixed-l1", "fixed-l1")}
TRAINED = sorted({trained for _, trained in ARMS.values() if trained})  # each has a training log, <arm>.log
NAMES = sorted({name for name, _ in ARMS.values()}, key=len, reverse=True)  # longest first, for prefix matching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--tag", default="", help="appended to every trained arm's name, e.g. wsd")
    parser.add_argument("--suffix", default="", help="appended to the ProSparse and fixed-l1 names, e.g. peak5e-3")
    args = parser.parse_args()

    def suffixed(name: str) -> str:
        if name == "original":
            return name
        tagged = f"{name}-{args.tag}" if args.tag else name
        return f"{tagged}-{args.suffix}" if args.suffix and name != "relu" else tagged

    for arm, (name, trained) in ARMS.items():
        source = args.run_dir / arm
        if not (source / "eval" / "results.json").exists():
            continue
        target = args.dest / suffixed(name)
        target.mkdir(parents=True, exist_ok=True)
        for path in (source / "eval").iterdir():
            if not path.name.startswith("samples_"):  # per-example records stay in the run's archive
                shutil.copy2(path, target / path.name)
        if trained:
            for file in ("trainer_state.json", "training_curves.png"):
                shutil.copy2(args.run_dir / trained / file, target / file)
        config = source / "config.json"
        if config.exists():
            provenance = json.loads(config.read_text()).get("relufy", {})
            (target / "relufy_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        print(f"{source} -> {target}")
    for arm in TRAINED:
        if (args.run_dir / f"{arm}.log").exists():
            shutil.copy2(args.run_dir / f"{arm}.log", args.dest / f"{suffixed(arm)}.log")
    timings = args.run_dir / "timings.tsv"
    if timings.exists():
        with open(args.dest / "timings.tsv", "a") as out:
            for line in timings.read_text().splitlines():
                step, rest = line.split("\t", 1)  # e.g. prosparse+shift-eval: named after the DEST arm
                arm = next(name for name in NAMES if step.startswith(name))
                out.write(f"{suffixed(arm)}{step[len(arm):]}\t{rest}\n")


if __name__ == "__main__":
    main()
