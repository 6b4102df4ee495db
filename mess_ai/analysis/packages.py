"""The packages the analysis needs beyond what extraction needs: the ``analysis`` extra, which an extraction
worker's install leaves out. Checked before an analysis starts, so that it fails with what to install instead of a
``ModuleNotFoundError`` half-way through."""

from __future__ import annotations

import importlib.util

from mess_ai.errors import MessError

INSTALL_ANALYSIS = "pip install 'mess-ai[analysis]'"
# import name -> distribution. faiss is left out: similarity search falls back to exact numpy search without it.
_REPORT = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
_BASELINE = {"librosa": "librosa"}


class MissingPackagesError(MessError):
    """Packages of an extra are not installed."""


def check_analysis_packages(baseline: bool) -> None:
    """Raise ``MissingPackagesError`` naming the missing distributions and the extra to install, unless the
    report's packages (and with ``baseline``, librosa for the MFCC + chroma baseline) can be imported."""
    wanted = {**_REPORT, **(_BASELINE if baseline else {})}
    missing = [dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None]
    if missing:
        only_baseline = set(missing) <= set(_BASELINE.values())
        raise MissingPackagesError(
            f"the analysis needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{INSTALL_ANALYSIS}" + (" (or skip the MFCC + chroma baseline, the only part that needs it)"
                                     if only_baseline else ""))
