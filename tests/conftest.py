"""Session-wide test setup: no network, no analytics, and one tiny MERT-format checkpoint on disk."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub or prefect: tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The weights' digest cache of the tests' own checkpoints stays out of the user's ~/.cache.
if "MESS_AI_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["MESS_AI_CACHE_DIR"] = tempfile.mkdtemp(prefix="mess-ai-test-cache-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A MERT-v1-format checkpoint with random weights (hidden 32, 2 layers: 3 hidden states)."""
    from mess_ai.features.random_checkpoints import write_test_model

    return str(write_test_model(tmp_path_factory.mktemp("tiny-mert"), size="tiny", seed=0))


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect API (a temporary server on SQLite) for the whole session: starting one takes ~15 s."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()
