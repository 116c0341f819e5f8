"""Context-bias report: how much a dataset's context predicts its emotions (the paper's Fig. 2 and its motivation).

A context variable K (an annotation column such as EMOTIC's ``Folder``, a scene label, or each training sample's
confounder-dictionary cluster) and the emotion labels go in; tables, plots and a text summary come out.

Every emotion e is treated as a binary variable "e is present" (multi-label data as is, single-label data one-hot).
With n samples, n_k of them in context k, P(e) the share of samples showing e and P(e|k) that share within k, and
h(p) = -p ln p - (1 - p) ln(1 - p) the binary entropy in nats:

- ``ratio`` = P(e|k) / P(e): 1 = as often as overall, 2 = twice as often, 0 = never in this context.
- ``entropy_bits`` = h(P(e|k)) / ln 2, the entropy of e's presence among context k's samples in bits, in [0, 1]
  (1 = a coin flip). It is low for every rare emotion, biased or not.
- ``normalised_entropy`` = h(P(e|k)) / h(P(e)), the conditional entropy relative to the emotion's overall entropy
  (our reading of the paper's Fig. 2, which does not say what it normalises by): 0 = the context decides the emotion
  (always or never present there), 1 = the context leaves it as uncertain as overall (P(e|k) = P(e)). It exceeds 1
  where the context pushes P(e|k) towards 1/2 (e.g. a rare emotion that is common in this context): that is
  dependence too, not "more than independent". Its P(k)-weighted mean over contexts is exactly 1 - I(K; e) / H(e),
  so the per-context values decompose the normalised mutual information below. Zero is zero under either
  normalisation, so the share of zero-entropy contexts (the paper: about 40-45% of EMOTIC's "anger" and "happy"
  scenes) does not depend on the choice. Undefined (NaN) for an emotion never or always present (h(P(e)) = 0).
- ``mi_nats`` = I(K; e) = H(e) - sum_k P(k) h(P(e|k)), in nats; ``normalised_mi`` = I(K; e) / H(e) in [0, 1], the
  share of e's uncertainty that the context removes (Theil's uncertainty coefficient).
- Single-label data also get the categorical I(K; Y) and the normalised mutual information
  NMI = I(K; Y) / ((H(K) + H(Y)) / 2), the arithmetic-mean normalisation of scikit-learn's
  ``normalized_mutual_info_score``.

All estimates are plug-in (empirical frequencies), which overestimate mutual information when contexts are many or
small. Each report therefore also gives the same statistics with the context values randomly permuted over the
samples (the ``null_*`` values): a chance level to compare with. Rankings and histograms only count contexts with
at least ``min_count`` samples, so tiny contexts (whose entropies are 0 by chance) do not dominate them.

Two ways in: :func:`read_annotation_table` (table-only, no images) and :func:`cluster_contexts_from_config` (each
training sample's nearest confounder-dictionary prototype). Both return plain arrays for
:func:`compute_bias_report`; :func:`write_bias_report` writes the CSVs, PNGs and summary. The ``ccim bias-report``
command is :func:`add_bias_report_arguments` + :func:`run_bias_report`.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pandas as pd

__all__ = [
    "BiasReport",
    "ContextLabels",
    "add_bias_report_arguments",
    "binary_entropy",
    "cluster_contexts_from_config",
    "compute_bias_report",
    "entropy_histogram_counts",
    "main",
    "nearest_prototype",
    "plot_entropy_histograms",
    "plot_ratio_heatmap",
    "read_annotation_table",
    "run_bias_report",
    "write_bias_report",
]

log = logging.getLogger(__name__)

#: Bin labels of :func:`entropy_histogram_counts`: exactly 0, ten deciles of (0, 1], above 1.
HISTOGRAM_BINS = ("0", *(f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)), ">1")
_ZERO = 1e-12  # entropies at or below this (in nats) count as zero


# ------------------------------------------------------------------------------------------------- the statistics


def binary_entropy(p: np.ndarray | float) -> np.ndarray:
    """Entropy in nats of a Bernoulli(p) variable, elementwise, with 0 ln 0 = 0.

    Args:
        p: Probabilities in [0, 1]; NaN stays NaN.

    Returns:
        h(p) = -p ln p - (1 - p) ln(1 - p), an array of the shape of ``p``.
    """
    p = np.asarray(p, dtype=np.float64)
    return _plogp(p) + _plogp(1.0 - p)


def _plogp(p: np.ndarray) -> np.ndarray:
    """-p ln p elementwise, 0 where p = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), np.where(np.isnan(p), np.nan, 0.0))


def _bernoulli_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(Bernoulli(p) || Bernoulli(q)) in nats, elementwise; 0 where q is 0 or 1 (then p equals q)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        on = np.where(p > 0, p * np.log(p / q), 0.0)
        off = np.where(p < 1, (1 - p) * np.log((1 - p) / (1 - q)), 0.0)
    return np.where((q > 0) & (q < 1), on + off, 0.0)


def _categorical_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the distribution with these counts."""
    return float(_plogp(counts / counts.sum()).sum())


def _categorical_mi(table: np.ndarray) -> float:
    """I(K; Y) in nats of a (K, C) contingency table of counts."""
    n = table.sum()
    joint = table / n
    outer = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / (n * n)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / np.where(outer > 0, outer, 1.0)), 0.0)
    return float(max(terms.sum(), 0.0))


def _emotion_mi(counts: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """I(K; e) in nats per emotion, from the per-context sample counts (K,) and positives (K, C)."""
    n = counts.sum()
    p_e = positives.sum(0) / n
    conditional = (counts[:, None] / n * binary_entropy(positives / counts[:, None])).sum(0)
    return np.maximum(binary_entropy(p_e) - conditional, 0.0)


def _group_counts(codes: np.ndarray, labels: np.ndarray, num_contexts: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples per context (K,) and samples showing each emotion per context (K, C)."""
    positives = pd.DataFrame(labels).groupby(codes).sum().reindex(range(num_contexts), fill_value=0)
    return np.bincount(codes, minlength=num_contexts).astype(np.float64), positives.to_numpy(np.float64)


# ------------------------------------------------------------------------------------------------------ the report


@dataclass
class BiasReport:
    """Everything :func:`compute_bias_report` measured. All information measures are in nats.

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
                f"  {_short(r.context)}: n={r.count:,} ({100 * r.share:.1f}%), KL={r.kl_nats:.3f} nats, "
                f"contribution {r.mi_contribution_nats:.4f}; most over-represented: {r.top_emotion} x{r.top_ratio:.2f}"
            )
        return lines if len(lines) > 1 else [*lines, "  none"]

    def _cell_lines(self) -> list[str]:
        cells = self.cells[self.cells["eligible"]].sort_values("mi_contribution_nats", ascending=False)
        lines = [f"Most biased (context, emotion) pairs (>= {self.min_count} samples; by share x KL):"]
        for r in cells.head(self.top).itertuples():
            lines.append(
                f"  {_short(r.context)} / {r.emotion}: P(e|k)={r.p_emotion:.3f} vs P(e)={r.p_emotion_overall:.3f} "
                f"(x{r.ratio:.2f}), H(e|k)/H(e) = {r.normalised_entropy:.2f}"
            )
        return lines if len(lines) > 1 else [*lines, "  none"]


def _short(value: Any, width: int = 40) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def compute_bias_report(
    contexts: Sequence[Any] | np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    emotion_names: Sequence[str] | None = None,
    multi_label: bool | None = None,
    min_count: int = 20,
    permutations: int = 5,
    seed: int = 0,
    context_name: str = "context",
    top: int = 10,
) -> BiasReport:
    """Measures how much the context predicts the labels (see the module docstring for the definitions).

    Args:
        contexts: (n,) context value of each sample (any hashable values; no missing ones).
        labels: (n,) class ids (single-label) or (n, C) 0/1 matrix (multi-label, or one-hot single-label).
        emotion_names: C names; default ``"class 0"``... (for class ids, C = max id + 1 unless names are given).
        multi_label: Whether a sample can show several emotions; default: True for a matrix, False for class ids.
            With False a matrix must be one-hot.
        min_count: Contexts with fewer samples are left out of rankings, histograms and zero-entropy shares.
        permutations: How many random permutations of the contexts give the chance level (0 = none).
        seed: Seed of the permutations.
        context_name: What the context is, for the summary and the plots.
        top: How many entries the summary's rankings list.

    Returns:
        The report.
    """
    codes, values = _encode_contexts(contexts)
    matrix, multi_label = _label_matrix(labels, multi_label, emotion_names)
    if len(codes) != len(matrix):
        raise ValueError(f"{len(codes)} context values but {len(matrix)} label rows: they must match one to one.")
    names = list(emotion_names) if emotion_names is not None else [f"class {i}" for i in range(matrix.shape[1])]
    if len(names) != matrix.shape[1]:
        raise ValueError(f"{len(names)} emotion names for {matrix.shape[1]} label columns.")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}.")
    counts, positives = _group_counts(codes, matrix, len(values))
    eligible = counts >= min_count
    cells = _cell_table(values, names, counts, positives, eligible)
    emotions = _emotion_table(names, counts, positives, cells, eligible)
    null = _null_statistics(codes, matrix, len(values), multi_label, permutations, seed)
    emotions["null_normalised_mi"] = null["normalised_mi"]
    contexts_table = _context_table(values, counts, positives, cells, eligible, multi_label)
    summary = _summary(counts, positives, emotions, multi_label, null)
    return BiasReport(contexts_table, cells, emotions, summary, context_name, min_count, top)


def _encode_contexts(contexts: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (n,) and the sorted distinct values of the contexts."""
    series = pd.Series(np.asarray(contexts, dtype=object) if not isinstance(contexts, pd.Series) else contexts)
    missing = int(series.isna().sum())
    if missing:
        raise ValueError(f"{missing} of {len(series)} samples have no context value (NaN/None).")
    if len(series) == 0:
        raise ValueError("No samples: the context and label arrays are empty.")
    codes, values = pd.factorize(series, sort=True)
    return codes.astype(np.int64), np.asarray(values, dtype=object)


def _label_matrix(
    labels: Sequence[Any] | np.ndarray, multi_label: bool | None, names: Sequence[str] | None
) -> tuple[np.ndarray, bool]:
    """The (n, C) 0/1 label matrix and whether the data is multi-label."""
    array = np.asarray(labels)
    if array.ndim == 1:
        if multi_label:
            raise ValueError("multi_label=True needs an (n, C) 0/1 label matrix, got a 1-D array of class ids.")
        return _one_hot(array, None if names is None else len(names)), False
    if array.ndim != 2:
        raise ValueError(f"labels must be (n,) class ids or an (n, C) matrix, got shape {array.shape}.")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("The label matrix must hold only 0 and 1 (multi-hot); threshold probabilities first.")
    matrix = array.astype(np.float64)
    if multi_label is False and not (matrix.sum(1) == 1).all():
        raise ValueError("multi_label=False but some label rows do not have exactly one 1.")
    return matrix, multi_label is not False


def _one_hot(classes: np.ndarray, num_classes: int | None) -> np.ndarray:
    if classes.size and (not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0):
        raise ValueError(f"Class ids must be non-negative integers, got {classes.dtype} values {classes[:5]}...")
    num_classes = num_classes or (int(classes.max()) + 1 if classes.size else 0)
    if classes.size and classes.max() >= num_classes:
        raise ValueError(f"Class id {int(classes.max())} out of range for {num_classes} emotion names.")
    matrix = np.zeros((len(classes), num_classes))
    matrix[np.arange(len(classes)), classes] = 1.0
    return matrix


def _cell_table(
    values: np.ndarray, names: list[str], counts: np.ndarray, positives: np.ndarray, eligible: np.ndarray
) -> pd.DataFrame:
    """The long (context, emotion) table."""
    n = counts.sum()
    p_ek = positives / counts[:, None]
    p_e = np.broadcast_to(positives.sum(0) / n, p_ek.shape)
    h_ek, h_e = binary_entropy(p_ek), binary_entropy(p_e)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p_e > 0, p_ek / p_e, np.nan)
        normalised = np.where(h_e > _ZERO, h_ek / h_e, np.nan)
    num_contexts, num_emotions = p_ek.shape
    return pd.DataFrame(
        {
            "context": np.repeat(values, num_emotions),
            "emotion": np.tile(names, num_contexts),
            "count": np.repeat(counts, num_emotions).astype(np.int64),
            "positives": positives.ravel().astype(np.int64),
            "p_emotion": p_ek.ravel(),
            "p_emotion_overall": p_e.ravel(),
            "ratio": ratio.ravel(),
            "entropy_bits": (h_ek / math.log(2)).ravel(),
            "normalised_entropy": normalised.ravel(),
            "mi_contribution_nats": (counts[:, None] / n * _bernoulli_kl(p_ek, p_e)).ravel(),
            "eligible": np.repeat(eligible, num_emotions),
        }
    )


def _emotion_table(
    names: list[str], counts: np.ndarray, positives: np.ndarray, cells: pd.DataFrame, eligible: np.ndarray
) -> pd.DataFrame:
    """The per-emotion table (without the chance level)."""
    n = counts.sum()
    p_e = positives.sum(0) / n
    h_e = binary_entropy(p_e)
    mi = _emotion_mi(counts, positives)
    entropy = cells["normalised_entropy"].to_numpy().reshape(positives.shape)[eligible]
    raw = cells["entropy_bits"].to_numpy().reshape(positives.shape)[eligible]
    with warnings.catch_warnings():  # no eligible context, or an emotion without values: NaN, which is right
        warnings.simplefilter("ignore", RuntimeWarning)
        zero_share = (raw <= _ZERO).mean(0)
        median = np.nanmedian(entropy, 0)
    return pd.DataFrame(
        {
            "emotion": names,
            "positives": positives.sum(0).astype(np.int64),
            "prevalence": p_e,
            "entropy_nats": h_e,
            "mi_nats": mi,
            "normalised_mi": np.where(h_e > _ZERO, mi / np.where(h_e > _ZERO, h_e, 1.0), np.nan),
            "zero_entropy_share": np.where(h_e > _ZERO, zero_share, np.nan),
            "median_normalised_entropy": median,
        }
    )


def _context_table(
    values: np.ndarray,
    counts: np.ndarray,
    positives: np.ndarray,
    cells: pd.DataFrame,
    eligible: np.ndarray,
    multi_label: bool,
) -> pd.DataFrame:
    """The per-context table, sorted by contribution to the mutual information."""
    shape = positives.shape
    share = counts / counts.sum()
    contribution = cells["mi_contribution_nats"].to_numpy().reshape(shape)
    kl = contribution.sum(1) / share
    if not multi_label:
        p_yk, p_y = positives / counts[:, None], positives.sum(0) / counts.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p_yk > 0, p_yk * np.log(p_yk / p_y), 0.0).sum(1)
    ratio = cells["ratio"].to_numpy().reshape(shape)
    normalised = cells["normalised_entropy"].to_numpy().reshape(shape)
    top = np.nanargmax(np.where(np.isnan(ratio), -np.inf, ratio), axis=1)
    names = cells["emotion"].to_numpy().reshape(shape)[0]
    with warnings.catch_warnings():  # all-NaN rows give NaN means and minima, which is right
        warnings.simplefilter("ignore", RuntimeWarning)
        table = pd.DataFrame(
            {
                "context": values,
                "count": counts.astype(np.int64),
                "share": share,
                "kl_nats": kl,
                "mi_contribution_nats": share * kl,
                "mean_normalised_entropy": np.nanmean(normalised, 1),
                "min_normalised_entropy": np.nanmin(normalised, 1),
                "zero_entropy_emotions": (
                    (cells["entropy_bits"].to_numpy().reshape(shape) <= _ZERO) & ~np.isnan(normalised)
                ).sum(1),
                "top_emotion": names[top],
                "top_ratio": ratio[np.arange(len(values)), top],
                "eligible": eligible,
            }
        )
    return table.sort_values(["mi_contribution_nats", "count"], ascending=False, kind="stable").reset_index(drop=True)


def _null_statistics(
    codes: np.ndarray, matrix: np.ndarray, num_contexts: int, multi_label: bool, permutations: int, seed: int
) -> dict[str, Any]:
    """Chance level: the mutual information statistics with the contexts permuted over the samples (means)."""
    num_emotions = matrix.shape[1]
    if permutations < 1:
        return {"normalised_mi": np.full(num_emotions, np.nan), "nmi": math.nan}
    rng = np.random.default_rng(seed)
    h_e = binary_entropy(matrix.mean(0))
    normalised, nmi = [], []
    for _ in range(permutations):
        shuffled = rng.permutation(codes)
        counts, positives = _group_counts(shuffled, matrix, num_contexts)
        with np.errstate(divide="ignore", invalid="ignore"):
            normalised.append(np.where(h_e > _ZERO, _emotion_mi(counts, positives) / h_e, np.nan))
        if not multi_label:
            nmi.append(_nmi(counts, positives))
    return {"normalised_mi": np.mean(normalised, 0), "nmi": float(np.mean(nmi)) if nmi else math.nan}


def _nmi(counts: np.ndarray, table: np.ndarray) -> float:
    """I(K; Y) / mean(H(K), H(Y)) (scikit-learn's arithmetic NMI; 1 when both entropies are 0, as there)."""
    h_k, h_y = _categorical_entropy(counts), _categorical_entropy(table.sum(0))
    if h_k <= _ZERO and h_y <= _ZERO:
        return 1.0
    return _categorical_mi(table) / ((h_k + h_y) / 2)


def _summary(
    counts: np.ndarray, positives: np.ndarray, emotions: pd.DataFrame, multi_label: bool, null: dict[str, Any]
) -> dict[str, Any]:
    """The scalar results."""
    summary: dict[str, Any] = {
        "task": "multi-label" if multi_label else "single-label",
        "num_samples": int(counts.sum()),
        "num_contexts": len(counts),
        "num_emotions": positives.shape[1],
        "context_entropy_nats": _categorical_entropy(counts),
        "mean_normalised_mi": float(emotions["normalised_mi"].mean()),
        "null_mean_normalised_mi": float(pd.Series(null["normalised_mi"]).mean()),
        "sum_emotion_mi_nats": float(emotions["mi_nats"].sum()),
    }
    if not multi_label:
        label_entropy = _categorical_entropy(positives.sum(0))
        mi = _categorical_mi(positives)
        summary |= {
            "mi_nats": mi,
            "label_entropy_nats": label_entropy,
            "nmi": _nmi(counts, positives),
            "null_nmi": null["nmi"],
            "mi_over_label_entropy": mi / label_entropy if label_entropy > _ZERO else math.nan,
        }
    return summary


def entropy_histogram_counts(values: np.ndarray) -> np.ndarray:
    """Counts of normalised entropies in the bins of :data:`HISTOGRAM_BINS` (NaNs are ignored).

    Args:
        values: Normalised conditional entropies (>= 0).

    Returns:
        (12,) int counts: exactly 0, then (0, 0.1], (0.1, 0.2], ..., (0.9, 1.0], then above 1.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    zero = values <= _ZERO
    deciles = np.clip(np.ceil(values[~zero] * 10 - 1e-9).astype(np.int64), 1, 11)
    return np.concatenate([[zero.sum()], np.bincount(deciles, minlength=12)[1:12]]).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------- plots


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
        range(len(rows)), [f"{_short(c, 28)} (n={n:,})" for c, n in zip(rows["context"], rows["count"])], fontsize=8
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
        axis.set_title(f"{_short(name, 22)} (zero: {share[0]:.0f}%)", fontsize=8)
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


# --------------------------------------------------------------------------------------------------------- output


def write_bias_report(
    report: BiasReport, out_dir: str | os.PathLike, max_heatmap_contexts: int = 40
) -> dict[str, Path]:
    """Writes the report's tables, plots and summary into ``out_dir`` (created if needed).

    Files: ``contexts.csv`` (per context), ``context_emotion.csv`` (per context and emotion), ``emotions.csv``,
    ``ratio_heatmap.png``, ``entropy_histograms.png``, ``summary.txt`` and ``summary.json``.

    Args:
        report: The report.
        out_dir: Output folder.
        max_heatmap_contexts: Most rows of the heatmap.

    Returns:
        The written files by kind (``"contexts"``, ``"cells"``, ``"emotions"``, ``"heatmap"``, ``"histograms"``,
        ``"summary"``, ``"summary_json"``).
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
    if report.contexts["eligible"].any():
        paths["heatmap"] = plot_ratio_heatmap(report, out / "ratio_heatmap.png", max_heatmap_contexts)
        paths["histograms"] = plot_entropy_histograms(report, out / "entropy_histograms.png")
    else:
        log.warning("No context has >= %d samples: no plots written (lower --min-count).", report.min_count)
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Not JSON-serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------------------------------- table-only mode


@dataclass
class ContextLabels:
    """Context values and labels of a dataset's samples, ready for :func:`compute_bias_report`.

    Attributes:
        contexts: (n,) context value per sample.
        labels: (n, C) 0/1 matrix.
        emotion_names: C names.
        multi_label: Whether a sample can show several emotions.
        context_name: What the context is.
    """

    contexts: np.ndarray
    labels: np.ndarray
    emotion_names: list[str]
    multi_label: bool
    context_name: str


def read_annotation_table(
    path: str | os.PathLike, context_column: str, label_column: str, *, emotion_names: Sequence[str] | None = None
) -> ContextLabels:
    """Reads context values and labels from an annotation table (CSV, or TSV by its ``.tsv`` suffix); no images.

    A label cell is either a Python list literal of names (``"['Engagement', 'Happiness']"``, EMOTIC's CSV form:
    multi-label) or a single name or class id (single-label). Every cell of the column must be of the same kind.

    Args:
        path: The table.
        context_column: Column holding the context value (e.g. ``Folder``).
        label_column: Column holding the label(s) (e.g. ``Categorical_Labels``).
        emotion_names: Order (and completeness) of the emotions; default: the sorted distinct labels. For EMOTIC
            the sorted order is the canonical one.

    Returns:
        The samples' contexts and labels.

    Raises:
        FileNotFoundError: No such file.
        KeyError: A column is missing (the message lists the columns that exist).
        ValueError: A label cell cannot be read, or a label is not among ``emotion_names``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Annotation table {str(path)!r} does not exist.")
    table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    for column in (context_column, label_column):
        if column not in table.columns:
            raise KeyError(
                f"Annotation table {str(path)!r} has no column {column!r}; its columns: {list(table.columns)}."
            )
    cells = [_parse_label_cell(value, path, label_column, row) for row, value in enumerate(table[label_column])]
    kinds = {isinstance(cell, list) for cell in cells}
    if len(kinds) > 1:
        raise ValueError(
            f"Column {label_column!r} of {str(path)!r} mixes list cells (multi-label) with single labels; use one form."
        )
    multi_label = kinds == {True}
    samples = cells if multi_label else [[cell] for cell in cells]
    names = _emotion_names(samples, emotion_names, path, label_column)
    return ContextLabels(
        table[context_column].to_numpy(object), _multi_hot(samples, names), names, multi_label, context_column
    )


def _multi_hot(samples: list[list[str]], names: list[str]) -> np.ndarray:
    """(n, C) 0/1 matrix of the samples' label lists."""
    column = {name: i for i, name in enumerate(names)}
    rows = [i for i, labels in enumerate(samples) for _ in labels]
    columns = [column[label] for labels in samples for label in labels]
    matrix = np.zeros((len(samples), len(names)))
    matrix[rows, columns] = 1.0
    return matrix


def _parse_label_cell(value: str, path: Path, column: str, row: int) -> list[str] | str:
    """A list of names for a list literal, else the stripped string."""
    text = value.strip()
    if not text:
        raise ValueError(f"Row {row} (0-based, after the header) of {str(path)!r} has an empty {column!r} cell.")
    if not text.startswith("["):
        return text
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"Row {row} of {str(path)!r}: cannot read the {column!r} cell {text!r} as a list.") from exc
    if not isinstance(parsed, list):
        raise ValueError(f"Row {row} of {str(path)!r}: the {column!r} cell {text!r} is not a list.")
    return [str(label) for label in parsed]


def _emotion_names(samples: list[list[str]], given: Sequence[str] | None, path: Path, column: str) -> list[str]:
    """The given names (checked to cover every label) or the sorted distinct labels."""
    seen = sorted({label for labels in samples for label in labels}, key=_natural_key)
    if given is None:
        return seen
    unknown = sorted(set(seen) - set(given))
    if unknown:
        raise ValueError(f"Labels {unknown} in column {column!r} of {str(path)!r} are not among the emotion names.")
    return list(given)


def _natural_key(label: str) -> tuple[int, float, str]:
    """Numbers in numeric order before text in alphabetical order."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


# ----------------------------------------------------------------------------------------------- cluster mode


def nearest_prototype(features: Any, prototypes: Any, chunk_size: int = 8192) -> np.ndarray:
    """Index of the nearest prototype (Euclidean) of each feature row.

    Args:
        features: (n, d) features (tensor or array).
        prototypes: (N, d) prototypes.
        chunk_size: Rows per distance computation (bounds memory at chunk_size x N).

    Returns:
        (n,) int64 cluster ids.
    """
    import torch

    features = torch.as_tensor(features, dtype=torch.float32)
    prototypes = torch.as_tensor(prototypes, dtype=torch.float32, device=features.device)
    if features.ndim != 2 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"Features {list(features.shape)} and prototypes {list(prototypes.shape)} must be (n, d) and (N, d) "
            "with the same d: was the dictionary built with this scene CNN?"
        )
    parts = [torch.cdist(block, prototypes).argmin(1) for block in features.split(chunk_size)]
    return torch.cat(parts).cpu().numpy().astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


class _TargetRecorder:
    """Passes a loader's batches through and keeps their ``target`` and ``index`` (one pass for features + labels)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.targets: list[Any] = []
        self.indices: list[Any] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.targets.append(batch["target"].cpu())
            self.indices.append(batch["index"].cpu())
            yield batch


def cluster_contexts_from_config(
    config: str | os.PathLike,
    dictionary: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> ContextLabels:
    """Each training sample's confounder-dictionary cluster and its label, for a ``ccim`` config.

    The config's datamodule gives the training split (``dictionary_dataset(mask_subject=...)``); its
    ``ConfounderDictionaryCallback`` (or the callback's defaults) gives the scene CNN, its weights and the masking.
    The dictionary is ``dictionary`` when given, else the callback's ``cache`` file when it matches this run, else
    built as the callback would (k-means; saved to the ``cache`` file when one is set). Each sample goes to its
    nearest prototype in feature space.

    Args:
        config: A ``ccim`` YAML config (as for ``ccim fit --config``).
        dictionary: A dictionary file (:meth:`ConfounderDictionary.save`), e.g. the callback's cache.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        batch_size: Extraction batch size; default: the callback's, else the datamodule's, else 64.
        num_workers: Loader workers; default: the callback's, else the datamodule's, else 0.
        progress: Show a progress bar.

    Returns:
        Cluster ids (as contexts) and labels of the training samples.
    """
    from ccim_lightning.cli import build_cli
    from ccim_lightning.dictionary.features import ContextFeatureExtractor

    given = None if dictionary is None else _load_given_dictionary(dictionary)  # fail before the slow part
    # LightningCLI warns when it is given args while sys.argv holds others (here: the bias-report options).
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = build_cli(["--config", str(config)], run=False)
    datamodule, callback = cli.datamodule, _dictionary_callback(cli.trainer)
    dataset = _training_samples(datamodule, callback.mask_subject)
    extractor = ContextFeatureExtractor(callback.extractor_name, callback.weights).to(_device(device))
    recorder = _TargetRecorder(_loader(dataset, datamodule, callback, batch_size=batch_size, num_workers=num_workers))
    features = _extract(extractor, recorder, progress)
    num_prototypes = int(cli.model.head.dictionary.shape[0])
    chosen = _dictionary_for(given, dictionary, callback, num_prototypes, extractor, dataset, features)
    clusters = nearest_prototype(features.features, chosen.prototypes)
    matrix, multi_label = _target_matrix(_targets_in_index_order(recorder), getattr(datamodule, "num_classes", None))
    names = list(getattr(datamodule, "class_names", None) or [f"class {i}" for i in range(matrix.shape[1])])
    return ContextLabels(clusters, matrix, names, multi_label, "cluster")


def _device(name: str) -> Any:
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _training_samples(datamodule: Any, mask_subject: bool) -> Any:
    """The datamodule's training split as the dictionary callback sees it."""
    if callable(getattr(datamodule, "prepare_data", None)):
        datamodule.prepare_data()
    datamodule.setup("fit")
    if not callable(getattr(datamodule, "dictionary_dataset", None)):
        raise TypeError(
            f"{type(datamodule).__name__} has no dictionary_dataset(mask_subject=...): cannot list the "
            "training samples. Use a ccim_lightning datamodule or add that method."
        )
    return datamodule.dictionary_dataset(mask_subject=mask_subject)


def _loader(dataset: Any, datamodule: Any, callback: Any, *, batch_size: int | None, num_workers: int | None) -> Any:
    """A fixed-order loader; sizes from the arguments, else the callback, else the datamodule."""
    from ccim_lightning.dictionary.recipe import dictionary_loader

    return dictionary_loader(
        dataset,
        batch_size=batch_size or callback.batch_size or getattr(datamodule, "batch_size", 64),
        num_workers=_first_set(num_workers, callback.num_workers, getattr(datamodule, "num_workers", 0)),
    )


def _extract(extractor: Any, recorder: _TargetRecorder, progress: bool) -> Any:
    """Scene features of every sample, in index order, on the CPU."""
    from ccim_lightning.dictionary.recipe import ContextFeatures, extract_context_features, gather_features

    device = next(extractor.parameters()).device
    local = extract_context_features(extractor, recorder, device, progress=progress)
    gathered = gather_features(local, None, 1)
    return ContextFeatures(gathered.features.cpu(), gathered.indices.cpu())


def _first_set(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _dictionary_callback(trainer: Any) -> Any:
    """The config's ConfounderDictionaryCallback, or one with the default settings."""
    from ccim_lightning.callbacks import ConfounderDictionaryCallback

    for callback in trainer.callbacks:
        if isinstance(callback, ConfounderDictionaryCallback):
            return callback
    log.warning(
        "The config has no ConfounderDictionaryCallback: using its defaults (scene CNN resnet152, random "
        "weights unless given) to compute the scene features."
    )
    return ConfounderDictionaryCallback()


def _load_given_dictionary(path: str | os.PathLike) -> Any:
    """A dictionary file, refused when it is a random-Z one (its prototypes are no scene clusters)."""
    from ccim_lightning.dictionary.store import ConfounderDictionary

    dictionary = ConfounderDictionary.load(path)
    if dictionary.source == "random":
        raise ValueError(
            f"Dictionary {str(path)!r} is a random-Z ablation dictionary: its prototypes are not scene "
            "clusters, so a bias report over them means nothing. Pass a clustered dictionary."
        )
    return dictionary


def _dictionary_for(
    given: Any,
    path: str | os.PathLike | None,
    callback: Any,
    num_prototypes: int,
    extractor: Any,
    dataset: Any,
    features: Any,
) -> Any:
    """The dictionary to assign samples to: the given one, the callback's matching cache, or a fresh build."""
    from ccim_lightning.dictionary.recipe import expected_cache_key, fingerprint_of

    fingerprint = fingerprint_of(dataset)
    wanted = expected_cache_key(
        extractor=extractor,
        num_prototypes=num_prototypes,
        mask_subject=callback.mask_subject,
        seed=callback.seed,
        source="features",
        fingerprint=fingerprint,
    )
    if given is not None:
        _warn_if_foreign(given, path, wanted)
        return given
    cached = callback.load_cache(wanted)
    if cached is not None:
        return cached
    log.info("Bias report: clustering %d samples into %d prototypes", len(features.indices), num_prototypes)
    return callback.cluster(features, num_prototypes, wanted)


def _warn_if_foreign(dictionary: Any, path: str | os.PathLike | None, wanted: dict[str, Any]) -> None:
    """Warns when a given dictionary was built for other data, another scene CNN or other masking."""
    reasons = [r for r in dictionary.mismatches(wanted) if not r.startswith(("num_prototypes", "seed"))]
    if reasons:
        log.warning(
            "Dictionary %s was not built for this config's data and scene CNN (%s); assigning anyway.",
            path,
            "; ".join(reasons),
        )


def _targets_in_index_order(recorder: _TargetRecorder) -> Any:
    """The recorded targets, one per sample, sorted by sample index (the order of the gathered features)."""
    import torch

    indices, targets = torch.cat(recorder.indices), torch.cat(recorder.targets)
    order = torch.argsort(indices, stable=True)
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[1:] = indices[order][1:] != indices[order][:-1]
    return targets[order[keep]]


def _target_matrix(targets: Any, num_classes: int | None) -> tuple[np.ndarray, bool]:
    """(n, C) 0/1 labels from int class targets (single-label) or multi-hot float targets (multi-label)."""
    array = targets.cpu().numpy()
    if array.ndim == 1:
        return _one_hot(array.astype(np.int64), num_classes), False
    return (array > 0.5).astype(np.float64), True


# ---------------------------------------------------------------------------------------------------- the command


def add_bias_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``ccim bias-report`` options to ``parser`` (e.g. a subparser) and returns it."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="ccim YAML config: the context is each training sample's dictionary cluster")
    source.add_argument("--table", help="annotation table (CSV/TSV): the context is one of its columns, no images")
    parser.add_argument("--dictionary", help="with --config: a confounder dictionary file to assign samples to")
    parser.add_argument("--context-column", help="with --table: the context column (e.g. Folder)")
    parser.add_argument("--label-column", help="with --table: the label column (e.g. Categorical_Labels)")
    parser.add_argument("--out", default="bias_report", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--min-count",
        type=int,
        default=20,
        help="contexts with fewer samples are left out of rankings and plots (default: %(default)s)",
    )
    parser.add_argument(
        "--permutations",
        type=int,
        default=5,
        help="shuffled-context repeats for the chance level, 0 = none (default: %(default)s)",
    )
    parser.add_argument("--top", type=int, default=10, help="entries per ranking in the summary (default: %(default)s)")
    parser.add_argument("--max-heatmap-contexts", type=int, default=40, help="heatmap rows (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="with --config: device of the scene CNN (default: auto)")
    parser.add_argument("--batch-size", type=int, help="with --config: feature-extraction batch size")
    parser.add_argument("--num-workers", type=int, help="with --config: data-loader workers")
    return parser


def run_bias_report(args: argparse.Namespace) -> BiasReport:
    """Runs ``ccim bias-report`` with parsed arguments: computes, writes, prints the summary; returns the report."""
    data = _load_context_labels(args)
    report = compute_bias_report(
        data.contexts,
        data.labels,
        emotion_names=data.emotion_names,
        multi_label=data.multi_label,
        min_count=args.min_count,
        permutations=args.permutations,
        context_name=data.context_name,
        top=args.top,
    )
    paths = write_bias_report(report, args.out, args.max_heatmap_contexts)
    print(report.to_text())
    print(f"Written to {Path(args.out)}: {', '.join(sorted(p.name for p in paths.values()))}")
    return report


def _load_context_labels(args: argparse.Namespace) -> ContextLabels:
    """The contexts and labels the arguments ask for, with clear errors for misplaced options."""
    if args.table is not None:
        missing = [
            f"--{name.replace('_', '-')}" for name in ("context_column", "label_column") if not getattr(args, name)
        ]
        if missing:
            raise SystemExit(f"ccim bias-report --table needs {' and '.join(missing)}.")
        if args.dictionary:
            raise SystemExit("ccim bias-report: --dictionary goes with --config, not with --table.")
        return read_annotation_table(args.table, args.context_column, args.label_column)
    if args.context_column or args.label_column:
        raise SystemExit("ccim bias-report: --context-column and --label-column go with --table, not with --config.")
    return cluster_contexts_from_config(
        args.config, args.dictionary, device=args.device, batch_size=args.batch_size, num_workers=args.num_workers
    )


def main(argv: Sequence[str] | None = None) -> BiasReport:
    """``ccim bias-report`` as a program: bad inputs end with a one-line error instead of a traceback.

    Args:
        argv: The arguments after ``bias-report`` (default: ``sys.argv[1:]``).

    Returns:
        The report.
    """
    parser = add_bias_report_arguments(
        argparse.ArgumentParser(prog="ccim bias-report", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    try:
        return run_bias_report(args)
    except (FileNotFoundError, KeyError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error.args[0] if error.args else error}\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
