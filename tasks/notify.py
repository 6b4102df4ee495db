"""How a mess-ai run says it ended: one event per run, which the automations of deployments/automations.py use.

Every mess-ai flow emits a ``mess-ai.run.<outcome>`` event about its own flow run when it ends: ``completed``,
``files-failed`` (completed, but files failed in it), ``failed``, ``crashed`` or ``cancelled``. The notification
automation reacts to the bad outcomes.

Why our own events and not Prefect's ``prefect.flow-run.<State>`` events: Prefect 3.8's scheduler inserts the runs
it schedules without a Scheduled event, and every later state event of such a run "follows" that missing event, so
the server's trigger evaluation holds them back for 15 minutes (its ``PRECEDING_EVENT_LOOKBACK``). A nightly run's
Failed would reach the automations a quarter of an hour late. Events emitted here follow nothing and are evaluated
at once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from prefect.events import emit_event

if TYPE_CHECKING:
    from mess_ai.pipeline import RunSummary

log = logging.getLogger(__name__)

EVENT_PREFIX = "mess-ai.run."
COMPLETED, FILES_FAILED, FAILED, CRASHED, CANCELLED = (
    f"{EVENT_PREFIX}{outcome}" for outcome in ("completed", "files-failed", "failed", "crashed", "cancelled"))
BAD_OUTCOMES = (FILES_FAILED, FAILED, CRASHED)
TAG = "mess-ai"
_EXAMPLES = 5


# A bad outcome's event is sent twice, this far apart (two events: the server drops a second copy of one id): a
# server on SQLite drops an event whose trigger evaluation hits "database is locked" four times in a row (Prefect's
# in-memory broker retries at once, then moves it to its dead-letter folder), which can happen when a run's last
# API calls all land together. The notification
# automation waits 10 s from the first copy it sees, so both copies make one message. Only runs of deployments are
# notified (the automations look for their `mess-ai` tag): runs of the CLI do not wait to say it twice.
REPEAT_SECONDS = 3.0


def emit_run_event(event: str, flow_run: Any, flow_name: str, **payload: Any) -> None:
    """Emit ``event`` about ``flow_run`` (an object with ``id``, ``name``, ``deployment_id``)."""
    related = [{"prefect.resource.id": f"prefect.tag.{TAG}", "prefect.resource.role": "tag"}]
    if getattr(flow_run, "deployment_id", None):
        related.append({"prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    outcome = event[len(EVENT_PREFIX):]
    message = payload.get("message") or ""
    text = f"mess-ai: flow run {flow_run.name} ({flow_name}) {_WORDS[outcome]}" + (f": {message}" if message else "")
    emit_event(event=event,
               resource={"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                         "prefect.resource.name": flow_run.name or ""},
               related=related,
               payload={"outcome": outcome, "text": text, "flow": flow_name, "flow_run_id": str(flow_run.id),
                        "flow_run": flow_run.name or "", **payload})


_WORDS = {"completed": "completed", "files-failed": "completed, but files failed in it", "failed": "FAILED",
          "crashed": "CRASHED", "cancelled": "was cancelled"}


def failed_files_text(summary: "RunSummary") -> str:
    failed = [o for o in summary.outcomes if o.status == "failed"]
    text = "; ".join(f"{o.relative_path} ({o.stage}: {o.reason})" for o in failed[:_EXAMPLES])
    return text + (f"; and {len(failed) - _EXAMPLES} more" if len(failed) > _EXAMPLES else "")


def announce_outcome(summary: "RunSummary") -> None:
    """Called by the extract flow at its end: ``files-failed`` when files failed in this run (not those failed
    before and left alone), else ``completed``. The completion hook then emits nothing more."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    run, flow_name = context.flow_run, context.flow.name if context.flow else ""
    failed = sum(o.status == "failed" for o in summary.outcomes)
    if failed:
        examples = failed_files_text(summary)
        payload = dict(dataset=summary.dataset, failed=failed, found=summary.discovered, examples=examples,
                       message=f"{failed} of {summary.discovered} files failed in dataset {summary.dataset}: "
                               f"{examples}")
        emit_run_event(FILES_FAILED, run, flow_name, **payload)
        _announced[str(run.id)] = (FILES_FAILED, payload)  # sent again by the completion hook
    else:
        emit_run_event(COMPLETED, run, flow_name, dataset=summary.dataset, found=summary.discovered)
        _announced[str(run.id)] = None


_announced: dict[str, tuple[str, dict[str, Any]] | None] = {}


def _hook(event: str):
    def hook(flow: Any, flow_run: Any, state: Any) -> None:
        try:
            if event == COMPLETED and str(flow_run.id) in _announced:
                # The flow said how it went; a bad outcome is said once more (REPEAT_SECONDS).
                announced = _announced.pop(str(flow_run.id))
                if announced is not None and flow_run.deployment_id:
                    outcome, payload = announced
                    time.sleep(REPEAT_SECONDS)
                    emit_run_event(outcome, flow_run, flow.name, **payload)
                return
            payload = {"state": state.name, "message": state.message or ""}
            emit_run_event(event, flow_run, flow.name, **payload)
            if event in BAD_OUTCOMES and flow_run.deployment_id:
                time.sleep(REPEAT_SECONDS)
                emit_run_event(event, flow_run, flow.name, **payload)
        except Exception:  # noqa: BLE001 - a hook must not turn the run's outcome into another
            log.exception("Could not emit %s for flow run %s", event, flow_run.name)

    hook.__name__ = f"emit_{event.rsplit('.', 1)[-1].replace('-', '_')}"
    return hook


# Passed to every mess-ai @flow: each run ends with one mess-ai.run.* event (a bad one sent twice, same id).
RUN_HOOKS: dict[str, list] = {
    "on_completion": [_hook(COMPLETED)],
    "on_failure": [_hook(FAILED)],
    "on_crashed": [_hook(CRASHED)],
    "on_cancellation": [_hook(CANCELLED)],
}
