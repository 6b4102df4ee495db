"""Prefect automations that keep unattended runs honest: a dead run is marked Crashed, and someone is told.

``python -m deployments.automations`` (run by ``make deploy``) creates or updates them on the server that
``PREFECT_API_URL`` names; running it again replaces them, so it is safe to repeat.

- **Dead runs.** A flow run sends a heartbeat every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (prefect.yaml
  sets it for the workers' runs). A mess-ai run whose heartbeats stop for ``MESS_AI_ZOMBIE_SECONDS`` without the
  run saying how it ended (its process or machine died) is marked Crashed: Prefect's documented "detect zombie
  flows" automation. That frees the deployment's concurrency slot, so a dead night never blocks the next one.
- **Notifications.** When ``MESS_AI_NOTIFY_URL`` is set, a mess-ai run that ends Failed or Crashed, that dies
  without a word, or that completes with files that failed in it, makes the server POST one JSON message to that
  URL (``{"text": ..., "outcome": ..., "flow_run_id": ...}``: a Slack or Teams incoming webhook reads ``text``).
  The URL is kept in a Webhook block (stored encrypted). Unset: the notification automations are removed and
  nothing is sent.

Both react to the ``mess-ai.run.*`` event each run emits as it ends (tasks/notify.py says why not to Prefect's
own state events), and to heartbeats.
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta

from tasks.notify import BAD_OUTCOMES, EVENT_PREFIX, TAG

log = logging.getLogger(__name__)

ZOMBIE = "mess-ai: mark runs without heartbeats as Crashed"
NOTIFY_RUN = "mess-ai: notify when a run fails, crashes or has failed files"
NOTIFY_DEAD = "mess-ai: notify when a run dies without a word"
WEBHOOK_BLOCK = "mess-ai-notify"

DEFAULT_HEARTBEAT_SECONDS = 60
# Three missed heartbeats: a run busy in a long model call still sends them (they come from a thread of their own).
DEFAULT_ZOMBIE_SECONDS = 3 * DEFAULT_HEARTBEAT_SECONDS

_OUR_RUNS = {"prefect.resource.id": f"prefect.tag.{TAG}", "prefect.resource.role": "tag"}
# A run is alive while it sends heartbeats. Once it has ended, the automation still fires (its last heartbeat is not
# followed by another), but setting Crashed is refused for a run in a final state, and nobody is told (the
# notification follows only a Crashed that was set). Counting the runs' own outcome events or Prefect's state
# events here instead made it worse: Prefect 3.8 holds the state events of scheduled runs for 15 minutes
# (tasks/notify.py), and on a SQLite server evaluating the outcome events against this trigger failed with
# "database is locked" every time, so they went to the dead-letter folder before the notification saw them.
_SIGNS_OF_LIFE = {"prefect.flow-run.heartbeat"}

# Never emitted: a proactive trigger needs something to expect (tasks/notify.py emits one outcome per run).
_NEVER = f"{EVENT_PREFIX}never"
NOTIFY_DELAY_SECONDS = 10

_OUTCOME_MESSAGE = """{
  "text": {{ event.payload.text | tojson }},
  "outcome": {{ event.payload.outcome | tojson }},
  "flow": {{ event.payload.flow | tojson }},
  "flow_run": {{ event.payload.flow_run | tojson }},
  "flow_run_id": {{ event.payload.flow_run_id | tojson }},
  "message": {{ (event.payload.message or "") | tojson }}
}"""

_DEAD_MESSAGE = """{
  "text": {{ ("mess-ai: flow run " ~ flow_run.name ~ " sent no heartbeat for WITHIN s: its process or machine "
             ~ "died. It is marked Crashed; the next run picks its files up.") | tojson }},
  "outcome": "dead",
  "flow_run": {{ flow_run.name | tojson }},
  "flow_run_id": "{{ flow_run.id }}",
  "message": {{ (flow_run.state.message or "") | tojson }}
}"""


def zombie_seconds() -> int:
    """MESS_AI_ZOMBIE_SECONDS; refused unless it is longer than the heartbeat interval (a live run would be marked
    Crashed between two heartbeats)."""
    zombie = int(os.environ.get("MESS_AI_ZOMBIE_SECONDS") or DEFAULT_ZOMBIE_SECONDS)
    heartbeat = int(os.environ.get("MESS_AI_HEARTBEAT_SECONDS") or DEFAULT_HEARTBEAT_SECONDS)
    if zombie <= heartbeat:
        raise ValueError(f"MESS_AI_ZOMBIE_SECONDS={zombie} must be longer than MESS_AI_HEARTBEAT_SECONDS={heartbeat}: "
                         "a live run would be marked Crashed between two heartbeats (three heartbeats is usual)")
    return zombie


def _dead_run_trigger():
    from prefect.automations import EventTrigger, Posture

    return EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related=_OUR_RUNS,
        after={"prefect.flow-run.heartbeat"},
        expect=_SIGNS_OF_LIFE,
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=zombie_seconds()),
    )


def _zombie_automation():
    from prefect.automations import Automation, ChangeFlowRunState
    from prefect.client.schemas.objects import StateType

    within = zombie_seconds()
    return Automation(
        name=ZOMBIE,
        description=f"A mess-ai flow run that sent no heartbeat for {within} s is marked Crashed (its process died).",
        trigger=_dead_run_trigger(),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED, name="Crashed",
            message=f"No heartbeat for {within} s: the run's process or machine died. Its files are picked up "
                    "by the next run.")],
    )


def _dedup_trigger(match: dict, after: set[str]):
    """Fires once, ``NOTIFY_DELAY_SECONDS`` after the first of ``after`` for a resource.

    Proactive on purpose: a server on SQLite may deliver an event to the trigger evaluation more than once (a
    "database is locked" retry), and a reactive trigger fires once per delivery. Every delivery of one event lands
    in the same window, which fires once when it closes."""
    from prefect.automations import EventTrigger, Posture

    return EventTrigger(match=match, after=after, expect={_NEVER}, for_each={"prefect.resource.id"},
                        posture=Posture.Proactive, threshold=1, within=timedelta(seconds=NOTIFY_DELAY_SECONDS))


def _notify_automations(block_id, zombie_id):
    from prefect.automations import Automation, CallWebhook

    outcomes = _dedup_trigger({"prefect.resource.id": "prefect.flow-run.*"}, set(BAD_OUTCOMES))
    outcomes.match_related = _OUR_RUNS
    return [
        Automation(
            name=NOTIFY_RUN,
            description="POST to MESS_AI_NOTIFY_URL when a mess-ai run fails, crashes or has failed files.",
            trigger=outcomes,
            actions=[CallWebhook(block_document_id=block_id, payload=_OUTCOME_MESSAGE)],
        ),
        Automation(
            name=NOTIFY_DEAD,
            description="POST to MESS_AI_NOTIFY_URL when a mess-ai run that stopped sending heartbeats is marked "
                        "Crashed.",
            # On the dead-run automation's successful action only: a late heartbeat of a run that had ended
            # makes it fire too, but then setting Crashed fails (the run is final) and nobody is told.
            trigger=_dedup_trigger({"prefect.resource.id": f"prefect.automation.{zombie_id}"},
                                   {"prefect.automation.action.executed"}),
            actions=[CallWebhook(block_document_id=block_id,
                                 payload=_DEAD_MESSAGE.replace("WITHIN", str(zombie_seconds())))],
        ),
    ]


def _replace(automation):
    """Create ``automation``, replacing any of the same name (so a changed setting takes effect)."""
    _delete(automation.name)
    return automation.create()


def _delete(name: str) -> bool:
    from prefect.automations import Automation
    from prefect.exceptions import PrefectHTTPStatusError

    deleted = False
    while True:
        try:
            existing = Automation.read(name=name)
        except (ValueError, PrefectHTTPStatusError):
            return deleted
        existing.delete()
        deleted = True


def ensure_automations(notify_url: str | None) -> list[str]:
    """Create or replace the automations; with no ``notify_url``, remove the notification ones. Returns the
    names of the automations now in place."""
    from prefect.blocks.webhook import Webhook

    zombie = _replace(_zombie_automation())
    names = [ZOMBIE]
    if notify_url:
        block_id = Webhook(method="POST", url=notify_url, headers={"Content-Type": "application/json"}).save(
            WEBHOOK_BLOCK, overwrite=True)
        for automation in _notify_automations(block_id, zombie.id):
            _replace(automation)
            names.append(automation.name)
    else:
        for name in (NOTIFY_RUN, NOTIFY_DEAD):
            if _delete(name):
                log.info("Removed the automation '%s' (MESS_AI_NOTIFY_URL is not set).", name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.automations",
        description="Create the mess-ai automations on the Prefect server of PREFECT_API_URL: dead runs marked "
                    "Crashed after MESS_AI_ZOMBIE_SECONDS without heartbeat, and notifications to "
                    "MESS_AI_NOTIFY_URL (none when it is unset).")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    notify_url = os.environ.get("MESS_AI_NOTIFY_URL") or None
    for name in ensure_automations(notify_url):
        print(f"automation in place: {name}")
    print("notifications: " + ("POST to the URL in MESS_AI_NOTIFY_URL" if notify_url
                               else "none (MESS_AI_NOTIFY_URL is not set)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
