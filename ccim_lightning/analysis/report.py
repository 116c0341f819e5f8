"""The :class:`BiasReport` of ``ccim bias-report``: its tables, the text summary, and the files it writes.

The report is a plain container of pandas tables; :func:`~ccim_lightning.analysis.statistics.compute_bias_report`
fills it (the definitions of every column are in that module's docstring). :func:`write_tables` saves the tables
as CSV and the summary as text and JSON; the figures are :mod:`ccim_lightning.analysis.plots`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["BiasReport", "shorten", "write_tables"]

log = logging.getLogger(__name__)


@dataclass
class BiasReport:
    """Everything :func:`~ccim_lightning.analysis.statistics.compute_bias_report` measured, in nats.

    Attributes:
        contexts: One row per context value (sorted by ``mi_contribution_nats``, largest first): ``context``,
            ``count``, ``share`` P(k), ``kl_nats`` (how far the context's label distribution is from the overall
            one: categorical KL for single-label data, the sum over emotions of the present/absent KL for
            multi-label data), ``mi_contribution_nats`` (= share x kl_nats; these sum to I(K; Y), or to
            sum_e I(K; e) for multi-label data), ``mean_normalised_entropy`` and ``min_normalised_entropy`` over
            the emotions, ``zero_entropy_emotions`` (how many emotions the context decides),
            ``top_emotion`` / ``top_ratio`` (the most over-represented emotion) and ``eligible``
            (count >= min_count).
        cells: One row per (context, emotion): ``context``, ``emotion``, ``count``, ``positives``, ``p_emotion``
            P(e|k), ``p_emotion_overall`` P(e), ``ratio``, ``entropy_bits``, ``normalised_entropy``,
            ``mi_contribution_nats`` (P(k) KL(P(e|k) || P(e)); sums over contexts to I(K; e)) and ``eligible``.
        emotions: One row per emotion: ``emotion``, ``positives``, ``prevalence`` P(e), ``entropy_nats`` H(e),
            ``mi_nats`` I(K; e), ``normalised_mi`` I(K; e) / H(e), ``null_normalised_mi`` (the same with permuted
            contexts), ``zero_entropy_share`` and ``median_normalised_entropy`` over the eligible contexts.
        summary: Scalars (see :meth:`to_text`), JSON-serialisable.
        context_name: What the context is (a column name, ``"cluster"``), for titles.
        min_count: Contexts with fewer samples are left out of rankings and histograms.
        top: How many entries each ranking of the text summary lists.
    """

    contexts: pd.DataFrame
    cells: pd.DataFrame
    emotions: pd.DataFrame
    summary: dict[str, Any]
    context_name: str = "context"
    min_count: int = 20
    top: int = 10

    def to_text(self) -> str:
        """The short text summary that the command prints and saves."""
        return "\n".join(
            [
                *self._header_lines(),
                *self._mi_lines(),
                *self._emotion_lines(),
                *self._context_lines(),
                *self._cell_lines(),
            ]
        )

    def _header_lines(self) -> list[str]:
        s = self.summary
        eligible = int(self.contexts["eligible"].sum())
        return [
            f"Context-bias report: context = {self.context_name} ({s['num_contexts']} values, {eligible} with >= "
            f"{self.min_count} samples), {s['num_samples']:,} samples, {s['num_emotions']} emotions ({s['task']})",
        ]

    def _mi_lines(self) -> list[str]:
        s = self.summary
        lines = ["Mutual information between context and label (plug-in, nats; chance = same with shuffled contexts):"]
        if s["task"] == "single-label":
            lines.append(
                f"  I(K;Y) = {s['mi_nats']:.4f} nats of H(Y) = {s['label_entropy_nats']:.4f}; "
                f"NMI (arithmetic) = {s['nmi']:.4f} (chance {s['null_nmi']:.4f}); "
                f"I(K;Y)/H(Y) = {s['mi_over_label_entropy']:.4f}"
            )
        lines.append(
            f"  mean over emotions of I(K;e)/H(e) = {s['mean_normalised_mi']:.4f} "
            f"(chance {s['null_mean_normalised_mi']:.4f}); sum over emotions of I(K;e) = {s['sum_emotion_mi_nats']:.4f}"
        )
        return lines

    def _emotion_lines(self) -> list[str]:
        by_mi = self.emotions.dropna(subset=["normalised_mi"]).sort_values("normalised_mi", ascending=False)
        top = ", ".join(f"{r.emotion} {r.normalised_mi:.3f}" for r in by_mi.head(self.top).itertuples())
        zero = self.emotions[self.emotions["zero_entropy_share"] > 0].sort_values("zero_entropy_share", ascending=False)
        zero_text = ", ".join(
            f"{r.emotion} {100 * r.zero_entropy_share:.0f}%" for r in zero.head(self.top).itertuples()
        )
        return [
            f"Most context-dependent emotions, I(K;e)/H(e): {top or 'none (no emotion varies)'}",
            f"Contexts (>= {self.min_count} samples) with zero entropy, i.e. always or never showing the emotion: "
            f"{zero_text or 'none, for every emotion'}",
        ]

    def _context_lines(self) -> list[str]:
        rows = self.contexts[self.contexts["eligible"]].head(self.top)
        lines = [f"Most biased contexts (>= {self.min_count} samples; by share x KL from the overall labels):"]
        for r in rows.itertuples():
            lines.append(
                f"  {shorten(r.context)}: n={r.count:,} ({100 * r.share:.1f}%), KL={r.kl_nats:.3f} nats, "
                f"contribution {r.mi_contribution_nats:.4f}; most over-represented: {r.top_emotion} x{r.top_ratio:.2f}"
            )
        return lines if len(lines) > 1 else [*lines, "  none"]

    def _cell_lines(self) -> list[str]:
        cells = self.cells[self.cells["eligible"]].sort_values("mi_contribution_nats", ascending=False)
        lines = [f"Most biased (context, emotion) pairs (>= {self.min_count} samples; by share x KL):"]
        for r in cells.head(self.top).itertuples():
            lines.append(
                f"  {shorten(r.context)} / {r.emotion}: P(e|k)={r.p_emotion:.3f} vs P(e)={r.p_emotion_overall:.3f} "
                f"(x{r.ratio:.2f}), H(e|k)/H(e) = {r.normalised_entropy:.2f}"
            )
        return lines if len(lines) > 1 else [*lines, "  none"]


def shorten(value: Any, width: int = 40) -> str:
    """``str(value)``, cut to ``width`` characters with ``...`` (long context names in summaries and tick labels)."""
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def write_tables(report: BiasReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes the report's tables and summary into ``out_dir`` (created if needed).

    Files: ``contexts.csv`` (per context), ``context_emotion.csv`` (per context and emotion), ``emotions.csv``,
    ``summary.txt`` (:meth:`BiasReport.to_text`) and ``summary.json`` (the scalars, the context name, ``min_count``).

    Args:
        report: The report.
        out_dir: Output folder.

    Returns:
        The written files by kind (``"contexts"``, ``"cells"``, ``"emotions"``, ``"summary"``, ``"summary_json"``).
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "contexts": out / "contexts.csv",
        "cells": out / "context_emotion.csv",
        "emotions": out / "emotions.csv",
        "summary": out / "summary.txt",
        "summary_json": out / "summary.json",
    }
    report.contexts.to_csv(paths["contexts"], index=False)
    report.cells.to_csv(paths["cells"], index=False)
    report.emotions.to_csv(paths["emotions"], index=False)
    paths["summary"].write_text(report.to_text() + "\n", encoding="utf-8")
    meta = {"context": report.context_name, "min_count": report.min_count, **report.summary}
    paths["summary_json"].write_text(json.dumps(meta, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Not JSON-serialisable: {type(value).__name__}")
