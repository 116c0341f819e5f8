"""Per-class decision thresholds of a multilabel model, chosen for the best F1 on validation probabilities.

The rule (:func:`best_f1_thresholds`), per class ``c``:

- The candidates are the class's distinct validation probabilities ``s``; a sample is predicted positive when its
  probability is at or above the threshold (``p >= s``), so candidate ``s`` gives precision ``P(s)`` and recall
  ``R(s)`` over the validation samples (torchmetrics' ``MultilabelPrecisionRecallCurve`` with ``thresholds=None``,
  the same values as scikit-learn's ``precision_recall_curve``).
- ``F1(s) = 2 P(s) R(s) / (P(s) + R(s))`` (0 where both are 0). The threshold is the candidate with the largest
  F1; among tied candidates, the largest one (the fewest positive predictions). The curve's precision and recall
  are float32, so F1 values within :data:`TIE_TOLERANCE` of the best count as tied (two count ratios that are
  equal can differ in their last float32 bits).
- A class without a positive validation sample has no F1 to maximise: its threshold is ``default`` (0.5).

Nothing here needs a library beyond torchmetrics' curve: the arg-max over a curve is the whole rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_THRESHOLD = 0.5
"""The threshold of a class without a positive validation sample, and of a model without chosen thresholds."""
TIE_TOLERANCE = 1e-6
"""F1 values this close to the best are ties (see the module docstring)."""


def best_f1_thresholds(
    precision: Sequence[torch.Tensor],
    recall: Sequence[torch.Tensor],
    thresholds: Sequence[torch.Tensor],
    default: float = DEFAULT_THRESHOLD,
) -> torch.Tensor:
    """Per class, the probability threshold with the best validation F1 (rule in the module docstring).

    Args:
        precision: Per class, precision at each candidate threshold plus the curve's closing 1 (torchmetrics'
            ``MultilabelPrecisionRecallCurve(thresholds=None)`` output, as scikit-learn's).
        recall: Per class, recall at each candidate plus the closing 0.
        thresholds: Per class, the candidates (the distinct probabilities, ascending).
        default: The threshold of a class without positives.

    Returns:
        (C,) float32 thresholds.
    """
    chosen = torch.full((len(thresholds),), float(default), dtype=torch.float32)
    for c, (p, r, t) in enumerate(zip(precision, recall, thresholds)):
        # at the lowest candidate every sample is predicted positive: its precision is the share of positives
        if t.numel() == 0 or float(p[0]) == 0.0:
            continue
        p, r = p[: t.numel()].double(), r[: t.numel()].double()
        total = p + r
        f1 = torch.where(total > 0, 2 * p * r / total.clamp_min(1e-300), torch.zeros_like(total))
        best = torch.nonzero(f1 >= f1.max() - TIE_TOLERANCE).flatten()
        chosen[c] = float(t[best].max())  # ties: the largest threshold
    return chosen
