# Two commands on a fresh clone:  `make demo` (the main job on sample_data/)  and  `make test`.
# Both build the virtual environment .venv/ from the project's own files first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.segcal-installed

.PHONY: demo test bench env clean

env: $(STAMP)

# torch is installed first and pinned to the CPU build that these machines keep on disk: a bare `torch`
# requirement would pull a multi-GB CUDA build (docs: engineering.md). Users with a GPU install their own.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo_out
