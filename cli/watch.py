"""``mess-ai watch DIR``: the command that starts the folder watcher (``deployments.watch``).

The watcher and its file-watching library are imported only when the command runs, not to build the parser.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cli.options import INCOMING_ENV, MODEL_ENV, STORE_ENV, EnvDefault, add_command, add_env_option
from deployments.runtime import DEFAULT_WATCH_DEPLOYMENT as DEFAULT_DEPLOYMENT

log = logging.getLogger(__name__)


def cmd_watch(args: argparse.Namespace) -> int:
    from deployments.runtime import prepare_prefect
    from deployments.watch import watch

    prepare_prefect(args.verbose)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO
    parameters = {name: getattr(args, name) for name in ("dataset", "model", "device")
                  if getattr(args, name) is not None}
    try:
        watch(args.audio_dir, deployment=args.deployment, store=args.store, local=args.local, parameters=parameters,
              stable_seconds=args.stable_seconds, debounce_seconds=args.debounce_seconds,
              rescan_seconds=args.rescan_seconds)
    except KeyboardInterrupt:
        log.info("Stopped watching %s.", args.audio_dir)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``watch`` to the ``mess-ai`` subcommands."""
    p = add_command(subparsers, "watch", help="extract new recordings of a folder once complete",
                    description="watch a folder and extract each burst of new recordings once complete: as runs "
                                "of a deployment on the Prefect server at PREFECT_API_URL, or in this process "
                                "with --local",
                    example="mess-ai watch ~/incoming --store ~/mess-store --local\n"
                            "PREFECT_API_URL=http://127.0.0.1:4200/api mess-ai watch ~/incoming")
    add_env_option(p, "audio_dir", nargs="?", type=Path, metavar="AUDIO_DIR", env=EnvDefault(INCOMING_ENV, None),
                   help="folder people drop recordings into (watched recursively)")
    add_env_option(p, "--store", type=Path, help="feature store folder",
                   env=EnvDefault(STORE_ENV, otherwise="the deployment's; required with --local"))
    p.add_argument("--dataset", default=None, help="dataset inside the store (default: the folder name)")
    add_env_option(p, "--model", help="hub id or local directory",
                   env=EnvDefault(MODEL_ENV, otherwise="the deployment's"))
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the deployment's)")
    p.add_argument("--deployment", default=DEFAULT_DEPLOYMENT,
                   help=f"deployment whose runs do the work (default: {DEFAULT_DEPLOYMENT})")
    p.add_argument("--local", action="store_true",
                   help="extract in this process instead of starting deployment runs (no server or worker needed)")
    p.add_argument("--stable-seconds", type=float, default=5.0,
                   help="a file is complete once its size and mtime have not changed this long (default: 5)")
    p.add_argument("--rescan-seconds", type=float, default=None,
                   help="also rescan the whole folder this often, for network shares without change events "
                        "(default: never)")
    p.add_argument("--debounce-seconds", type=float, default=2.0,
                   help="wait this long after the last new file before starting a run (default: 2)")
    p.set_defaults(func=cmd_watch)
