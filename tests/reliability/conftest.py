"""Figures of the reliability tests (kills survived, timings), printed at the end of the session for
docs/reliability.md."""

from __future__ import annotations

import json

import pytest

FIGURES = pytest.StashKey[list]()


@pytest.fixture
def figures(request):
    """Append ``(test name, dict of figures)`` to be printed in the session's summary."""
    stash = request.config.stash.setdefault(FIGURES, [])
    return lambda data: stash.append((request.node.name, data))


def pytest_terminal_summary(terminalreporter, config):
    collected = config.stash.get(FIGURES, [])
    if not collected:
        return
    terminalreporter.section("reliability figures")
    for name, data in collected:
        terminalreporter.write_line(f"{name}: {json.dumps(data, sort_keys=True)}")
