# Two commands work on a fresh clone with only Python 3.11: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default (it is on disk here); override for a CUDA box, e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# make test runs the suite in this many processes (pytest-xdist), whole files per process (module fixtures once).
TEST_WORKERS ?= 2

.PHONY: install run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/dflashtrain $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun
