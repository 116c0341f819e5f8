"""The bias report's figures: the ratio heatmap and the per-emotion entropy histograms (the paper's Fig. 2).

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

__all__ = ["plot_entropy_histograms", "plot_ratio_heatmap", "write_figures"]
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


def plot_entropy_histograms(report: BiasReport, path: str | os.PathLike, columns: int = 6) -> Path:
    """One histogram per emotion of the normalised conditional entropy over the eligible contexts (paper Fig. 2).

    Bars: exactly 0 (the context decides the emotion), the deciles of (0, 1], and above 1; heights are the share
    of the eligible contexts. Emotions never or always present (no defined value) are left out.

    Args:
        report: The report.
        path: PNG file to write.
        columns: Panels per row.

    Returns:
        The path written.
    """
    plt = _pyplot()
    cells = report.cells[report.cells["eligible"]]
    names = [
        e for e in report.emotions["emotion"] if cells.loc[cells["emotion"] == e, "normalised_entropy"].notna().any()
    ]
    rows = max(1, math.ceil(len(names) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 1.9 * rows + 0.6), sharex=True, squeeze=False)
    for axis, name in zip(axes.flat, names):
        counts = entropy_histogram_counts(cells.loc[cells["emotion"] == name, "normalised_entropy"].to_numpy())
        share = 100 * counts / max(counts.sum(), 1)
        axis.bar(range(len(counts)), share, color=["#c44e52"] + ["#4c72b0"] * 10 + ["#8172b2"], width=0.85)
        axis.set_title(f"{shorten(name, 22)} (zero: {share[0]:.0f}%)", fontsize=8)
        axis.set_ylim(0, 100)
        axis.tick_params(labelsize=6)
    for axis in axes.flat[len(names) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xticks([0, 5, 10, 11], ["0", ".5", "1", ">1"])
    figure.suptitle(
        f"Normalised conditional entropy H(e | {report.context_name}=k) / H(e) over the "
        f"{int(report.contexts['eligible'].sum())} contexts with n >= {report.min_count} "
        "(% of contexts; 0 = the context decides the emotion, 1 = as uncertain as overall)",
        fontsize=9,
    )
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Any, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
