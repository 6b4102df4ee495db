"""Run extraction in a process of its own, for tests that kill it or run two at once.

``python -m tests.helpers.extract_process AUDIO STORE MODEL [--keep-raw] [--batch-size N] [--manifest-url URL]``
runs the plain pipeline
(``run_extraction``: no Prefect, so a process starts in seconds) and prints its summary as one JSON line.
``start`` and ``run`` start it from a test, from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def command(audio: str | Path, store: str | Path, model: str, *, keep_raw: bool = False,
            batch_size: int | None = None, manifest_url: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "tests.helpers.extract_process", str(audio), str(store), model]
    if manifest_url is not None:
        cmd += ["--manifest-url", manifest_url]
    if keep_raw:
        cmd.append("--keep-raw")
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    return cmd


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")


def start(audio: str | Path, store: str | Path, model: str, **kwargs) -> subprocess.Popen:
    """The extraction as a running process (stdout: the summary JSON; stderr: the log)."""
    return subprocess.Popen(command(audio, store, model, **kwargs), cwd=REPO, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(audio: str | Path, store: str | Path, model: str, timeout: float, **kwargs) -> dict:
    """The extraction run to its end; returns the summary. Raises ``AssertionError`` with the log when it fails."""
    proc = start(audio, store, model, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"extraction did not finish in {timeout:.0f} s:\n{err[-3000:]}") from None
    if proc.returncode not in (0, 1):
        raise AssertionError(f"extraction exited with {proc.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("audio")
    parser.add_argument("store")
    parser.add_argument("model")
    parser.add_argument("--keep-raw", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--manifest-url", default=None)
    args = parser.parse_args(argv)

    from mess_ai.config import ExtractConfig
    from mess_ai.pipeline import run_extraction

    config = ExtractConfig(model=args.model, device="cpu", keep_raw=args.keep_raw, batch_size=args.batch_size)
    summary = run_extraction(args.audio, args.store, config=config, manifest_url=args.manifest_url)
    print(json.dumps(summary.to_dict(), default=str))
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
