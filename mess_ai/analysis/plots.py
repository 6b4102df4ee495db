"""The report's PNG plots, drawn with matplotlib's Agg canvas (no display, no global pyplot state) and written
atomically. ``plot_report`` draws all of them from an ``AnalysisReport`` and the vectors it describes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mess_ai.analysis.dataset_analysis import MAX_SAMPLE_TRACKS
from mess_ai.analysis.embedding_diversity import pairwise_similarities
from mess_ai.analysis.results import AnalysisReport, Clustering, Coverage, LayerMetrics, MethodComparison
from mess_ai.store.atomic import atomic_target

_UNLABELLED = "(no label)"
# Track names are written beside the points only while they stay readable.
_MAX_ANNOTATED = 30
_MAX_LEGEND = 20


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _save(fig, path: Path) -> Path:
    with atomic_target(path) as temp:
        fig.savefig(temp, format="png")
    return path


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _natural(text: str) -> list:
    """Sort key that puts "cluster 2" before "cluster 10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _uncrowded(coords: np.ndarray, first: Sequence[int], width: float = 0.22, height: float = 0.06) -> list[int]:
    """Points to name on a map: ``first`` (the outliers), then each point whose name (a box ``width`` x ``height``
    of the map's extent) would not overlap a name already placed, so names never pile up on a tight cluster."""
    extent = np.ptp(coords, axis=0)
    scaled = coords / np.where(extent > 0, extent, 1.0)
    chosen: list[int] = []
    for i in [*first, *range(len(coords))]:
        if i not in chosen and all(abs(scaled[i, 0] - scaled[j, 0]) >= width or
                                   abs(scaled[i, 1] - scaled[j, 1]) >= height for j in chosen):
            chosen.append(i)
    return chosen


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def plot_map(path: Path, coords: np.ndarray, groups: dict[str, Sequence], names: Sequence[str],
             explained: Sequence[float], outliers: Sequence[int], title: str,
             exemplars: dict[str, Sequence[int]] | None = None) -> Path:
    """2-D map coords [n, 2], one panel per grouping (``{"k-means cluster": [...], "label 'genre'": [...]}``),
    up to three panels a row; ``exemplars`` marks each cluster's exemplar in that grouping's panel."""
    panels = list(groups.items())
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = _figure(6.2 * ncols, 5.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    annotate = len(names) <= _MAX_ANNOTATED
    for ax, (group_name, values) in zip(axes, panels):
        shown = [_UNLABELLED if v is None else str(v) for v in values]
        kinds = sorted(set(shown) - {_UNLABELLED}, key=_natural) + (
            [_UNLABELLED] if _UNLABELLED in shown else [])
        colours = _colours(len(kinds))
        for kind, colour in zip(kinds, colours):
            mask = np.array([s == kind for s in shown])
            grey = kind in (_UNLABELLED, "noise")
            ax.scatter(coords[mask, 0], coords[mask, 1], s=46, alpha=0.85, edgecolors="white", linewidths=0.6,
                       color="lightgrey" if grey else colour, label=f"{kind} ({int(mask.sum())})")
        if len(outliers):
            ax.scatter(coords[list(outliers), 0], coords[list(outliers), 1], s=170, facecolors="none",
                       edgecolors="crimson", linewidths=1.6, label=f"outlier ({len(outliers)})")
        marked = list((exemplars or {}).get(group_name, []))
        if marked:
            ax.scatter(coords[marked, 0], coords[marked, 1], s=260, marker="*", facecolors="none",
                       edgecolors="black", linewidths=1.2, label="cluster exemplar")
        if annotate:
            for i in _uncrowded(coords, first=[*outliers, *marked]):
                ax.annotate(_short(names[i]), coords[i], xytext=(5, 4), textcoords="offset points", fontsize=7.5,
                            color="dimgray")
        ax.set_title(f"coloured by {group_name}", fontsize=11)
        ax.set_xlabel(f"principal component 1 ({100 * explained[0]:.0f} % of variance)")
        ax.set_ylabel(f"principal component 2 ({100 * explained[1]:.0f} % of variance)"
                      if len(explained) > 1 else "principal component 2")
        ax.grid(alpha=0.3)
        if len(kinds) <= _MAX_LEGEND:
            ax.legend(fontsize=8, loc="best", framealpha=0.85, title=group_name, title_fontsize=8)
        ax.margins(0.15)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_explained_variance(path: Path, layer_ratios: Sequence[np.ndarray], mean_ratios: np.ndarray,
                            title: str) -> Path:
    """Cumulative explained variance over principal components, one curve per hidden state (``layer_ratios``,
    each float [n_components]) and one for the layer mean, with the 90 % and 95 % levels."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 5.2)
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    for layer, ratios in enumerate(layer_ratios):
        ratios = np.asarray(ratios)
        colour = cmap(layer / max(len(layer_ratios) - 1, 1))
        ax.plot(np.arange(1, len(ratios) + 1), np.cumsum(ratios), color=colour, linewidth=1.2,
                label=f"hidden state {layer}" if len(layer_ratios) <= 13 else None)
    mean_ratios = np.asarray(mean_ratios)
    ax.plot(np.arange(1, len(mean_ratios) + 1), np.cumsum(mean_ratios), color="black", linewidth=2.2,
            linestyle="--", label="layer mean")
    for level, style in ((0.9, "--"), (0.95, ":")):
        ax.axhline(level, color="grey", linestyle=style, linewidth=1)
        ax.text(0.01, level, f"{100 * level:.0f} %", transform=ax.get_yaxis_transform(), ha="left", va="bottom",
                fontsize=8, color="dimgray")
    n_components = max(len(mean_ratios), *(len(r) for r in layer_ratios))
    if n_components > 20:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(1, max(n_components, 2))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("cumulative fraction of variance explained")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper", frameon=False)
    ax.set_title(title, fontsize=12)
    return _save(fig, path)


def _label_separability(ax, per_layer: Sequence[LayerMetrics], label_columns: Sequence[str],
                        baseline_accuracy: Mapping[str, float | None]) -> None:
    """k-NN accuracy over hidden states per label column, with the baseline's as a dashed level."""
    layers = [m.layer for m in per_layer]
    if label_columns:
        for column, colour in zip(label_columns, _colours(len(label_columns))):
            accuracy = [np.nan if m.knn_accuracy.get(column) is None else m.knn_accuracy[column] for m in per_layer]
            ax.plot(layers, accuracy, marker="o", color=colour, label=column)
            if baseline_accuracy.get(column) is not None:
                ax.axhline(baseline_accuracy[column], color=colour, linestyle="--", linewidth=1,
                           label=f"{column}: MFCC+chroma baseline")
        ax.legend(fontsize=8, loc="best")
        ax.set_ylim(-0.02, 1.02)
    else:
        ax.text(0.5, 0.5, "no labels\n(--labels labels.csv)", ha="center", va="center", transform=ax.transAxes,
                color="dimgray")
    ax.set_title("label separability (leave-one-out k-NN)", fontsize=10)
    ax.set_ylabel("accuracy")


def plot_layer_metrics(path: Path, per_layer: Sequence[LayerMetrics], label_columns: Sequence[str],
                       baseline_accuracy: Mapping[str, float | None], title: str) -> Path:
    """Curves over hidden states: cluster quality, label separability, diversity, anisotropy, dimension (TwoNN,
    PCA components for 90 % and 95 %, participation ratio) and vector length."""
    from matplotlib.ticker import MaxNLocator

    layers = [m.layer for m in per_layer]
    fig = _figure(17, 7.6)
    axes = fig.subplots(2, 4).ravel()

    def curve(ax, key, ylabel, subtitle, ylim=None, label=None, colour="steelblue"):
        values = [np.nan if getattr(m, key) is None else getattr(m, key) for m in per_layer]
        ax.plot(layers, values, marker="o", color=colour, label=label)
        ax.set_title(subtitle, fontsize=10)
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)

    curve(axes[0], "silhouette", "silhouette (cosine)", "cluster separation (k-means)", (-1, 1))
    _label_separability(axes[1], per_layer, label_columns, baseline_accuracy)
    curve(axes[2], "vendi_score", "Vendi score (effective number of tracks)", "diversity")
    curve(axes[3], "anisotropy", "mean cosine similarity (uncentred)", "anisotropy", (-0.05, 1.05))
    curve(axes[4], "intrinsic_dimension", "TwoNN estimate", "intrinsic dimension")
    curve(axes[5], "pca_components_90", "components", "PCA components for 90 % / 95 % of variance", label="90 %")
    curve(axes[5], "pca_components_95", "components", "PCA components for 90 % / 95 % of variance", label="95 %",
          colour="darkorange")
    axes[5].legend(fontsize=8, loc="best")
    axes[5].yaxis.set_major_locator(MaxNLocator(integer=True))
    curve(axes[6], "participation_ratio", "participation ratio", "effective dimension (PCA participation ratio)")
    ax = axes[7]
    mean, std = np.array([m.norm.mean for m in per_layer]), np.array([m.norm.std for m in per_layer])
    ax.plot(layers, mean, marker="o", color="steelblue", label="mean")
    ax.fill_between(layers, mean - std, mean + std, color="steelblue", alpha=0.2, label="± 1 std")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("vector length", fontsize=10)
    ax.set_ylabel("L2 norm")
    for ax in axes:
        ax.set_xlabel("hidden state (0 = CNN front end)")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def _bar_values(ax, bars, values: Sequence[float]) -> None:
    """Each horizontal bar's value at its end ("n/a" for NaN), so a 0 is told apart from a missing value."""
    for bar, value in zip(bars, values):
        text = "n/a" if np.isnan(value) else f"{value:.2f}"
        ax.annotate(text, (0 if np.isnan(value) else max(value, 0), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=7, color="dimgray")


def plot_method_comparison(path: Path, comparison: MethodComparison, title: str) -> Path:
    """The method comparison table as bars (k-NN label agreement per label column, anisotropy, effective
    dimension) and the linear CKA of every pair of methods as a heat map."""
    rows = comparison.methods
    methods = [r.method for r in rows]
    positions = np.arange(len(methods))
    fig = _figure(15, 4.2 + 0.32 * len(methods))
    grid = fig.add_gridspec(1, 4, width_ratios=[1.3, 1, 1, 1.6])
    ax = fig.add_subplot(grid[0])
    columns = list(rows[0].knn_label_agreement) if rows else []
    if columns:
        height = 0.8 / len(columns)
        for c, (column, colour) in enumerate(zip(columns, _colours(len(columns)))):
            agreement = [np.nan if r.knn_label_agreement[column] is None else r.knn_label_agreement[column]
                         for r in rows]
            bars = ax.barh(positions - 0.4 + (c + 0.5) * height, agreement, height=height, color=colour,
                           label=column)
            _bar_values(ax, bars, agreement)
        ax.set_xlim(0, 1.15)
        ax.legend(fontsize=8, loc="lower right", title="label", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no labels\n(--labels labels.csv)", ha="center", va="center", transform=ax.transAxes,
                color="dimgray")
    ax.set_title("label agreement (leave-one-out k-NN)", fontsize=10)
    ax.set_yticks(positions, methods, fontsize=8)
    for ax, key, subtitle, xlabel in (
            (fig.add_subplot(grid[1]), "anisotropy", "anisotropy", "mean cosine similarity of track pairs"),
            (fig.add_subplot(grid[2]), "effective_dimension", "effective dimension", "PCA participation ratio")):
        measured = [np.nan if getattr(r, key) is None else getattr(r, key) for r in rows]
        _bar_values(ax, ax.barh(positions, measured, color="steelblue"), measured)
        ax.set_xmargin(0.25)
        ax.set_yticks(positions, [])
        ax.set_title(subtitle, fontsize=10)
        ax.set_xlabel(xlabel)
    for ax in fig.axes:
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    ax = fig.add_subplot(grid[3])
    matrix = np.array([[np.nan if v is None else v for v in row] for row in comparison.cka], dtype=float)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(positions, methods, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(positions, methods, fontsize=7)
    if len(methods) <= 20:
        for i, j in np.ndindex(matrix.shape):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if matrix[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="linear CKA")
    ax.set_title("similarity of methods (linear CKA)", fontsize=10)
    fig.suptitle(f"{title} ({comparison.n_tracks} tracks)", fontsize=12)
    return _save(fig, path)


def plot_coverage(path: Path, coverage: Mapping[str, Coverage], title: str, max_columns: int = 3) -> Path:
    """Per label column (the first ``max_columns``): tracks per label with under-covered labels in red and each
    label's spread, and the cosine distances between label centroids."""
    from matplotlib.ticker import MaxNLocator

    columns = list(coverage.items())[:max_columns]
    fig = _figure(13, 4.6 * len(columns))
    axes = fig.subplots(len(columns), 2, squeeze=False, width_ratios=[1.3, 1])
    for (column, result), (bars, heat) in zip(columns, axes):
        names = list(result.labels)
        under = {u.label for u in result.under_covered}
        counts = [result.labels[name].n_tracks for name in names]
        positions = np.arange(len(names))
        bars.bar(positions, counts, color=["crimson" if name in under else "steelblue" for name in names])
        bars.set_xticks(positions, [_short(name, 18) for name in names], rotation=45, ha="right", fontsize=8)
        bars.set_ylabel("tracks")
        bars.yaxis.set_major_locator(MaxNLocator(integer=True))
        spread = bars.twinx()
        spreads = [np.nan if result.labels[name].spread is None else result.labels[name].spread for name in names]
        spread.plot(positions, spreads, "o", color="darkorange", label="spread")
        spread.set_ylabel("spread (mean cosine distance to the label's centre)", fontsize=8)
        top = np.nanmax(spreads) if np.isfinite(spreads).any() else 0.0
        spread.set_ylim(0, 1.15 * top if top > 0 else 1.0)
        agreement = result.knn_agreement
        bars.set_title(f"label '{column}': tracks per label (red: under-covered), k-NN agreement "
                       f"{'undefined' if agreement is None else f'{agreement:.2f}'}", fontsize=10)
        bars.grid(alpha=0.3, axis="y")
        matrix = np.array([[np.nan if v is None else v for v in row] for row in result.centroid_distances],
                          dtype=float)
        image = heat.imshow(matrix, vmin=0, cmap="magma_r")
        heat.set_xticks(positions, [_short(name, 14) for name in names], rotation=60, ha="right", fontsize=7)
        heat.set_yticks(positions, [_short(name, 14) for name in names], fontsize=7)
        if len(names) <= 12:
            for i, j in np.ndindex(matrix.shape):
                if i != j and np.isfinite(matrix[i, j]):
                    heat.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if matrix[i, j] > 0.6 * np.nanmax(matrix) else "black")
        fig.colorbar(image, ax=heat, shrink=0.8, label="cosine distance")
        heat.set_title("distance between label centres", fontsize=10)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_similarity_histogram(path: Path, similarities: np.ndarray, duplicate_similarity: float, title: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    similarities = np.asarray(similarities)
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    bins = int(np.clip(np.sqrt(similarities.size), 10, 100))
    ax.hist(similarities, bins=bins, range=(-1, 1), color="steelblue", alpha=0.8,
            edgecolor="white" if bins <= 40 else None)
    ax.axvline(duplicate_similarity, color="crimson", linestyle="--", linewidth=1.2,
               label=f"near-duplicate threshold ({duplicate_similarity:g})")
    ax.axvline(float(similarities.mean()), color="darkorange", linewidth=1.2,
               label=f"mean ({similarities.mean():.2f})")
    ax.set_xlabel("cosine similarity of a track pair (centred embeddings)")
    ax.set_ylabel("number of track pairs")
    ax.set_xlim(-1, 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # headroom, so the legend never covers a bar
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    ax.set_title(f"{title} ({similarities.size} pairs)", fontsize=12)
    return _save(fig, path)


def _map_panels(report: AnalysisReport) -> tuple[dict[str, list], dict[str, list[int]]]:
    """The map's panels: each clustering and the first three label columns (group per track), and each
    clustering's exemplars (track indices)."""
    index = {t.track_id: i for i, t in enumerate(report.tracks)}

    def exemplars(method: Clustering) -> list[int]:
        return [index[e.track_id] for e in method.exemplars]

    clusters = report.clusters
    groups = {"k-means cluster": [f"cluster {t.cluster}" for t in report.tracks]}
    marked = {"k-means cluster": exemplars(clusters.kmeans)}
    for name, method, key in (("agglomerative", clusters.agglomerative, "cluster_agglomerative"),
                              ("DBSCAN", clusters.dbscan, "cluster_dbscan")):
        if isinstance(method, Clustering):
            groups[f"{name} cluster"] = ["noise" if getattr(t, key) < 0 else f"cluster {getattr(t, key)}"
                                         for t in report.tracks]
            marked[f"{name} cluster"] = exemplars(method)
    groups.update({f"label '{c}'": [t.labels[c] for t in report.tracks] for c in list(report.labels.columns)[:3]})
    return groups, marked


def plot_report(report: AnalysisReport, vectors: np.ndarray, report_dir: Path) -> dict[str, Path]:
    """Every plot of ``report`` into ``report_dir``; ``vectors`` float [n_tracks, hidden] are the layer means it
    describes (for the similarity histogram). Returns {plot name: PNG file}."""
    title = f"{report.dataset}: {report.n_tracks} tracks"
    index = {t.track_id: i for i, t in enumerate(report.tracks)}
    groups, exemplars = _map_panels(report)
    columns = list(report.labels.columns)
    baseline_accuracy = {c: m.knn_accuracy for c, m in report.baseline.labels.items()}
    plots = {
        "map": plot_map(report_dir / "map.png", np.array([t.map for t in report.tracks]), groups,
                        [t.relative_path for t in report.tracks], report.map_variance,
                        [index[o.track_id] for o in report.outliers.tracks],
                        f"{title}, PCA map of the track embeddings", exemplars),
        "explained_variance": plot_explained_variance(
            report_dir / "explained_variance.png", [m.explained_variance_ratio for m in report.per_layer],
            report.dimension.explained_variance_ratio, f"{title}, PCA of each hidden state"),
        "layer_metrics": plot_layer_metrics(report_dir / "layer_metrics.png", report.per_layer, columns,
                                            baseline_accuracy, f"{title}, metrics per hidden state"),
        "similarity_histogram": plot_similarity_histogram(
            report_dir / "similarity_histogram.png",
            pairwise_similarities(vectors, MAX_SAMPLE_TRACKS, report.random_state),
            report.near_duplicates.min_similarity, f"{title}, pairwise similarities"),
        "method_comparison": plot_method_comparison(report_dir / "method_comparison.png", report.method_comparison,
                                                    f"{title}, embedding methods compared"),
    }
    if report.coverage:
        plots["coverage"] = plot_coverage(report_dir / "coverage.png", report.coverage,
                                          f"{title}, coverage of the labels")
    return plots
