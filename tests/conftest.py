"""Session-wide test setup: no network, no analytics, and one tiny MERT-format checkpoint on disk."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub or prefect: tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's options default to these (`make test` exports the Makefile's values, data/store among them): a test
# names its store and model, or sets the variable itself.
for _variable in ("MESS_AI_STORE", "MESS_AI_INCOMING", "MESS_AI_MODEL", "MESS_AI_MANIFEST_URL"):
    os.environ.pop(_variable, None)
# The weights' digest cache of the tests' own checkpoints stays out of the user's ~/.cache.
if "MESS_AI_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["MESS_AI_CACHE_DIR"] = tempfile.mkdtemp(prefix="mess-ai-test-cache-")

import json  # noqa: E402

import pytest  # noqa: E402

# Run first, so that under `pytest -n` (make test) the longest test is not the suite's tail: mostly waiting (for
# a scheduler, heartbeats, a webhook), it overlaps the rest of the suite on the other worker.
LONGEST_FIRST = ("tests/test_nightly.py", "tests/test_hostile_input.py::test_a_file_the_process_dies_on",
                 "tests/test_kill.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # a stable sort: the rest keep order


_figures: list[tuple[str, dict]] = []


def pytest_runtest_logreport(report):
    """Collect the reliability tests' figures (tests/reliability/conftest.py) from the reports, which reach the
    controller of ``pytest -n`` from its workers."""
    if report.when == "call":
        _figures.extend((report.nodeid.rsplit("::", 1)[-1], data) for name, data in report.user_properties
                        if name == "reliability-figures")


def pytest_terminal_summary(terminalreporter, config):
    if _figures:
        terminalreporter.section("reliability figures")
        for name, data in _figures:
            terminalreporter.write_line(f"{name}: {json.dumps(data, sort_keys=True)}")


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    """The host's folder of device locks, of this test alone: the cache folder set above is shared by the
    processes of ``pytest -n``, and a stand-in GPU another test holds would otherwise be taken from this one."""
    from mess_ai.features.device_locks import lock_folder
    from mess_ai.features.identity import CACHE_DIR_ENV

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    return lock_folder()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A MERT-v1-format checkpoint with random weights (hidden 32, 2 layers: 3 hidden states)."""
    from mess_ai.features.random_checkpoints import write_test_model

    return str(write_test_model(tmp_path_factory.mktemp("tiny-mert"), size="tiny", seed=0))


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect API (a temporary server on SQLite) for the whole session: starting one takes ~15 s. As
    `make server` does, it tells a run waiting for a busy GPU limit to ask again within 5 s, not up to 39 s (the
    Makefile's SERVER_ENV says why). (Not its lease storage on disk: that is one folder for every server of a
    PREFECT_HOME, and each pytest-xdist process has a harness of its own.)"""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from tests.helpers.prefect_server import SERVER_SETTINGS

    wait = "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS"
    saved = os.environ.get(wait)
    os.environ[wait] = SERVER_SETTINGS[wait]  # the harness's server process takes it from the environment
    try:
        with prefect_test_harness(server_startup_timeout=180):
            yield PREFECT_API_URL.value()
    finally:
        if saved is None:
            os.environ.pop(wait, None)
        else:
            os.environ[wait] = saved
