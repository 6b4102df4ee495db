"""The folder watcher: one ``extract-features`` run for each burst of new recordings, once they are complete.

By default each batch starts a flow run of a deployment on the Prefect server (``PREFECT_API_URL``), which a worker
picks up; ``--local`` runs the flow in this process instead (no server or worker needed). Either way the run covers
the whole folder and extracts only what is new or changed, so a recording the watcher missed is caught by the next
run, or by the nightly one.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from deployments.runtime import DEFAULT_WATCH_DEPLOYMENT
from mess_ai.errors import MessError
from mess_ai.watcher import watch_folder

log = logging.getLogger(__name__)

DEFAULT_DEPLOYMENT = DEFAULT_WATCH_DEPLOYMENT
_NAMES_SHOWN = 3


def watch(audio_dir: str | Path, *, deployment: str = DEFAULT_DEPLOYMENT, store: str | Path | None = None,
          local: bool = False, parameters: dict[str, Any] | None = None, stable_seconds: float = 5.0,
          debounce_seconds: float = 2.0, rescan_seconds: float | None = None,
          stop_event: threading.Event | None = None) -> None:
    """Watch ``audio_dir`` until ``stop_event`` is set (or Ctrl-C) and start one extraction per batch.

    ``store`` and ``parameters`` (other ``extract_features`` parameters such as ``dataset``, and fields of its
    ``config``: ``model``, ``device``, ...) override the deployment's defaults, field by field; with ``local``
    the flow runs here and ``store`` is required. Raises
    ``MessError`` when the deployment cannot be found on the server, before watching starts. A batch whose run
    cannot be started or fails is logged and the watch goes on. ``rescan_seconds``: also look at the whole folder
    this often (network shares may send no change events).
    """
    audio_dir = Path(audio_dir).absolute()
    if local and store is None:
        raise ValueError("a local watch extracts in this process and needs a store (--store)")
    flow_parameters = {"audio_dir": str(audio_dir), **({"store": str(store)} if store is not None else {}),
                       **(parameters or {})}
    if local:
        start: Callable[[dict[str, Any], str], None] = _extract_here
        where = "in this process"
    else:
        _check_deployment(deployment)
        start = functools.partial(_start_deployment_run, deployment)
        where = f"as runs of the deployment {deployment}"

    def on_batch(root: Path, relative_paths: list[str], found_at_start: list[str]) -> None:
        what = describe_batch(relative_paths, found_at_start)
        try:
            start(flow_parameters, what)
        except Exception as exc:  # noqa: BLE001 - the watch outlives one bad run; the next change retries
            log.error("%s, but the extraction could not run: %s: %s. The next change in the folder, or the "
                      "nightly run, picks these files up.", what, type(exc).__name__, exc)

    log.info("Watching %s for new recordings: a file counts as complete after %g s without changes, and files "
             "arriving within %g s of each other are extracted together, %s. Ctrl-C stops.",
             audio_dir, stable_seconds, debounce_seconds, where)
    watch_folder(audio_dir, on_batch, stable_seconds=stable_seconds, debounce_seconds=debounce_seconds,
                 rescan_seconds=rescan_seconds, stop_event=stop_event)


def describe_batch(relative_paths: list[str], found_at_start: list[str] = ()) -> str:
    """'3 new or changed recordings are complete (a.wav, b.wav, c.wav)', naming at most three files of each kind.

    The files ``found_at_start`` (in the folder when the watch began) are not called new: most are extracted
    already, and the run started for them only picks up those that are not ('Found 4 recordings in the folder at
    start (...): one run picks up any that are new or changed')."""
    at_start = set(found_at_start)
    arrived = [r for r in relative_paths if r not in at_start]
    parts = []
    if at_start:
        existing = [r for r in relative_paths if r in at_start]
        parts.append(f"Found {len(existing)} recording{'s' if len(existing) > 1 else ''} in the folder at start "
                     f"({_names(existing)})")
    if arrived:
        parts.append(f"1 new or changed recording is complete ({_names(arrived)})" if len(arrived) == 1
                     else f"{len(arrived)} new or changed recordings are complete ({_names(arrived)})")
    what = " and ".join(parts)
    return f"{what}: one run picks up any that are new or changed" if at_start else what


def _names(relative_paths: list[str]) -> str:
    count = len(relative_paths)
    return ", ".join(relative_paths[:_NAMES_SHOWN]) + (
        f" and {count - _NAMES_SHOWN} more" if count > _NAMES_SHOWN else "")


def _check_deployment(deployment: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise MessError("PREFECT_API_URL is not set: start a server (`make server`), deploy (`make deploy`) and "
                        "set PREFECT_API_URL=http://127.0.0.1:4200/api, or watch with --local")
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        raise MessError(f"no deployment {deployment} on the Prefect server at {api}: run `make deploy` first") \
            from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many classes
        raise MessError(f"cannot reach the Prefect server at {api}: {exc}") from exc


def _nested(parameters: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flow parameters from flat ones: fields of ``ExtractConfig`` and ``RunOptions`` go into ``config`` and
    ``run``, on top of those the deployment sets (``defaults``: Prefect replaces a parameter whole, so a ``config``
    naming only the device would drop the deployment's model)."""
    from mess_ai.config import sort_settings

    config, run, nested = sort_settings(parameters)
    for name, fields in (("config", config), ("run", run)):
        if fields:
            nested[name] = {**((defaults or {}).get(name) or {}), **fields}
    return nested


def _start_deployment_run(deployment: str, parameters: dict[str, Any], what: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_UI_URL

    with get_client(sync_client=True) as client:
        defaults = client.read_deployment_by_name(deployment).parameters
    # timeout=0: return once the run is created; a worker runs it, and the watch goes on meanwhile.
    flow_run = run_deployment(name=deployment, parameters=_nested(parameters, defaults), timeout=0)
    ui = PREFECT_UI_URL.value()
    log.info("%s; started run '%s' of %s%s", what, flow_run.name, deployment,
             f" ({ui}/runs/flow-run/{flow_run.id})" if ui else "")


def _extract_here(parameters: dict[str, Any], what: str) -> None:
    from flows.extract import extract_features
    from deployments.runtime import default_gpu_limit
    from mess_ai.pipeline import RunSummary

    log.info("%s; extracting in this process", what)
    result = extract_features(**_nested({"gpu_limit": default_gpu_limit(), **parameters}))
    log.info("Extraction finished: %s.", RunSummary.from_dict(result).counts.describe())
