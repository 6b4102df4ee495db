# mess-ai: one install step shared by every target, so .venv/bin/mess-ai exists after any of them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch is on this kind of machine's disk; on a GPU host set TORCH_SPEC=torch (or a CUDA wheel).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Extras installed with mess-ai (pyproject.toml). An extraction worker needs none of them: on such a host,
# `make install EXTRAS=gpu` (add postgres for a shared manifest) leaves out the analysis stack and the test tools.
EXTRAS ?= dev,analysis,export
# make test runs the suite in 2 processes (pytest-xdist): much of it waits on servers, schedules and child
# processes, so 2 halve its time on a 2-core machine. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

.PHONY: install test demo bench soak soak-nightly server deploy worker watch serve e2e-scale clean

# Operations (see docs/operations.md). The server listens on loopback only; the paths are defaults for one machine.
HOST ?= 127.0.0.1
PORT ?= 4200
API  ?= http://$(HOST):$(PORT)/api
export MESS_AI_INCOMING ?= $(CURDIR)/data/incoming
export MESS_AI_STORE    ?= $(CURDIR)/data/store
export MESS_AI_MODEL    ?= m-a-p/MERT-v1-95M
export MESS_AI_TIMEZONE ?= UTC
export MESS_AI_NIGHTLY_CRON ?= 0 2 * * *
export MESS_AI_HEARTBEAT_SECONDS ?= 60
export MESS_AI_ZOMBIE_SECONDS ?= 180
# Where the server POSTs a message when a run fails or crashes, or files fail in it; empty: no notifications.
export MESS_AI_NOTIFY_URL ?=
export MESS_AI_CODE_DIR ?= $(CURDIR)
# The manifest's URL for the flow runs of `make worker` and `make serve`, read from their environment (never a
# deployment parameter: Prefect would store the password); empty: SQLite in the store. `make deploy` ignores it.
export MESS_AI_MANIFEST_URL ?=
POOL ?= mess-ai-process
# Flow runs a worker takes at once: a GPU host should not grab every shard of a scaled-out run.
WORKER_LIMIT ?= 2

install: $(VENV)/.installed

# constraints.txt: what Prefect's server needs beyond what Prefect itself declares (reasons in the file).
# torch goes in with pip, which finds the CPU build on this kind of machine's disk (pip's find-links); the rest with
# uv (from PyPI, into the same venv): ~35 s where pip took ~2 min. Bytecode is compiled at install (pip does, uv with
# --compile-bytecode): where PYTHONDONTWRITEBYTECODE is set, as on these machines, a module without it is compiled
# again by every process that imports it. INSTALLER=pip: pip for everything.
INSTALLER ?= uv
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
ifeq ($(INSTALLER),uv)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[$(EXTRAS)]'
else
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
endif
	touch $@

test: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

demo: install
	$(BIN)/mess-ai demo --workdir .demo

# Benchmarks (bench/): figures into bench/results and docs/benchmarks.md.
bench: install
	$(BIN)/python -m bench

# Long fault-injection runs (repeated SIGKILLs and the like); figures into docs/reliability.md.
soak: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -m soak tests/reliability tests/test_kill.py $(PYTEST_ARGS)

# A compressed month of scheduled nights (30, every 20 s) with workers killed and the server restarted (~15 min).
soak-nightly: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -m soak_nightly tests/reliability/test_soak_nightly.py $(PYTEST_ARGS)

# A Prefect server on SQLite (in ~/.prefect unless PREFECT_HOME says otherwise), UI at http://$(HOST):$(PORT).
# Concurrency leases (the `gpu` limit's slots) are kept on disk, not in the server's memory: a slot held when the
# server dies is then expired after a restart instead of staying taken forever (docs/reliability.md).
# A run waiting for a busy GPU limit asks again when the server says (Retry-After): by default the slots' average
# hold time times the requests denied so far, up to 30 s (x 1.3 jitter), so the GPU idled up to 39 s after each
# hand-over between runs. 5 s bounds that at 6.5 s, for one request every 5 s per waiting run.
SERVER_ENV = PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem \
	PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS=5
# The UI is told where the API is (PREFECT_UI_API_URL): without it, it looks for the API on port 4200 whatever PORT
# is. PREFECT_UI_URL: the links in notifications.
server: install
	$(SERVER_ENV) PREFECT_UI_API_URL=$(API) PREFECT_UI_URL=http://$(HOST):$(PORT) $(BIN)/prefect server start --host $(HOST) --port $(PORT)

# Every deployment of prefect.yaml on a process work pool (run `make worker` to execute them).
deploy: install
	mkdir -p "$(MESS_AI_INCOMING)" "$(MESS_AI_STORE)"
	PREFECT_API_URL=$(API) $(BIN)/prefect work-pool create $(POOL) --type process --overwrite
	PREFECT_API_URL=$(API) $(BIN)/prefect --no-prompt deploy --all
	PREFECT_API_URL=$(API) $(BIN)/python -m deployments.automations
	@echo "The prefect CLI needs to be told where this server is: export PREFECT_API_URL=$(API)"

worker: install
	PREFECT_API_URL=$(API) $(BIN)/prefect worker start --pool $(POOL) --limit $(WORKER_LIMIT)

# Or, on one machine without a worker: every deployment served from one process.
serve: install
	PREFECT_API_URL=$(API) PREFECT_FLOWS_HEARTBEAT_FREQUENCY=$(MESS_AI_HEARTBEAT_SECONDS) $(BIN)/mess-ai serve

watch: install
	mkdir -p "$(MESS_AI_INCOMING)"
	PREFECT_API_URL=$(API) $(BIN)/mess-ai watch "$(MESS_AI_INCOMING)" --store "$(MESS_AI_STORE)"

# Scale-out check (not in CI): PostgreSQL from Debian packages, two workers, one folder.
e2e-scale: install
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(EXTRAS),postgres]'
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -m e2e_scale tests/test_scale_out.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .demo .pytest_cache
