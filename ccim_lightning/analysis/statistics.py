"""Context-bias statistics: how much a dataset's context predicts its emotions (the paper's Fig. 2 and its motivation).

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
  ``normalized_mutual_info_score``. All values are float64 numpy/SciPy.

All estimates are plug-in (empirical frequencies), which overestimate mutual information when contexts are many or
small. Each report therefore also gives the same statistics with the context values randomly permuted over the
samples (the ``null_*`` values): a chance level to compare with. Rankings and histograms only count contexts with
at least ``min_count`` samples, so tiny contexts (whose entropies are 0 by chance) do not dominate them.

This module is the numpy/pandas/SciPy core: :func:`compute_bias_report` turns context values and
labels into a :class:`~ccim_lightning.analysis.report.BiasReport`. Where the contexts come from is
:mod:`~ccim_lightning.analysis.sources`; writing and plotting are :mod:`~ccim_lightning.analysis.report` and
:mod:`~ccim_lightning.analysis.plots`; the command is :mod:`~ccim_lightning.commands.bias_report`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import entropy
from scipy.stats.contingency import crosstab

from ccim_lightning.analysis.report import BiasReport

__all__ = [
    "HISTOGRAM_BINS",
    "binary_entropy",
    "categorical_mutual_information",
    "compute_bias_report",
    "entropy_histogram_counts",
]

#: Bin labels of :func:`entropy_histogram_counts`: exactly 0, ten deciles of (0, 1], above 1.
HISTOGRAM_BINS = ("0", *(f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)), ">1")
_ZERO = 1e-12  # entropies at or below this (in nats) count as zero


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


def categorical_mutual_information(codes: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """I(K; Y) in nats and the arithmetic NMI of two labelings of the same samples, in float64.

    I(K; Y) = H(K) + H(Y) - H(K, Y), from SciPy's contingency table (``crosstab``) and ``entropy``. No library
    function takes this module's inputs without torch (torchmetrics) or a dev-only dependency (scikit-learn), and
    the combination is one line. NMI follows scikit-learn's convention of 1 when both labelings are constant.

    Args:
        codes: (n,) integer context codes.
        classes: (n,) integer class ids.

    Returns:
        ``(I(K; Y), I(K; Y) / ((H(K) + H(Y)) / 2))``.
    """
    if len(np.unique(codes)) == 1 and len(np.unique(classes)) == 1:
        return 0.0, 1.0
    joint = crosstab(np.asarray(codes), np.asarray(classes)).count.astype(np.float64)
    h_k, h_y = entropy(joint.sum(1)), entropy(joint.sum(0))
    mi = max(h_k + h_y - entropy(joint.ravel()), 0.0)
    return float(mi), float(mi / ((h_k + h_y) / 2))


def _emotion_mi(counts: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """I(K; e) in nats per emotion, from the per-context sample counts (K,) and positives (K, C).

    Not one :func:`categorical_mutual_information` call per emotion (C contingency tables per report and per
    permutation): this closed form over the grouped counts, in float64, is the same sum as
    the per-cell contributions of the report, so those add up to it exactly.
    """
    n = counts.sum()
    p_e = positives.sum(0) / n
    conditional = (counts[:, None] / n * binary_entropy(positives / counts[:, None])).sum(0)
    return np.maximum(binary_entropy(p_e) - conditional, 0.0)


def _group_counts(codes: np.ndarray, labels: np.ndarray, num_contexts: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples per context (K,) and samples showing each emotion per context (K, C)."""
    positives = pd.DataFrame(labels).groupby(codes).sum().reindex(range(num_contexts), fill_value=0)
    return np.bincount(codes, minlength=num_contexts).astype(np.float64), positives.to_numpy(np.float64)


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
    summary = _summary(codes, matrix, counts, positives, emotions, multi_label, null)
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
    classes = matrix.argmax(1)  # single-label rows are one-hot
    normalised, nmi = [], []
    for _ in range(permutations):
        shuffled = rng.permutation(codes)
        counts, positives = _group_counts(shuffled, matrix, num_contexts)
        with np.errstate(divide="ignore", invalid="ignore"):
            normalised.append(np.where(h_e > _ZERO, _emotion_mi(counts, positives) / h_e, np.nan))
        if not multi_label:
            nmi.append(categorical_mutual_information(shuffled, classes)[1])
    return {"normalised_mi": np.mean(normalised, 0), "nmi": float(np.mean(nmi)) if nmi else math.nan}


def _summary(
    codes: np.ndarray,
    matrix: np.ndarray,
    counts: np.ndarray,
    positives: np.ndarray,
    emotions: pd.DataFrame,
    multi_label: bool,
    null: dict[str, Any],
) -> dict[str, Any]:
    """The scalar results, from the samples' context codes (n,) and labels (n, C) and their grouped counts."""
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
        mi, nmi = categorical_mutual_information(codes, matrix.argmax(1))  # rows are one-hot
        summary |= {
            "mi_nats": mi,
            "label_entropy_nats": label_entropy,
            "nmi": nmi,
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
