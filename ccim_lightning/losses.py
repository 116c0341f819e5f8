"""The losses of the EMOTIC baseline (Kosti et al., TPAMI 2019), as plain ``loss(prediction, target)`` modules.

- :class:`EmoticDiscreteLoss`: squared error over the categories, weighted per class from the batch's label
  statistics: ``w_i = 1 / ln(c + p_i)`` (c = 1.2), where ``p_i`` is the share of the batch's samples labelled with
  category ``i`` (the paper's "probability of the i-th category"); categories without a positive in the batch get
  ``w_i = 1e-4``. Frequent categories weigh less, rare ones more. ``statistic="count"`` uses the batch count of
  positives instead, as the popular public re-implementation of the baseline does.
- :class:`EmoticContinuousLoss`: error on valence, arousal and dominance that ignores errors below a margin
  (``"l2"``: squared error where ``|error| >= margin``, else 0) or is quadratic below it and linear above
  (``"smooth_l1"``: ``0.5 e^2`` for ``e <= margin``, else ``margin * (e - 0.5 margin)``; at the baseline's
  ``margin=1`` this is its smooth-L1 loss). Targets on EMOTIC's 1-10 scale (``batch["vad"]``); NaN targets (persons
  without V/A/D in ``Annotations.mat``) are ignored.

Both sum over classes and samples by default (``reduction="sum"``, as the baseline); ``"mean"`` divides by the
batch size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Reduction = Literal["sum", "mean"]


def _reduce(per_element: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    total = per_element.sum()
    return total if reduction == "sum" else total / max(per_element.shape[0], 1)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


class EmoticDiscreteLoss(nn.Module):
    """Dynamically weighted squared error for multi-hot targets (module docstring).

    Args:
        c: The constant of ``w_i = 1 / ln(c + p_i)``; must be > 1 so every weight is finite and positive.
        empty_weight: Weight of a category with no positive sample in the batch.
        statistic: ``"fraction"``: ``p_i`` = share of the batch positive for category ``i`` (the paper);
            ``"count"``: the number of positives (the public baseline code).
        reduction: ``"sum"`` over samples and classes, or ``"mean"`` (the sum divided by the batch size).
        sigmoid: Compare ``sigmoid(logits)`` with the targets instead of the raw scores (the baseline uses raw
            scores).
    """

    def __init__(
        self,
        c: float = 1.2,
        empty_weight: float = 1e-4,
        statistic: Literal["fraction", "count"] = "fraction",
        reduction: Reduction = "sum",
        sigmoid: bool = False,
    ) -> None:
        super().__init__()
        if c <= 1.0:
            raise ValueError(f"c must be > 1 (w_i = 1/ln(c + p_i) must be finite and positive), got {c}")
        if statistic not in ("fraction", "count"):
            raise ValueError(f"statistic must be 'fraction' or 'count', got {statistic!r}")
        _check_reduction(reduction)
        self.c = c
        self.empty_weight = empty_weight
        self.statistic = statistic
        self.reduction = reduction
        self.sigmoid = sigmoid

    def class_weights(self, target: torch.Tensor) -> torch.Tensor:
        """The per-class weights (C,) for a batch of multi-hot targets (B, C)."""
        positives = (target > 0.5).sum(dim=0).to(torch.float32)
        statistic = positives / target.shape[0] if self.statistic == "fraction" else positives
        weights = 1.0 / torch.log(self.c + statistic)
        return torch.where(positives > 0, weights, torch.full_like(weights, self.empty_weight))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape or logits.ndim != 2:
            raise ValueError(
                f"expected logits and multi-hot targets of the same (B, C) shape, got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        target = target.to(logits.dtype)
        prediction = logits.sigmoid() if self.sigmoid else logits
        weights = self.class_weights(target.detach()).to(logits.dtype)
        return _reduce((prediction - target).pow(2) * weights, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"c={self.c}, empty_weight={self.empty_weight}, statistic={self.statistic!r}, reduction={self.reduction!r}"
        )


class EmoticContinuousLoss(nn.Module):
    """Margin loss on (B, 3) valence/arousal/dominance predictions (module docstring).

    Args:
        kind: ``"l2"`` (errors below ``margin`` ignored) or ``"smooth_l1"`` (quadratic below ``margin``, linear
            above).
        margin: In the targets' units (EMOTIC's 1-10 scale: 1.0, the baseline's value).
        reduction: ``"sum"`` over samples and dimensions, or ``"mean"`` (the sum divided by the batch size).
    """

    def __init__(self, kind: Literal["l2", "smooth_l1"] = "l2", margin: float = 1.0, reduction: Reduction = "sum"):
        super().__init__()
        if kind not in ("l2", "smooth_l1"):
            raise ValueError(f"kind must be 'l2' or 'smooth_l1', got {kind!r}")
        if not (margin >= 0.0 and math.isfinite(margin)):
            raise ValueError(f"margin must be a finite number >= 0, got {margin}")
        _check_reduction(reduction)
        self.kind = kind
        self.margin = margin
        self.reduction = reduction

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        target = target.to(prediction.dtype)
        known = ~torch.isnan(target)
        error = (prediction - torch.where(known, target, prediction)).abs()
        if self.kind == "l2":
            loss = torch.where(error >= self.margin, error.pow(2), torch.zeros_like(error))
        else:
            loss = torch.where(error <= self.margin, 0.5 * error.pow(2), self.margin * (error - 0.5 * self.margin))
        return _reduce(loss * known, self.reduction)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, margin={self.margin}, reduction={self.reduction!r}"
