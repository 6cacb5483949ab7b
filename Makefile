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

.PHONY: setup round test test-slow clean-venv

setup: $(STAMP)

# torch first, from the CPU build on local disk (pip; uv/poetry would fetch CUDA builds), then the
# project with its test extra. The stamp makes this run once per change of pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

round: setup
	$(SCOPE) prepare $(RUN_ARGS)
	@if $(SCOPE) --help | grep -q ' round '; then \
		$(SCOPE) round $(N) $(RUN_ARGS); \
	else \
		echo "prepared runs/$(RUN); the stage commands (generate, verify, prm-score, locate-error,"; \
		echo "rectify, train-step, eval) and 'scope round' are not built yet: nothing more to run."; \
	fi

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
