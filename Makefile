# mess-ai: one install step shared by every target, so .venv/bin/mess-ai exists after any of them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch is on this kind of machine's disk; on a GPU host set TORCH_SPEC=torch (or a CUDA wheel).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo clean

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

clean:
	rm -rf $(VENV) .demo .pytest_cache
