"""A throwaway PostgreSQL cluster (Debian's packages) on a free loopback port, for the scale-out tests.

``initdb`` and ``pg_ctl`` refuse to run as root, so under root they run as the ``postgres`` user, in a temporary
folder that user owns. Durability is off (``-F``): the cluster lives for one test session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.helpers.prefect_server import free_port

USER = "mess"


def bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` (Debian), else the folder of an ``initdb`` on PATH."""
    debian = sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[-3].isdigit()),
                    key=lambda p: int(p.parts[-3]))
    if debian:
        return debian[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable_reason() -> str | None:
    """Why no PostgreSQL test can run here, or None when one can."""
    if bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install -y postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed; pip install 'psycopg[binary]' (the `postgres` extra)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser, so initdb cannot run as the postgres user"
    return None


@dataclass(frozen=True)
class PostgresServer:
    port: int

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg 3 driver)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def postgres_server(durable: bool = False) -> Iterator[PostgresServer]:
    """Start a cluster with trust authentication on 127.0.0.1 only; stop it and delete its files afterwards.
    ``durable``: commits are fsynced, as on a real server (off for tests: ``-F``)."""
    binaries = bin_dir()
    if binaries is None:
        raise RuntimeError(unavailable_reason())
    # Not under pytest's tmp_path: that is private to the user running the tests, and the server may be another.
    root = Path(tempfile.mkdtemp(prefix="mess-ai-pg-"))
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(_as_owner([str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                                  "--encoding=UTF8", "--no-sync"]), check=True, capture_output=True)
        started = subprocess.run(_as_owner([
            str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
            "-o", f"-h 127.0.0.1 -p {port} -k {root}" + ("" if durable else " -F"), "start"]), capture_output=True, text=True)
        if started.returncode != 0:
            detail = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start:\n{started.stdout}{started.stderr}\n{detail}")
        try:
            yield PostgresServer(port)
        finally:
            subprocess.run(_as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                           capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
