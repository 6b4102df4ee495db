# mess-ai: one install step shared by every target, so .venv/bin/mess-ai exists after any of them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch is on this kind of machine's disk; on a GPU host set TORCH_SPEC=torch (or a CUDA wheel).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo bench soak server deploy worker watch e2e-scale clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/mess-ai demo --workdir .demo

# Benchmarks (bench/): figures into bench/results and docs/benchmarks.md.
bench: install
	$(BIN)/python -m bench

# Long fault-injection runs (repeated SIGKILLs and the like); figures into docs/reliability.md.
soak: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -m soak tests/reliability $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .demo .pytest_cache
