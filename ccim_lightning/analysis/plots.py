"""The bias report's figures: the ratio heatmap and the per-emotion entropy distributions (paper Fig. 2, one grid).

They read a :class:`~ccim_lightning.analysis.report.BiasReport`'s tables. pyplot is imported on first use, with the
file-only Agg backend, so importing this module (or computing a report) needs no display.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ccim_lightning.analysis.report import BiasReport, shorten
from ccim_lightning.analysis.statistics import entropy_histogram_counts

__all__ = [
    "ENTROPY_BIN_LABELS",
    "entropy_distribution",
    "plot_entropy_histograms",
    "plot_ratio_heatmap",
    "write_figures",
]
log = logging.getLogger(__name__)


def write_figures(report: BiasReport, out_dir: str | os.PathLike, max_heatmap_contexts: int = 40) -> dict[str, Path]:
    """Writes ``ratio_heatmap.png`` and ``entropy_histograms.png`` into ``out_dir``; none without eligible contexts.

    Args:
        report: The report.
        out_dir: Output folder (created if needed).
        max_heatmap_contexts: Most rows of the heatmap.

    Returns:
        The written files by kind (``"heatmap"``, ``"histograms"``); empty when no context has ``min_count`` samples.
    """
    if not report.contexts["eligible"].any():
        log.warning("No context has >= %d samples: no plots written (lower --min-count).", report.min_count)
        return {}
    out = Path(out_dir).expanduser()
    return {
        "heatmap": plot_ratio_heatmap(report, out / "ratio_heatmap.png", max_heatmap_contexts),
        "histograms": plot_entropy_histograms(report, out / "entropy_histograms.png"),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratio_heatmap(report: BiasReport, path: str | os.PathLike, max_contexts: int = 40) -> Path:
    """Heatmap of P(emotion | context) / P(emotion), log colour scale centred at 1 (blue: rarer, red: more often).

    Rows: the eligible contexts with the largest contribution to the mutual information (at most ``max_contexts``);
    columns: emotions from the most to the least frequent. A ratio of 0 (never in that context) is drawn at the
    colour scale's lower end.

    Args:
        report: The report.
        path: PNG file to write.
        max_contexts: Most rows to show.

    Returns:
        The path written.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    rows = report.contexts[report.contexts["eligible"]].head(max_contexts)
    columns = report.emotions.sort_values("prevalence", ascending=False, kind="stable")["emotion"].tolist()
    grid = (
        report.cells.pivot(index="context", columns="emotion", values="ratio")
        .reindex(index=rows["context"], columns=columns)
        .to_numpy(np.float64)
    )
    finite = grid[np.isfinite(grid) & (grid > 0)]
    limit = float(np.clip(np.exp(np.abs(np.log(finite)).max()) if finite.size else 2.0, 2.0, 10.0))
    figure, axis = plt.subplots(figsize=(min(3.0 + 0.42 * len(columns), 24), min(2.2 + 0.34 * len(rows), 20)))
    image = axis.imshow(
        np.clip(np.nan_to_num(grid, nan=1.0), 1 / limit, limit),
        cmap="RdBu_r",
        aspect="auto",
        norm=LogNorm(vmin=1 / limit, vmax=limit),
        interpolation="nearest",
    )
    if grid.size <= 400:
        _annotate(axis, grid, limit)
    axis.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(
        range(len(rows)), [f"{shorten(c, 28)} (n={n:,})" for c, n in zip(rows["context"], rows["count"])], fontsize=8
    )
    axis.set_title(
        f"P(emotion | {report.context_name}) / P(emotion), {len(rows)} of "
        f"{report.summary['num_contexts']} contexts (n >= {report.min_count})",
        fontsize=10,
    )
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10) if 1 / limit <= t <= limit]
    bar = figure.colorbar(image, ax=axis, shrink=0.8, pad=0.01, label="ratio (log scale)", ticks=ticks)
    bar.ax.set_yticklabels([f"{t:g}" for t in ticks])
    bar.ax.minorticks_off()
    figure.tight_layout()
    return _save(figure, path)


def _annotate(axis: Any, grid: np.ndarray, limit: float) -> None:
    """Writes each cell's ratio into it, in white on the darkest colours."""
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            dark = abs(math.log(max(value, 1 / limit))) > 0.6 * math.log(limit)
            text = f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
            axis.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")


ENTROPY_BIN_LABELS = ["0", *[f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)], ">1"]
"""Column labels of the entropy plot: exactly 0, the deciles of (0, 1], above 1 (``entropy_histogram_counts``)."""


def entropy_distribution(report: BiasReport) -> tuple[list[str], np.ndarray]:
    """Per emotion, how many eligible contexts fall in each normalised-entropy bin (:data:`ENTROPY_BIN_LABELS`).

    Emotions never or always present (no defined value) are left out.

    Returns:
        The emotion names (report order) and their (emotions, 12) int counts.
    """
    cells = report.cells[report.cells["eligible"]]
    names, rows = [], []
    for name in report.emotions["emotion"]:
        values = cells.loc[cells["emotion"] == name, "normalised_entropy"].to_numpy(np.float64)
        if np.isfinite(values).any():
            names.append(name)
            rows.append(entropy_histogram_counts(values))
    return names, np.array(rows, dtype=np.int64).reshape(len(rows), len(ENTROPY_BIN_LABELS))


def plot_entropy_histograms(report: BiasReport, path: str | os.PathLike) -> Path:
    """One panel: per emotion (row), how the eligible contexts spread over the normalised conditional entropy.

    The paper's Fig. 2 draws one histogram per emotion; with many emotions (EMOTIC's 26) such small multiples are
    too small to read, so the histograms are the rows of one grid instead: columns are exactly 0 (the context
    decides the emotion), the deciles of (0, 1] and above 1; each cell holds the number of contexts, its colour
    their share. A dataset whose contexts matter has its mass on the left.

    Args:
        report: The report.
        path: PNG file to write.

    Returns:
        The path written.
    """
    plt = _pyplot()
    names, counts = entropy_distribution(report)
    contexts = int(report.contexts["eligible"].sum())
    share = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(8.5, min(1.6 + 0.3 * max(len(names), 1), 14)))
    image = axis.imshow(share, cmap="Blues", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    for (i, j), value in np.ndenumerate(counts):
        if value:
            color = "white" if share[i, j] > 60 else "black"
            axis.text(j, i, f"{value}", ha="center", va="center", fontsize=7, color=color)
    axis.set_xticks(range(len(ENTROPY_BIN_LABELS)), ENTROPY_BIN_LABELS, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(names)), [shorten(name, 24) for name in names], fontsize=8)
    axis.set_xlabel(
        f"H(e | {report.context_name}=k) / H(e): 0 = the context decides the emotion, 1 = as uncertain as overall",
        fontsize=8,
    )
    axis.set_ylabel("emotion", fontsize=9)
    axis.set_title(
        f"How much each {report.context_name} decides each emotion: number of the {contexts} contexts "
        f"(n >= {report.min_count}) per bin",
        fontsize=9,
    )
    figure.colorbar(image, ax=axis, shrink=0.8, pad=0.01, label="% of the contexts (row)")
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Any, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
