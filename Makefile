# Every target that runs code creates the project's own virtualenv first (.venv),
# and reinstalls the project into it whenever setup.py or pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help run test test-fast stress lint format bench bench-peers bench-quality venv clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create .venv and install the project with its test, serve, demo and lint extras

$(STAMP): setup.py pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test,serve,demo,lint]'
	@touch $(STAMP)

run: $(STAMP) ## Run the main job on the embedded default (builtin model, bundled demo data)
	$(BIN)/imgindex demo --output runs/demo

test: $(STAMP) ## Run the test suite (all but the full-size attack suite, see stress)
	$(BIN)/python -m pytest -q -m "not stress" tests

test-fast: $(STAMP) ## The edit-test loop: every test not marked slow (under a minute)
	$(BIN)/python -m pytest -q -m "not slow and not stress" tests

stress: $(STAMP) ## The attack suite at full size (slow)
	$(BIN)/python -m pytest -q -m stress tests

lint: $(STAMP) ## ruff (lint and format check) over the code, mypy over retrieval/ and serving/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## Run the benchmarks and print their results (see BENCHMARKS.md)
	$(BIN)/python -m benchmarks.run_all

bench-peers: $(STAMP) ## Index vs ScaNN autopilot, faiss, hnswlib (installs the bench extra; ~40 min)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test,serve,demo,lint,bench]'
	$(BIN)/python -m benchmarks.peers --dataset both

bench-quality: $(STAMP) ## Retrieval quality end to end on ../shared/data: mAP, recall per k, latency, plot (~1 h)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test,serve,demo,lint,bench]'
	$(BIN)/python -m benchmarks.quality

clean: ## Remove the virtualenv and local run outputs
	rm -rf $(VENV) runs .pytest_cache
