"""`mess-ai serve`: every deployment of prefect.yaml, with its schedule, served from one process.

For a single machine: no work pool and no worker needed, only a running Prefect server (PREFECT_API_URL). The
deployments are read from the same prefect.yaml that `make deploy` uses, so the two ways never drift apart.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
_TEMPLATE = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def resolve_templates(value: Any, env: Mapping[str, str]) -> Any:
    """Replace ``{{ $VAR }}`` with the environment's value, everywhere in ``value``; a missing variable raises."""
    if isinstance(value, dict):
        return {k: resolve_templates(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_templates(v, env) for v in value]
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name = match.group(1)
            if name not in env:
                raise KeyError(f"prefect.yaml needs the environment variable {name} (see the Makefile's defaults)")
            return env[name]

        return _TEMPLATE.sub(substitute, value)
    return value


def load_deployment_specs(path: Path = REPO_ROOT / "prefect.yaml", env: Mapping[str, str] | None = None
                          ) -> list[dict[str, Any]]:
    """The deployments of prefect.yaml with their templates resolved."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [resolve_templates(d, os.environ if env is None else env) for d in spec["deployments"]]


def _load_flow(entrypoint: str) -> Any:
    """``flows/extract.py:extract_features`` → the flow object (imported as ``flows.extract``, as deployed)."""
    file_name, _, attribute = entrypoint.partition(":")
    module = importlib.import_module(file_name.removesuffix(".py").replace("/", "."))
    return getattr(module, attribute)


def build_deployments(specs: list[dict[str, Any]]) -> list[Any]:
    """Runner deployments (served from this process) for the specs."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.schedules import Cron

    deployments = []
    for spec in specs:
        flow = _load_flow(spec["entrypoint"])
        limit = spec.get("concurrency_limit")
        if isinstance(limit, dict):
            limit = ConcurrencyLimitConfig(**limit)
        schedules = [Cron(s["cron"], timezone=s.get("timezone") or "UTC", active=s.get("active", True))
                     for s in spec.get("schedules") or []]
        deployments.append(flow.to_deployment(
            name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
            parameters=spec.get("parameters") or {}, schedules=schedules or None, concurrency_limit=limit))
    return deployments


def serve_all(names: list[str] | None = None) -> None:
    from prefect import serve

    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("mess-ai serve needs a Prefect server: start one (`make server`) and set PREFECT_API_URL "
                         "(e.g. http://127.0.0.1:4200/api)")
    specs = [s for s in load_deployment_specs() if not names or s["name"] in names]
    deployments = build_deployments(specs)
    log.info("Serving %d deployments: %s", len(deployments), ", ".join(s["name"] for s in specs))
    serve(*deployments)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve_all(sys.argv[1:])
