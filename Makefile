# Every target that runs code creates the project's own virtualenv first (.venv),
# and reinstalls the project into it whenever setup.py changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help run test bench bench-peers venv clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create .venv and install the project with its test, serve and demo extras

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test,serve,demo]'
	@touch $(STAMP)

run: $(STAMP) ## Run the main job on the embedded default (builtin model, bundled demo data)
	$(BIN)/imgindex demo --output runs/demo

test: $(STAMP) ## Run the test suite
	$(BIN)/python -m pytest -q tests

bench: $(STAMP) ## Run the benchmarks and print their results (see BENCHMARKS.md)
	$(BIN)/python -m benchmarks.run_all

bench-peers: $(STAMP) ## Index vs ScaNN autopilot, faiss, hnswlib (installs the bench extra; ~40 min)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test,serve,demo,bench]'
	$(BIN)/python -m benchmarks.peers --dataset both

clean: ## Remove the virtualenv and local run outputs
	rm -rf $(VENV) runs .pytest_cache
