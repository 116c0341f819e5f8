"""Multilabel runs of the study: per-sample scores in the record, their mAP, and its paired-bootstrap replicates.

A multilabel run cannot be summarised by per-sample correctness, so its record keeps each test sample's category
probabilities (float16) and labels (packed bits); the bootstrap recomputes the macro mAP on every resample of test
samples. Resampling with replacement is the same as weighting each sample by how often it was drawn, so the
replicates are a sample-weighted average precision, written here vectorised over the resamples because scikit-learn
and torchmetrics compute one weighting at a time (``tests/benchmarks`` checks it against scikit-learn's
``average_precision_score(..., sample_weight=...)``).
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from torchmetrics.classification import MultilabelAveragePrecision


def pack_scores(scores: np.ndarray, labels: np.ndarray) -> dict:
    """The record's ``scores`` entry of one test set: probabilities as float16, labels as packed bits (base64)."""
    return {
        "scores": base64.b64encode(scores.astype(np.float16).tobytes()).decode("ascii"),
        "labels": base64.b64encode(np.packbits(labels.astype(np.uint8).ravel()).tobytes()).decode("ascii"),
        "shape": list(scores.shape),
    }


def unpack_scores(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, labels)`` of one test set: float32 (n, C) and bool (n, C), as :func:`pack_scores` stored them."""
    n, c = entry["shape"]
    scores = np.frombuffer(base64.b64decode(entry["scores"]), dtype=np.float16).reshape(n, c).astype(np.float32)
    bits = np.unpackbits(np.frombuffer(base64.b64decode(entry["labels"]), dtype=np.uint8))[: n * c]
    return scores, bits.reshape(n, c).astype(bool)


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Macro mAP as ``CCIMLightningModule`` logs it (torchmetrics; a category without positives counts as 0)."""
    metric = MultilabelAveragePrecision(scores.shape[1], average="macro")
    return float(metric(torch.from_numpy(scores), torch.from_numpy(labels.astype(np.int64))))


def weighted_map(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro average precision under each row of sample weights.

    ``AP_c(w) = sum_i w_i y_ic P_c(w, t_i) / sum_i w_i y_ic``, with ``P_c(w, t)`` the weighted precision of the
    samples scoring ``>= t`` (ties share the precision at the end of their group, as in scikit-learn). A category
    without weighted positives counts 0, as torchmetrics counts it.

    Args:
        scores: (n, C) scores.
        labels: (n, C) bool labels.
        weights: (R, n) non-negative sample weights (bootstrap counts).

    Returns:
        (R,) macro mAP per weighting.
    """
    total = np.zeros(len(weights))
    for c in range(scores.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")
        ranked, positive = scores[order, c], labels[order, c]
        # each position's last index with the same score: precision is read at the end of a tie group
        group_end = np.searchsorted(-ranked, -ranked, side="right") - 1
        w = weights[:, order]
        true_positive = np.cumsum(w * positive, axis=1)
        seen = np.cumsum(w, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(seen > 0, true_positive / seen, 0.0)[:, group_end]
            positives = true_positive[:, -1]
            ap = np.where(positives > 0, (w * positive * precision).sum(axis=1) / positives, 0.0)
        total += ap
    return total / scores.shape[1]
