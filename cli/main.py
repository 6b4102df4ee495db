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

import mess_ai
from cli import analysis as analysis_cli
from cli.options import (
    INCOMING_ENV,
    MANIFEST_URL_ENV,
    MODEL_ENV,
    STORE_ENV,
    HelpFormatter,
    Parser,
    add_command,
    add_global_flags,
    add_model_options,
    add_store_options,
    env_value,
    model_from_options,
)
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
    """Hand ``--manifest-url`` (given, or its default $MESS_AI_MANIFEST_URL) to an in-process flow run through this
    process's MESS_AI_MANIFEST_URL, never as a flow parameter: Prefect stores parameters (on the user's server too,
    with PREFECT_API_URL) and shows them in its UI, password included. No URL: the SQLite file in the store, as for
    the commands that run no flow."""
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
    if args.config_model is None:
        # The dataset's own model before $MESS_AI_MODEL: that is a default for new extractions, and a dataset of
        # another model would refuse it.
        args.config_model = _model_of_dataset(args.store, args.dataset) or env_value(MODEL_ENV)
    return _run_extract_flow(args, audio_dir, only_failed=True)


def _model_of_dataset(store: Path, dataset: str | None) -> str | None:
    """The model recorded in the dataset's provenance.json; None without a dataset or its provenance."""
    if not dataset:
        return None
    provenance = Path(store) / dataset / "provenance.json"
    return json.loads(provenance.read_text(encoding="utf-8")).get("model") if provenance.exists() else None


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


def _add_extract_args(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    """The settings of an extraction run. ``model_help`` None: ``--model`` defaults to $MESS_AI_MODEL, else the
    config's default; else ``--model`` takes no default from the environment and its help says ``model_help``."""
    from mess_ai.config import ExtractConfig, RunOptions

    add_model_options(p.add_argument_group("extraction (what makes the numbers)"), ExtractConfig, "config_",
                      help_overrides={"model": model_help} if model_help else None,
                      env=None if model_help else {"model": MODEL_ENV})
    add_model_options(p.add_argument_group("the run"), RunOptions, "run_",
                      help_overrides={"gpu_limit": "Prefect global concurrency limit held during model work, '' "
                                                   "for none (default: 'gpu' with a Prefect server, none on the "
                                                   "temporary API)"})
    p.add_argument("--reextract", action="store_true",
                   help="the dataset holds features of another config (model weights, window, hop, precision): "
                        "replace them (refused without this; to keep both, name another --dataset)")


def _register_deployment_commands(sub: argparse._SubParsersAction) -> None:
    """`serve` and `watch` start things (deployments/)."""
    from cli.watch import register as register_watch

    register_watch(sub)
    p = add_command(sub, "serve", help="serve every deployment of prefect.yaml here",
                    description="serve every deployment of prefect.yaml (schedules included) from this process, "
                                "against the Prefect server at PREFECT_API_URL; its paths and settings come from "
                                "the MESS_AI_* variables, as for `make deploy`",
                    example="PREFECT_API_URL=http://127.0.0.1:4200/api mess-ai serve nightly on-new-audio")
    p.add_argument("names", nargs="*", help="only these deployments (default: all)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    prepare_prefect(verbose=True)  # served runs send their INFO lines to the UI
    from deployments.serve import serve_all

    serve_all(args.names)
    return EXIT_OK


START_HERE = f"""\
start here:
  mess-ai demo                                  # offline: synthetic recordings + a random-weight model
  mess-ai extract ~/music --store ~/mess-store  # features of the new and changed recordings
  mess-ai analyze --store ~/mess-store          # report + plots; then `mess-ai similar TRACK --store ...`

Defaults from the environment, when set: {STORE_ENV} (--store), {MODEL_ENV} (--model), \
{MANIFEST_URL_ENV} (--manifest-url), {INCOMING_ENV} (the folder of `watch`).
`mess-ai COMMAND --help`: a command's options, their defaults and an example."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mess-ai", description="Folders of music recordings to MERT-v1 embeddings in a feature "
                                                "store, checked and analysed.", epilog=START_HERE,
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"mess-ai {mess_ai.__version__}")
    add_global_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    p = add_command(sub, "extract", help="extract features of new or changed recordings",
                    description="extract MERT features for the new or changed audio files of a folder (a Prefect "
                                "flow run); unchanged files are skipped",
                    example="mess-ai extract ~/music --store ~/mess-store")
    p.add_argument("audio_dir", type=Path, help="folder of recordings (searched recursively)")
    add_store_options(p, dataset_default="the audio folder's name")
    _add_extract_args(p)
    p.add_argument("--only-failed", action="store_true", help="re-run only the files whose last attempt failed")
    p.set_defaults(func=cmd_extract)

    p = add_command(sub, "retry-failed", help="re-run only the failed files of a dataset",
                    description="re-run only the failed files of a dataset (a Prefect flow run); the audio folder "
                                "and the model are read back from the store",
                    example="mess-ai retry-failed --store ~/mess-store")
    add_store_options(p, dataset_default="the one with failed files")
    p.add_argument("--audio-dir", type=Path, default=None,
                   help="the audio folder (default: read back from the manifest)")
    _add_extract_args(p, model_help=f"Hub id or local directory (default: the dataset's model, else ${MODEL_ENV}, "
                                    "else m-a-p/MERT-v1-95M)")
    p.set_defaults(func=cmd_retry_failed)

    p = add_command(sub, "check", help="verify the store: files, shapes, values, orphans",
                    description="verify the store: every file present with its shape, finite values, no orphans "
                                "or temporary files; exit 1 on any problem",
                    example="mess-ai check --store ~/mess-store")
    add_store_options(p, dataset_default="all")
    p.add_argument("--quick", action="store_true", help="shapes only, do not read every value")
    p.set_defaults(func=cmd_check)

    p = add_command(sub, "failures", help="list failed files with stage, reason and attempts",
                    example="mess-ai failures --store ~/mess-store")
    add_store_options(p, dataset_default="all")
    p.set_defaults(func=cmd_failures)

    p = add_command(sub, "export", help="write a dataset's embeddings as Parquet tables (per track, per window)",
                    description="Write the embeddings of one dataset to OUT/<dataset>/ for pandas, polars, DuckDB "
                                "and Hugging Face datasets: tracks/part-*.parquet (one row per track: ids, paths, "
                                "sha256, duration, aggregated embeddings), windows/part-*.parquet (one row per "
                                "window: track id, index, start and end seconds, segment embeddings) and "
                                "export.json (which tracks each part holds). Run again, it rewrites only the parts "
                                "whose tracks changed. The raw frame-level features (float16, --keep-raw) are not "
                                "exported.",
                    example="mess-ai export --store ~/mess-store --out ~/mess-export --layer mean")
    add_store_options(p, dataset_default="the store's only one")
    p.add_argument("--format", choices=["parquet"], default="parquet", help="file format (default: parquet, the only one)")
    p.add_argument("--out", required=True, type=Path, help="folder of exports: the tables go to OUT/<dataset>/ (required)")
    p.add_argument("--layer", default="all",
                   help="'all' (default): one column per hidden state, layer_0 ... layer_<n-1>; 'mean' or a "
                        "hidden-state index: one column, embedding. Each a fixed-size list of float32")
    p.set_defaults(func=cmd_export)

    analysis_cli.register(sub, analyze_runner=_analyze_via_flow)
    _register_deployment_commands(sub)

    p = add_command(sub, "make-test-model", help="write a MERT-format checkpoint with RANDOM weights",
                    description="write a MERT-v1-format checkpoint with RANDOM weights (for tests, the demo and "
                                "benchmarks: its embeddings mean nothing)",
                    example="mess-ai make-test-model /tmp/mert-tiny")
    p.add_argument("directory", type=Path, help="folder to write it to")
    p.add_argument("--size", choices=["tiny", "base"], default="tiny",
                   help="tiny: well under 1 MB; base: the real MERT-v1-95M shape, about 380 MB (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors",
                   help="weights file format (default: safetensors)")
    p.set_defaults(func=cmd_make_test_model)

    p = add_command(sub, "demo", help="offline demo: synthetic audio -> features",
                    description="offline demo: synthetic recordings and a random-weight test model through the "
                                "real pipeline (a Prefect flow run)",
                    example="mess-ai demo --workdir /tmp/mess-demo")
    p.add_argument("--workdir", default=".demo", help="where the demo writes everything (default: .demo)")
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
