"""Figures of the reliability tests (kills survived, timings), printed at the end of the session for
docs/reliability.md (the printing is in tests/conftest.py, which the controller of ``pytest -n`` loads too)."""

from __future__ import annotations

import pytest

FIGURES_PROPERTY = "reliability-figures"


@pytest.fixture
def figures(request):
    """Record a dict of figures for the session's summary. They travel in the test's report (its user
    properties), so they reach the summary from the worker processes of ``pytest -n`` too."""
    return lambda data: request.node.user_properties.append((FIGURES_PROPERTY, data))
