"""The multilabel decision-threshold rule (best validation F1 per class) against hand computations and scikit-learn."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_curve
from torchmetrics.functional.classification import multilabel_precision_recall_curve

from ccim_lightning.thresholds import DEFAULT_THRESHOLD, best_f1_thresholds


def thresholds_of(probabilities, targets):
    probabilities, targets = torch.as_tensor(probabilities), torch.as_tensor(targets)
    with warnings.catch_warnings():  # torchmetrics warns about a class without positives, which the rule handles
        warnings.filterwarnings("ignore", message="No positive samples found in target")
        curve = multilabel_precision_recall_curve(probabilities, targets, num_labels=targets.shape[1])
    return best_f1_thresholds(*curve)


def sklearn_reference(scores, truth):
    """The rule, exactly: over scikit-learn's candidate thresholds, F1 = 2 TP / (2 TP + FP + FN) as a fraction of
    counts (so ties are exact), the largest best candidate."""
    if truth.sum() == 0:
        return DEFAULT_THRESHOLD
    _, _, candidates = precision_recall_curve(truth, scores)
    f1 = []
    for candidate in candidates:
        predicted = scores >= candidate
        tp, fp = int((predicted & (truth == 1)).sum()), int((predicted & (truth == 0)).sum())
        fn = int((~predicted & (truth == 1)).sum())
        f1.append(Fraction(2 * tp, 2 * tp + fp + fn))
    best = max(f1)
    return float(max(c for c, f in zip(candidates, f1) if f == best))


def test_hand_computed_thresholds_with_a_tie_and_a_class_without_positives():
    # class 0: scores 0.1 0.35 0.4 0.8, truth 0 1 0 1
    #   >= 0.1: P 2/4 R 1 F1 .667; >= 0.35: P 2/3 R 1 F1 .8; >= 0.4: P 1/2 R 1/2 F1 .5; >= 0.8: P 1 R 1/2 F1 .667
    #   best: 0.35
    # class 1: scores 0.2 0.6 0.7 0.9, truth 0 1 0 1
    #   >= 0.2: 2/4, 1 -> .667; >= 0.6: 2/3, 1 -> .8; >= 0.7: 1/2, 1/2 -> .5; >= 0.9: 1, 1/2 -> .667; best 0.6
    # class 2: scores 0.3 0.5 0.6 0.7, truth 1 0 0 1
    #   >= 0.3: 2/4, 1 -> .667; >= 0.5: 1/3, 1/2 -> .4; >= 0.6: 1/2, 1/2 -> .5; >= 0.7: 1, 1/2 -> .667
    #   tie at .667 between 0.3 and 0.7: the larger, 0.7
    # class 3: no positive: the default 0.5
    probabilities = [[0.1, 0.2, 0.3, 0.9], [0.35, 0.6, 0.5, 0.1], [0.4, 0.7, 0.6, 0.2], [0.8, 0.9, 0.7, 0.3]]
    targets = [[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    chosen = thresholds_of(probabilities, targets)
    np.testing.assert_allclose(chosen.numpy(), [0.35, 0.6, 0.7, 0.5], atol=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_thresholds_match_scikit_learn_and_maximise_f1(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((60, 5)) < [0.1, 0.3, 0.5, 0.0, 0.9]).astype(np.int64)
    # informative but noisy scores, with repeated values (ties between samples)
    probabilities = np.clip(0.3 * targets + rng.random((60, 5)) * 0.7, 0, 1).round(2).astype(np.float32)
    chosen = thresholds_of(probabilities, targets).numpy()
    for c in range(5):
        expected = sklearn_reference(probabilities[:, c], targets[:, c])
        assert chosen[c] == pytest.approx(expected, abs=1e-6), c
        if targets[:, c].any():  # no other candidate threshold gives a better F1
            best = f1_score(targets[:, c], probabilities[:, c] >= chosen[c])
            for candidate in np.unique(probabilities[:, c]):
                assert f1_score(targets[:, c], probabilities[:, c] >= candidate) <= best + 1e-12
