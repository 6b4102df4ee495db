"""The packages of the optional extras, which an extraction worker's install leaves out: ``analysis``
(scikit-learn, matplotlib, librosa) and ``export`` (pyarrow). Checked before such work starts, so that it fails
saying what to install instead of a ``ModuleNotFoundError`` half-way through."""

from __future__ import annotations

import importlib.util

from mess_ai.errors import MessError

INSTALL_ANALYSIS = "pip install 'mess-ai[analysis]'"
INSTALL_EXPORT = "pip install 'mess-ai[export]'"
# import name -> distribution. faiss is left out: similarity search falls back to exact numpy search without it.
_REPORT = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
_BASELINE = {"librosa": "librosa"}
_EXPORT = {"pyarrow": "pyarrow"}


class MissingPackagesError(MessError):
    """Packages of an extra are not installed."""


def _missing(wanted: dict[str, str]) -> list[str]:
    return [dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None]


def _say(what: str, missing: list[str], install: str) -> str:
    return (f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{install}")


def check_analysis_packages(baseline: bool) -> None:
    """Raise ``MissingPackagesError`` naming the missing distributions and the extra to install, unless the
    report's packages (and with ``baseline``, librosa for the MFCC + chroma baseline) can be imported."""
    missing = _missing({**_REPORT, **(_BASELINE if baseline else {})})
    if missing:
        only_baseline = set(missing) <= set(_BASELINE.values())
        raise MissingPackagesError(_say("the analysis", missing, INSTALL_ANALYSIS)
                                   + (" (or skip the MFCC + chroma baseline, the only part that needs it)"
                                      if only_baseline else ""))


def check_export_packages() -> None:
    """Raise ``MissingPackagesError`` unless pyarrow (the ``export`` extra) can be imported."""
    missing = _missing(_EXPORT)
    if missing:
        raise MissingPackagesError(_say("the export", missing, INSTALL_EXPORT))
