#!/usr/bin/env bash
# Issue 3/6 performance runs on the lent GPU machine: the L1 term's step-time overhead (full and
# LoRA training) and the plain Trainer's MFU on the ~1B config, each a bench/ script run in one
# process. Carry .whl-train/ (datasets, deepspeed, ... from bench/gpu_wheels.sh).
#
#   bash bench/gpu_issue3.sh [SECTION ...]    # sections: check overhead overhead-liger overhead-135m
#                                           overhead-135m-liger overhead-135m-compile mfu mfu-liger
#                                           mfu-compile lora profile profile-liger
#                                           (default: check overhead mfu lora)
#
# Logs and JSON results land in $OUT (or bench/out when $OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [[ ! -d /tmp/site/deepspeed ]]; then  # (a gpu_issue5.sh call may have filled /tmp/site without deepspeed)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-train/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
FIVE_ALTERNATIONS=(--order plain prosparse plain prosparse plain prosparse plain prosparse plain prosparse)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
sections=("$@")
[[ ${#sections[@]} -gt 0 ]] || sections=(check overhead mfu lora)
for section in "${sections[@]}"; do
  echo "== $section"
  case $section in
    check)    # the compiled L1 backward equals the eager expression (tests/test_train.py runs it where CUDA exists)
      python3 -m pytest -q tests/test_train.py -k "l1_tap or compiled or liger" -p no:cacheprovider -rs ;;
    overhead) # L1 step-time ratio, fp32 master weights + bf16 autocast as the recipes train
      python3 bench/train_overhead.py --steps 30 --warmup 5 --json "$OUT/overhead.json" ;;
    overhead-liger)  # the same with Liger's kernels (the plain step gets faster, the L1 term's cost stays)
      python3 bench/train_overhead.py --liger --steps 30 --warmup 5 --json "$OUT/overhead-liger.json"
      python3 bench/train_overhead.py --model llama-1b --liger --batch-size 8 --steps 20 --warmup 5 \
        --json "$OUT/overhead-liger-1b-b8.json" ;;
    overhead-135m)  # the host-bound 135M shape alone, five alternations, to see past its noise
      python3 bench/train_overhead.py --model smollm2-135m --steps 30 --warmup 5 "${FIVE_ALTERNATIONS[@]}" \
        --json "$OUT/overhead-135m-x5.json" ;;
    overhead-135m-compile)  # the same compiled (torch_compile=True): less host work per step, the L1 fused by Inductor
      python3 bench/train_overhead.py --model smollm2-135m --compile --steps 30 --warmup 5 \
        --order plain prosparse --json "$OUT/overhead-135m-compile.json" ;;
    overhead-135m-liger)  # the same with Liger's kernels
      python3 bench/train_overhead.py --model smollm2-135m --liger --steps 30 --warmup 5 "${FIVE_ALTERNATIONS[@]}" \
        --json "$OUT/overhead-135m-liger-x5.json" ;;
    mfu)      # the 1B config in bf16 weights, at two batch sizes
      python3 bench/train_overhead.py --model llama-1b --dtype bfloat16 --steps 20 --warmup 5 --json "$OUT/mfu-bf16-b4.json"
      python3 bench/train_overhead.py --model llama-1b --dtype bfloat16 --batch-size 8 --steps 20 --warmup 5 \
        --json "$OUT/mfu-bf16-b8.json" ;;
    mfu-liger)    # the same with Liger's RMSNorm, RoPE and fused linear cross-entropy (no logits in memory)
      for batch in 8 16; do
        python3 bench/train_overhead.py --model llama-1b --dtype bfloat16 --batch-size $batch --liger --steps 20 --warmup 5 \
          --order plain prosparse plain prosparse --json "$OUT/mfu-liger-b$batch.json"
      done ;;
    mfu-compile)  # the same with torch_compile=True (compiling the 1B model takes minutes: give it its own call)
      python3 bench/train_overhead.py --model llama-1b --dtype bfloat16 --batch-size 8 --compile --steps 20 --warmup 5 \
        --order plain prosparse --json "$OUT/mfu-compile.json" ;;
    lora)     # LoRA peak memory / full and the L1 overhead in LoRA mode
      python3 bench/lora_vs_full.py --json "$OUT/lora_vs_full.json" ;;
    profile)  # where the GPU time of a regularized step goes
      python3 bench/train_overhead.py --model smollm2-135m --steps 6 --warmup 3 --order plain prosparse --profile ;;
    profile-liger)  # the same with Liger's kernels
      python3 bench/train_overhead.py --model smollm2-135m --liger --steps 6 --warmup 3 --order plain prosparse --profile ;;
    *) echo "unknown section $section" >&2; exit 2 ;;
  esac
done
