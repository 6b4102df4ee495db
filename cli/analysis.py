"""The ``similar`` and ``analyze`` subcommands, added to the ``mess-ai`` parser by ``register(subparsers)``.

Both are thin shells over ``find_similar`` (``embed_recording`` and ``find_similar_to_embedding`` for
``similar --audio``) and ``run_analysis``. Exit codes: 0 done, 2 usage error (unknown track, bad labels, missing
store, an unusable recording or model), with ``mess-ai: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cli.options import add_command, add_store_options
from mess_ai.errors import MessError

if TYPE_CHECKING:
    from mess_ai.analysis.results import AnalysisReport

EXIT_OK, EXIT_USAGE = 0, 2
_USAGE_ERRORS = (MessError, ValueError, FileNotFoundError, NotADirectoryError)


def _layer(text: str):
    from mess_ai.analysis.preprocessing import parse_layer

    try:
        return parse_layer(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(value: float | None, spec: str = ".2f") -> str:
    return "undefined" if value is None else format(value, spec)


def _fail(exc: Exception) -> int:
    print(f"mess-ai: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def cmd_similar(args: argparse.Namespace) -> int:
    if args.audio is not None:
        return _similar_to_audio(args)
    from mess_ai.analysis.search import find_similar

    try:
        results = find_similar(args.store, args.dataset, args.track, k=args.k, layer=args.layer,
                               diverse=args.diverse, manifest_url=args.manifest_url)
    except _USAGE_ERRORS as exc:
        return _fail(exc)
    _print_similar(args, results, args.track)
    return EXIT_OK


def _similar_to_audio(args: argparse.Namespace) -> int:
    from mess_ai.analysis.audio_search import embed_recording, find_similar_to_embedding
    from mess_ai.analysis.search import check_k

    try:
        check_k(args.k)
        recording = embed_recording(args.store, args.dataset, args.audio, manifest_url=args.manifest_url)
        results = find_similar_to_embedding(args.store, recording, args.k, args.layer, args.diverse,
                                            manifest_url=args.manifest_url)
    except (*_USAGE_ERRORS, OSError) as exc:  # OSError: the recording cannot be read (no permission, I/O)
        return _fail(exc)
    if not args.json:
        print(f"embedded {recording.path}: {recording.duration_seconds:.1f} s, {recording.n_windows} window"
              f"{'s' * (recording.n_windows != 1)}, model {recording.model} (as dataset '{recording.dataset}')")
    _print_similar(args, results, str(recording.path))
    return EXIT_OK


def _print_similar(args: argparse.Namespace, results: list[dict], query: str) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
        return
    how = "diversified (maximal marginal relevance)" if args.diverse else "most similar"
    print(f"{len(results)} {how} tracks to {query} (layer {args.layer}, cosine of centred embeddings):")
    for r in results:
        print(f"  {r['rank']:3d}. {r['similarity']:+.3f}  {r['relative_path']}  [{r['track_id']}]")


def _print_clusters(report: AnalysisReport) -> None:
    from mess_ai.analysis.results import DbscanClustering, SkippedClustering

    kmeans = report.clusters.kmeans
    print(f"  k-means: {kmeans.n_clusters} clusters ({kmeans.chosen_by}), sizes {list(kmeans.sizes)}, "
          f"silhouette {_number(kmeans.silhouette)}")
    for name, method in (("agglomerative", report.clusters.agglomerative), ("dbscan", report.clusters.dbscan)):
        if isinstance(method, SkippedClustering):
            print(f"  {name}: skipped ({method.skipped})")
        else:
            noise = f", {method.n_noise} noise" if isinstance(method, DbscanClustering) else ""
            print(f"  {name}: {method.n_clusters} cluster{'' if method.n_clusters == 1 else 's'}, sizes "
                  f"{list(method.sizes)}{noise}, silhouette {_number(method.silhouette)}")


def _print_labels(report: AnalysisReport) -> None:
    for column, metrics in report.labels.columns.items():
        coverage = report.coverage.get(column)
        under = [u.label for u in coverage.under_covered] if coverage else []
        print(f"  label '{column}': {metrics.n_labelled} labelled, k-NN accuracy "
              f"{_number(metrics.knn_accuracy)}" + (f", under-covered: {', '.join(under)}" if under else ""))
    rows = report.method_comparison.methods
    for column in rows[0].knn_label_agreement:
        scored = [r for r in rows if r.knn_label_agreement[column] is not None]
        if scored:
            best = max(scored, key=lambda r: r.knn_label_agreement[column])
            print(f"  best of {len(rows)} methods for '{column}': {best.method} (k-NN agreement "
                  f"{best.knn_label_agreement[column]:.2f})")
    baseline = report.baseline
    if baseline.available:
        accuracies = ", ".join(f"'{c}' k-NN accuracy {m.knn_accuracy:.2f}"
                               for c, m in baseline.labels.items() if m.knn_accuracy is not None)
        print(f"  MFCC + chroma baseline: {baseline.n_tracks} tracks, agreement with the embedding clusters "
              f"(ARI) {baseline.agreement_with_embedding_clusters_ari:.2f}" + (f", {accuracies}" if accuracies
                                                                              else ""))
    else:
        print(f"  MFCC + chroma baseline: not computed ({baseline.reason})")


def print_report(report: AnalysisReport) -> None:
    """The report's summary, for a person at a terminal."""
    dims = report.dimension
    print(f"mess-ai analyze: dataset '{report.dataset}', {report.n_tracks} tracks "
          f"({report.n_hidden_states} hidden states x {report.hidden_size})")
    _print_clusters(report)
    print(f"  outliers: {len(report.outliers.tracks)}   near-duplicate pairs: "
          f"{report.near_duplicates.count}   anisotropy: {report.quality.anisotropy:.2f}")
    print(f"  intrinsic dimension (TwoNN): {_number(dims.intrinsic_dimension, '.1f')}   PCA components for "
          f"90 % / 95 %: {dims.pca_components_90} / {dims.pca_components_95}   participation ratio: "
          f"{_number(dims.participation_ratio, '.1f')}   Vendi score: {report.diversity.vendi_score:.2f}")
    _print_labels(report)
    for note in report.notes:
        print(f"  note: {note}")
    print(f"  report: {report.files.report}")
    for name, path in report.files.plots.items():
        print(f"  plot {name}: {path}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from mess_ai.packages import check_analysis_packages
    from mess_ai.analysis.report import run_analysis
    from mess_ai.analysis.results import AnalysisReport

    runner = args.analyze_runner or run_analysis
    try:
        # run_analysis checks too; checking here first starts no flow run that could only fail.
        check_analysis_packages(baseline=not args.no_baseline)
        result = runner(args.store, args.dataset, labels_csv=args.labels, n_clusters=args.clusters,
                        baseline=not args.no_baseline, manifest_url=args.manifest_url)
    except _USAGE_ERRORS as exc:
        return _fail(exc)
    # A flow run returns the report as JSON.
    report = result if isinstance(result, AnalysisReport) else AnalysisReport.from_json(result)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction,
             analyze_runner: Callable[..., AnalysisReport | dict] | None = None) -> None:
    """Add ``similar`` and ``analyze`` to the ``mess-ai`` subcommands. ``analyze_runner`` replaces
    ``run_analysis`` (same arguments), e.g. to run it as a Prefect flow; it may return the report's JSON."""
    p = add_command(subparsers, "similar", help="tracks most similar to one track of the store, or to a recording",
                    description="the tracks most similar to one track of the store, or to a recording outside it "
                                "(cosine of centred embeddings)",
                    example="mess-ai similar --store ~/mess-store piano/arpeggio.ogg -k 5 --diverse\n"
                            "  mess-ai similar --store ~/mess-store --audio ~/new/take3.wav -k 5")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("track", metavar="TRACK_ID", nargs="?",
                       help="track id, path relative to the audio folder, or a file name only one track has")
    query.add_argument("--audio", type=Path, metavar="FILE",
                       help="a recording (not added to the store), embedded as the dataset's own files were: "
                            "with the model, windows and precision of its provenance.json (required unless TRACK_ID is given)")
    add_store_options(p, dataset_default="the store's only one")
    p.add_argument("-k", type=int, default=10, help="number of tracks to list (default: 10)")
    p.add_argument("--layer", type=_layer, default="mean",
                   help="hidden state to compare (0 = CNN front end) or 'mean' over all (default: mean)")
    p.add_argument("--diverse", action="store_true",
                   help="re-rank by maximal marginal relevance, so near-duplicates do not fill the list")
    p.set_defaults(func=cmd_similar)

    p = add_command(subparsers, "analyze", help="report + plots: clusters, quality, diversity, labels",
                    description="quality, dimension per layer, clusters, diversity, label coverage and a "
                                "comparison of methods: a report and plots in <store>/<dataset>/reports (needs the "
                                "analysis extra: pip install 'mess-ai[analysis]')",
                    example="mess-ai analyze --store ~/mess-store --labels labels.csv")
    add_store_options(p, dataset_default="the store's only one",
                      json_help="print the report as JSON instead of a summary")
    p.add_argument("--labels", type=Path, default=None,
                   help="CSV with a 'file' column (file name, relative path or track id) and label columns "
                        "(default: the tracks' top folders, when there are at least two)")
    p.add_argument("--clusters", type=int, default=None, help="number of clusters (default: best silhouette)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the MFCC + chroma baseline (it decodes every source file once, then is cached)")
    p.set_defaults(func=cmd_analyze, analyze_runner=analyze_runner)
