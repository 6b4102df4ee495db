"""`python -m bench [NAME ...] [--quick] [--results DIR]`: run benchmarks, write their JSON, update the docs.

A full run (not ``--quick``) writes ``bench/results/<name>.json`` and rewrites ``docs/benchmarks.md`` from every
result there. ``--quick`` runs small versions whose figures mean nothing (for the smoke test); their JSON goes to
``--results`` or a temporary folder, never over the real results, and the docs are left alone.
"""

from __future__ import annotations

from bench.common import prepare_environment

prepare_environment()  # before anything imports Prefect

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import DOCS_PATH, RESULTS_DIR, new_result  # noqa: E402
from bench.report import format_result, write_docs  # noqa: E402

# Benchmark name -> module, in the order a full run takes them (cheap ones first).
BENCHMARKS = {
    "noop": "bench.noop",
    "storage": "bench.storage",
    "overhead": "bench.overhead",
    "memory": "bench.memory",
    "seed-baseline": "bench.seed_baseline",
    "model-bound": "bench.model_bound",
    "end-to-end": "bench.end_to_end",
    "gpu": "bench.gpu",
    "dataset-size": "bench.dataset_size",
    "export": "bench.export",
    "settle": "bench.settle",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): "
                                                                 f"{', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small smoke versions; figures mean nothing")
    parser.add_argument("--results", type=Path, help="folder for the JSON results (default: bench/results, or a "
                                                     "temporary folder with --quick)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    results_dir = args.results or (Path(tempfile.mkdtemp(prefix="mess-ai-bench-quick-")) if args.quick
                                   else RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mess-ai-bench-"))
    failed = []
    try:
        for name in names:
            print(f"\n=== {name}{' (quick)' if args.quick else ''} ===", flush=True)
            started = time.perf_counter()
            try:
                result = importlib.import_module(BENCHMARKS[name]).run(workdir, args.quick)
            except Exception:  # noqa: BLE001 - recorded; the other benchmarks still run
                result = new_result(name, args.quick)
                result["error"] = traceback.format_exc()
                failed.append(name)
            result["benchmark_seconds"] = round(time.perf_counter() - started, 1)
            result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
            (results_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            print(format_result(result), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nResults: {results_dir}")
    if not args.quick and results_dir.resolve() == RESULTS_DIR.resolve():
        write_docs(results_dir, DOCS_PATH)
        print(f"Updated {DOCS_PATH}")
    if failed:
        print(f"Failed: {', '.join(failed)} (see the 'error' field of their JSON)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
