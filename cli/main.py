"""The ``mess-ai`` command line: thin shells over the library functions the flows call too.

Exit codes: 0 everything done / clean, 1 some files failed / problems found, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

from cli import analysis as analysis_cli
from cli.options import add_model_options, model_from_options
from cli.report import prefect_ui_hint, print_summary
from deployments.runtime import default_gpu_limit, prepare_prefect
from mess_ai.errors import MessError

log = logging.getLogger("cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LONG_RUNNING_COMMANDS = ("watch", "serve")


class _Progress:
    """A progress bar on a terminal, plain log lines otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.total = 0
        self.count = 0

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "plan":
            self.total = info["pending"]
            if self.tty and self.total:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, unit="file", desc="extracting", dynamic_ncols=True)
        elif event == "file":
            self.count += 1
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(info["relative_path"][-40:])
            else:
                what = {"done": "done", "busy": f"busy: {info['reason']}"}.get(
                    info["status"], f"FAILED at {info['stage']}: {info['reason']}")
                log.info("[%d/%d] %s: %s", self.count, self.total, info["relative_path"], what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _settings(args: argparse.Namespace):
    """The run's ``ExtractConfig`` and ``RunOptions`` from the options given; a bad value is a usage error before
    any flow starts."""
    from mess_ai.config import ExtractConfig, RunOptions

    return model_from_options(ExtractConfig, args, "config_"), model_from_options(RunOptions, args, "run_")


@contextlib.contextmanager
def _manifest_url_for_flows(url: str | None) -> Iterator[None]:
    """Hand ``--manifest-url`` to an in-process flow run through this process's MESS_AI_MANIFEST_URL, never as a
    flow parameter: Prefect stores parameters (on the user's server too, with PREFECT_API_URL) and shows them in
    its UI, password included. No URL: the SQLite file in the store, as for the commands that run no flow."""
    from mess_ai.store.manifest import MANIFEST_URL_ENV

    before = os.environ.get(MANIFEST_URL_ENV)
    os.environ[MANIFEST_URL_ENV] = url or ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MANIFEST_URL_ENV, None)
        else:
            os.environ[MANIFEST_URL_ENV] = before


class _HideExpectedErrors(logging.Filter):
    """Our own errors get one clear line from the CLI; Prefect need not print their tracebacks too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], (MessError, FileNotFoundError, ValueError)))


def _run_extract_flow(args: argparse.Namespace, audio_dir: Path, only_failed: bool) -> int:
    """Run the ``extract-features`` flow in this process, unless the plan, made first without Prefect or the model
    (``nothing_new``), finds nothing to do: then the command says so and ends, having started no flow run."""
    from mess_ai.extraction.noop import nothing_new

    config, run = _settings(args)
    summary = nothing_new(audio_dir, args.store, args.dataset or audio_dir.absolute().name, config,
                          only_failed=only_failed, manifest_url=args.manifest_url)
    if summary is not None:
        if args.json:
            print(json.dumps(summary.to_dict(), indent=2, default=str))
        else:
            print_summary(summary)
            print("  nothing new, so no flow run was started")
        return summary.exit_code
    prepare_prefect(args.verbose)
    if args.run_gpu_limit is None:
        run = run.model_copy(update={"gpu_limit": default_gpu_limit()})
    from flows.extract import extract_features
    from mess_ai import progress as progress_events
    from mess_ai.extraction.stats import RunSummary

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_HideExpectedErrors())
    bar = _Progress()
    try:
        with progress_events.listening(bar), _manifest_url_for_flows(args.manifest_url):
            result = extract_features(audio_dir=str(audio_dir), store=str(args.store), dataset=args.dataset,
                                      config=config, run=run, only_failed=only_failed, reextract=args.reextract)
    finally:
        bar.close()
    summary = RunSummary.from_dict(result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_summary(summary)
        print(prefect_ui_hint())
    return summary.exit_code


def _analyze_via_flow(store: Path, dataset: str | None, *, labels_csv: Path | None, n_clusters: int | None,
                      baseline: bool, manifest_url: str | None) -> dict:
    """``mess-ai analyze``: the analysis as a run of the ``analyze-embeddings`` flow (artifacts in the UI)."""
    prepare_prefect(logging.getLogger().level <= logging.DEBUG)
    from flows.analyze import analyze_store

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_HideExpectedErrors())
    with _manifest_url_for_flows(manifest_url):
        return analyze_store(store=str(store), dataset=dataset, labels_csv=str(labels_csv) if labels_csv else None,
                             n_clusters=n_clusters, baseline=baseline)


def cmd_extract(args: argparse.Namespace) -> int:
    return _run_extract_flow(args, args.audio_dir, args.only_failed)


def cmd_retry_failed(args: argparse.Namespace) -> int:
    """Re-run the failed files of a dataset; the audio folder and the model are read back from the store."""
    audio_dir = args.audio_dir or _audio_dir_of_failures(args)
    if audio_dir is None:
        print("no failed files: nothing to retry")
        return EXIT_OK
    if args.config_model is None and args.dataset:
        provenance = Path(args.store) / args.dataset / "provenance.json"
        if provenance.exists():
            args.config_model = json.loads(provenance.read_text(encoding="utf-8")).get("model")
    return _run_extract_flow(args, audio_dir, only_failed=True)


def _audio_dir_of_failures(args: argparse.Namespace) -> Path | None:
    manifest = _open_manifest(args)
    try:
        rows = manifest.rows(args.dataset, "failed")
    finally:
        manifest.close()
    if not rows:
        return None
    datasets = {r["dataset"] for r in rows}
    if len(datasets) > 1:
        raise MessError(f"failed files in several datasets ({', '.join(sorted(datasets))}): pick one with --dataset")
    roots = {r["source_path"][: -len(r["relative_path"])].rstrip("/") for r in rows}
    if len(roots) > 1:
        raise MessError(f"failed files come from several folders ({', '.join(sorted(roots))}): "
                        "give the folder with --audio-dir")
    args.dataset = datasets.pop()
    return Path(roots.pop())


def _open_manifest(args: argparse.Namespace):
    from mess_ai.store import Manifest
    from mess_ai.store.layout import MANIFEST_FILE
    from mess_ai.store.manifest import sqlite_url

    manifest_path = Path(args.store) / MANIFEST_FILE
    if args.manifest_url is None and not manifest_path.exists():
        raise MessError(f"no manifest at {manifest_path}: is {args.store} a mess-ai store?")
    return Manifest(args.manifest_url or sqlite_url(str(manifest_path)))


def cmd_check(args: argparse.Namespace) -> int:
    from mess_ai.store import check_store

    report = check_store(args.store, args.dataset, args.manifest_url, check_values=not args.quick)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"checked {report.tracks_checked} tracks, {report.files_checked} files in "
              f"{', '.join(report.datasets) or 'no dataset'}: "
              + ("OK" if report.ok else f"{len(report.problems)} problems"))
        for p in report.problems:
            print(f"  {p.path or p.track_id}: {p.reason}")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    """Export a dataset's embeddings as Parquet, by the library call the export flow makes (no flow run)."""
    from mess_ai.export import EXPORT_LAYERS, export_parquet
    from mess_ai.store.layers import parse_layer

    summary = export_parquet(args.store, args.out, args.dataset, parse_layer(args.layer, EXPORT_LAYERS),
                             args.manifest_url)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.describe())
    return EXIT_OK


def cmd_failures(args: argparse.Namespace) -> int:
    from mess_ai.store import FAILED

    manifest = _open_manifest(args)
    try:
        rows = manifest.rows(args.dataset, FAILED)
    finally:
        manifest.close()
    keys = ("dataset", "track_id", "relative_path", "source_path", "failure_stage", "error_class", "error_message",
            "permanent", "attempts", "first_attempt_at", "last_attempt_at")
    if args.json:
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2, default=str))
    else:
        print(f"{len(rows)} failed files")
        for r in rows:
            last = r["last_attempt_at"].strftime("%Y-%m-%d %H:%M:%S") if r["last_attempt_at"] else "?"
            kind = "will not retry unchanged bytes" if r["permanent"] else "retried on the next run"
            print(f"  {r['dataset']}/{r['relative_path']}\n    stage: {r['failure_stage']}   reason: "
                  f"{r['error_message']}\n    attempts: {r['attempts']}   last: {last} UTC   ({kind})")
    return EXIT_OK


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from mess_ai.features.random_checkpoints import write_test_model

    path = write_test_model(args.directory, size=args.size, seed=args.seed, weights_format=args.format)
    print(f"wrote a MERT-v1-format checkpoint with RANDOM weights ({args.size}) to {path}")
    print("  its embeddings are meaningless: it is for tests, demos and benchmarks only")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    prepare_prefect(args.verbose)
    with _manifest_url_for_flows(None):  # the demo's own store, never a shared manifest from the environment
        return run_demo(Path(args.workdir))


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path, help="feature store folder")
    p.add_argument("--dataset", default=None, help="dataset inside the store (default: all / the folder name)")
    p.add_argument("--manifest-url", default=None,
                   help="SQLAlchemy URL of the manifest (default: SQLite file manifest.sqlite in the store)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    from mess_ai.config import ExtractConfig, RunOptions

    add_model_options(p.add_argument_group("extraction (what makes the numbers)"), ExtractConfig, "config_",
                      help_overrides={"model": "Hub id or local directory (default: m-a-p/MERT-v1-95M; retry-failed: "
                                               "the dataset's model)"})
    add_model_options(p.add_argument_group("the run"), RunOptions, "run_",
                      help_overrides={"gpu_limit": "Prefect global concurrency limit held during model work ('' "
                                                   "for none; not given: 'gpu' with a Prefect server, none on "
                                                   "the temporary API)"})
    p.add_argument("--reextract", action="store_true",
                   help="the dataset holds features of another config (model weights, window, hop, precision): "
                        "replace them (refused without this; to keep both, name another --dataset)")


def _register_deployment_commands(sub: argparse._SubParsersAction) -> None:
    """`serve` and `watch` start things (deployments/)."""
    from cli.watch import register as register_watch

    register_watch(sub)
    p = sub.add_parser("serve", help="serve every deployment of prefect.yaml (schedules included) from this "
                                     "process, against the server at PREFECT_API_URL")
    p.add_argument("names", nargs="*", help="only these deployments (default: all)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    prepare_prefect(verbose=True)  # served runs send their INFO lines to the UI
    from deployments.serve import serve_all

    serve_all(args.names)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mess-ai", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract MERT features for new or changed audio files (a Prefect flow run)")
    p.add_argument("audio_dir", type=Path, help="folder of recordings (searched recursively)")
    _add_store_args(p)
    _add_extract_args(p)
    p.add_argument("--only-failed", action="store_true", help="re-run only the files whose last attempt failed")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("retry-failed", help="re-run only the failed files of a dataset (a Prefect flow run)")
    _add_store_args(p)
    p.add_argument("--audio-dir", type=Path, default=None,
                   help="the audio folder (default: read back from the manifest)")
    _add_extract_args(p)
    p.set_defaults(func=cmd_retry_failed)

    p = sub.add_parser("check", help="verify the store: files, shapes, finite values, no orphans")
    _add_store_args(p)
    p.add_argument("--quick", action="store_true", help="shapes only, do not read every value")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("failures", help="list failed files with stage, reason and attempts")
    _add_store_args(p)
    p.set_defaults(func=cmd_failures)

    p = sub.add_parser(
        "export", help="write a dataset's embeddings as Parquet tables (per track, per window) for pandas, polars, "
                       "DuckDB and Hugging Face datasets",
        description="Write the embeddings of one dataset to OUT/<dataset>/: tracks/part-*.parquet (one row per track: "
                    "ids, paths, sha256, duration, aggregated embeddings), windows/part-*.parquet (one row per window: "
                    "track id, index, start and end seconds, segment embeddings) and export.json (which tracks each "
                    "part holds). Run again, it rewrites only the parts whose tracks changed. The raw frame-level "
                    "features (float16, --keep-raw) are not exported.")
    _add_store_args(p)
    p.add_argument("--format", choices=["parquet"], default="parquet", help="file format (parquet, the only one)")
    p.add_argument("--out", required=True, type=Path, help="folder of exports: the tables go to OUT/<dataset>/")
    p.add_argument("--layer", default="all",
                   help="'all' (default): one column per hidden state, layer_0 ... layer_<n-1>; 'mean' or a "
                        "hidden-state index: one column, embedding. Each a fixed-size list of float32")
    p.set_defaults(func=cmd_export)

    analysis_cli.register(sub, analyze_runner=_analyze_via_flow)
    _register_deployment_commands(sub)

    p = sub.add_parser("make-test-model",
                       help="write a MERT-v1-format checkpoint with RANDOM weights (tests, demo, benchmarks)")
    p.add_argument("directory", type=Path)
    p.add_argument("--size", choices=["tiny", "base"], default="tiny",
                   help="tiny: well under 1 MB; base: the real MERT-v1-95M shape (about 380 MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    p.set_defaults(func=cmd_make_test_model)

    p = sub.add_parser("demo", help="offline demo: synthetic audio + a random-weight test model -> features")
    p.add_argument("--workdir", default=".demo", help="where the demo writes everything (default .demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` and return its exit code. ``argv`` None: the command line of this process (the
    `mess-ai` script, ``python -m cli``), which then ends here (``_end_process``)."""
    code = _run(build_parser().parse_args(argv))
    if argv is None:
        _end_process(code)
    return code


def _end_process(code: int) -> NoReturn:
    """End this process as the interpreter would, without its teardown: with torch, transformers and Prefect loaded,
    freeing every module's objects one by one took 1 to 1.5 s after the command was done (2-core machine). What an
    ending must do still happens: other threads are waited for, the atexit handlers run (Prefect sends its last logs
    and events to the API, logging flushes its handlers), and the output is flushed."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Commands that run for days (watch, serve) say when each thing happened; the others print a plain report.
    when = "%(asctime)s " if args.command in LONG_RUNNING_COMMANDS else ""
    logging.basicConfig(level=level, format=when + ("%(levelname)s %(message)s" if args.verbose else "%(message)s"),
                        datefmt="%Y-%m-%d %H:%M:%S")
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (MessError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"mess-ai: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mess-ai: interrupted; finished files are kept, the rest is redone on the next run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
