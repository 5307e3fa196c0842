# Everything the README's quick start needs, from a fresh clone.
#   make run    set up, then run the main job: `gradsurg compare` on the embedded default suite
#   make test   set up, then run the whole test suite: pytest, ruff, mypy, strict docs build
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, pinned; the package itself only asks for a range.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.gradsurg-installed

.PHONY: setup run quick test pytest lint typecheck docs docs-serve bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/gradsurg compare

quick: setup
	HF_HUB_OFFLINE=1 $(BIN)/gradsurg compare --quick --out gradsurg-runs/quick

test: setup pytest lint typecheck docs

pytest: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check gradsurg tests examples benchmarks

typecheck: setup
	$(BIN)/mypy

docs: setup
	$(BIN)/mkdocs build --strict --quiet

docs-serve: setup
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) site build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
