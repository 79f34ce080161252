"""Copy the small files of a bench/reproduce_prosparse.sh run into a docs/results/ folder.

    python bench/collect_reproduction.py RUN_DIR DEST [--suffix peak5e-3]

RUN_DIR is one OUT_DIR of reproduce_prosparse.sh (e.g. /tmp/repro/NAME from gpu_issue5.sh's repro.tgz).
Each arm becomes DEST/<name>: its evaluation (results.json, report.md, plots), the training log
(trainer_state.json, training_curves.png) and relufy_provenance.json (the `relufy` section of its
config.json). The ProSparse arm before the shift is `prosparse-SUFFIX`, after it `prosparse+shift-SUFFIX`;
fixed-l1 is `fixed-l1-SUFFIX`. Logs are copied as <name>.log and timings.tsv lines are appended.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# arm folder in RUN_DIR -> (name in DEST, folder whose training log belongs to it)
ARMS = {"original": ("original", None), "relu": ("relu", "relu"), "prosparse-noshift": ("prosparse", "prosparse"),
        "prosparse": ("prosparse+shift", "prosparse"), "fixed-l1": ("fixed-l1", "fixed-l1")}
LOGS = {"relu": "relu", "prosparse": "prosparse", "fixed-l1": "fixed-l1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--suffix", default="", help="appended to the ProSparse and fixed-l1 names, e.g. peak5e-3")
    args = parser.parse_args()
    suffixed = lambda name: f"{name}-{args.suffix}" if args.suffix and name not in ("original", "relu") else name

    for arm, (name, trained) in ARMS.items():
        source = args.run_dir / arm
        if not (source / "eval" / "results.json").exists():
            continue
        target = args.dest / suffixed(name)
        target.mkdir(parents=True, exist_ok=True)
        for path in (source / "eval").iterdir():
            shutil.copy2(path, target / path.name)
        if trained:
            for file in ("trainer_state.json", "training_curves.png"):
                shutil.copy2(args.run_dir / trained / file, target / file)
        config = source / "config.json"
        if config.exists():
            provenance = json.loads(config.read_text()).get("relufy", {})
            (target / "relufy_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        print(f"{source} -> {target}")
    for arm, name in LOGS.items():
        if (args.run_dir / f"{arm}.log").exists():
            shutil.copy2(args.run_dir / f"{arm}.log", args.dest / f"{suffixed(name)}.log")
    timings = args.run_dir / "timings.tsv"
    if timings.exists():
        with open(args.dest / "timings.tsv", "a") as out:
            out.write(timings.read_text())


if __name__ == "__main__":
    main()
