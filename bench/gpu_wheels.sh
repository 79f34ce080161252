#!/usr/bin/env bash
# Collect, into .whl/, the wheels the GPU machine lacks (it has torch, transformers, accelerate, peft,
# pyarrow, pandas, scikit-learn, sacrebleu, tensorboard; not these). Python 3.12, x86-64.
# Two subsets fit one call's 64 MiB carry limit next to other files:
#   .whl-train/  datasets + deepspeed (and pydantic) + liger-kernel for training and bench/gpu_issue3.sh
#   .whl-eval/   datasets + lm-eval for evaluation and bench/gpu_issue5.sh (no deepspeed, no zstandard)
# On the device: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl-train/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
binary=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson einops lm-eval==0.4.13 evaluate==0.4.6
        more-itertools jsonlines pytablewriter dataproperty mbstrdecoder pathvalidate tabledata tcolorpy typepy
        chardet nltk zstandard gguf pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection liger-kernel==0.8.5)
for spec in "${binary[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$spec"
done
# sdist-only packages: build pure-Python wheels here
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 sqlitedict rouge-score word2number
rm -rf .whl-train .whl-eval
mkdir -p .whl-train .whl-eval
for name in datasets dill multiprocess hjson deepspeed pydantic-2 pydantic_core annotated_types typing_inspection gguf einops liger_kernel; do
  cp .whl/${name}*.whl .whl-train/
done
cp .whl/*.whl .whl-eval/
rm .whl-eval/{deepspeed,pydantic,annotated_types,typing_inspection,hjson,zstandard}*
for dir in .whl-train .whl-eval; do grep -qx "/$dir/" .git/info/exclude || echo "/$dir/" >> .git/info/exclude; done
du -sh .whl .whl-train .whl-eval
