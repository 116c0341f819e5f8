"""Tests for ccim_lightning.analysis.statistics: the bias statistics against hand computations and scikit-learn,
and the synthetic data's known bias."""

import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from ccim_lightning.analysis.statistics import (
    HISTOGRAM_BINS,
    binary_entropy,
    categorical_mutual_information,
    compute_bias_report,
    entropy_histogram_counts,
)

# Two contexts (a: 4 samples, b: 6), two emotions, multi-label.
#   e0: a 4/4, b 2/6 -> overall 6/10;  e1: a 1/4, b 2/6 -> overall 3/10
CONTEXTS = ["a"] * 4 + ["b"] * 6
LABELS = np.array(
    [[1, 1], [1, 0], [1, 0], [1, 0], [1, 1], [1, 0], [0, 0], [0, 1], [0, 0], [0, 0]],
    dtype=float,
)


def h(p: float) -> float:
    """Binary entropy in nats, by hand."""
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


def test_binary_entropy_matches_the_formula():
    assert binary_entropy([0.0, 1.0]).tolist() == [0.0, 0.0]
    for p in (0.1, 0.25, 0.5, 0.9):
        assert binary_entropy(p) == pytest.approx(h(p))


def test_entropies_and_mutual_information_match_a_hand_computed_example():
    report = compute_bias_report(CONTEXTS, LABELS, emotion_names=["e0", "e1"], min_count=1, permutations=0)
    cells = report.cells.set_index(["context", "emotion"])

    expected = {
        ("a", "e0"): (1.0, 0.6),
        ("b", "e0"): (2 / 6, 0.6),
        ("a", "e1"): (1 / 4, 0.3),
        ("b", "e1"): (2 / 6, 0.3),
    }
    for key, (p_k, p) in expected.items():
        assert cells.loc[key, "p_emotion"] == pytest.approx(p_k)
        assert cells.loc[key, "ratio"] == pytest.approx(p_k / p)
        assert cells.loc[key, "entropy_bits"] == pytest.approx(h(p_k) / math.log(2))
        assert cells.loc[key, "normalised_entropy"] == pytest.approx(h(p_k) / h(p))
    assert cells.loc[("a", "e0"), "normalised_entropy"] == 0.0  # context a decides e0: always present

    emotions = report.emotions.set_index("emotion")
    mi_e0 = h(0.6) - (0.4 * h(1.0) + 0.6 * h(2 / 6))
    mi_e1 = h(0.3) - (0.4 * h(1 / 4) + 0.6 * h(2 / 6))
    assert emotions.loc["e0", "mi_nats"] == pytest.approx(mi_e0)
    assert emotions.loc["e1", "mi_nats"] == pytest.approx(mi_e1)
    for e, column in enumerate(("e0", "e1")):
        assert emotions.loc[column, "mi_nats"] == pytest.approx(mutual_info_score(CONTEXTS, LABELS[:, e]))
    assert emotions.loc["e0", "normalised_mi"] == pytest.approx(mi_e0 / h(0.6))
    # the P(k)-weighted mean of the normalised entropies is 1 - I(K;e)/H(e)
    weighted = 0.4 * cells.loc[("a", "e1"), "normalised_entropy"] + 0.6 * cells.loc[("b", "e1"), "normalised_entropy"]
    assert weighted == pytest.approx(1 - emotions.loc["e1", "normalised_mi"])
    # per-cell contributions sum to I(K;e)
    assert report.cells.groupby("emotion")["mi_contribution_nats"].sum()["e1"] == pytest.approx(mi_e1)
    assert report.summary["mean_normalised_mi"] == pytest.approx((mi_e0 / h(0.6) + mi_e1 / h(0.3)) / 2)
    assert report.summary["sum_emotion_mi_nats"] == pytest.approx(mi_e0 + mi_e1)


def test_single_label_mutual_information_and_nmi_match_sklearn():
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, 5, size=300)
    classes = np.where(rng.random(300) < 0.6, contexts % 3, rng.integers(0, 3, size=300))
    report = compute_bias_report(contexts, classes, min_count=1, permutations=3)
    assert report.summary["task"] == "single-label"
    # I(K;Y) and NMI come from torchmetrics, which computes in float32: 1e-5 relative
    assert report.summary["mi_nats"] == pytest.approx(mutual_info_score(contexts, classes), rel=1e-5)
    assert report.summary["nmi"] == pytest.approx(normalized_mutual_info_score(contexts, classes), rel=1e-5)
    assert report.summary["null_nmi"] < report.summary["nmi"] / 5
    # the per-context KL (categorical here, float64 numpy) weighted by the shares sums to I(K;Y)
    assert report.contexts["mi_contribution_nats"].sum() == pytest.approx(report.summary["mi_nats"], rel=1e-5)
    assert report.contexts["mi_contribution_nats"].sum() == pytest.approx(mutual_info_score(contexts, classes))
    # one-hot labels give the same report as class ids
    onehot = compute_bias_report(contexts, np.eye(3)[classes], multi_label=False, min_count=1, permutations=3)
    assert onehot.summary["nmi"] == pytest.approx(report.summary["nmi"])


@pytest.mark.parametrize(
    ("contexts", "classes"),
    [
        ([0, 0, 1, 1, 2, 2, 2], [1, 1, 0, 0, 0, 2, 2]),
        ([5, 5, 5, 5], [0, 1, 2, 3]),  # one context: I = 0, NMI = 0
        ([3, 3, 3], [1, 1, 1]),  # both constant: scikit-learn's convention NMI = 1
        ([0, 1, 2, 3], [0, 1, 2, 3]),  # identical labelings: NMI = 1
    ],
)
def test_categorical_mutual_information_matches_sklearn(contexts, classes):
    mi, nmi = categorical_mutual_information(np.array(contexts), np.array(classes))
    assert mi == pytest.approx(mutual_info_score(contexts, classes), rel=1e-5, abs=1e-7)
    assert nmi == pytest.approx(normalized_mutual_info_score(contexts, classes), rel=1e-5, abs=1e-7)


def test_independent_labels_give_near_zero_mutual_information_and_entropies_near_one():
    rng = np.random.default_rng(1)
    contexts = rng.integers(0, 4, size=20000)
    labels = (rng.random((20000, 3)) < [0.5, 0.2, 0.05]).astype(float)
    report = compute_bias_report(contexts, labels, permutations=2)
    assert report.summary["mean_normalised_mi"] < 0.005
    assert report.cells["normalised_entropy"].between(0.9, 1.1).all()


def test_min_count_keeps_tiny_contexts_out_of_rankings():
    contexts = ["big"] * 50 + ["tiny"] * 2
    labels = np.array([[1, 0]] * 25 + [[0, 1]] * 25 + [[1, 0]] * 2, dtype=float)
    report = compute_bias_report(contexts, labels, min_count=10, permutations=0)
    table = report.contexts.set_index("context")
    assert bool(table.loc["big", "eligible"]) and not bool(table.loc["tiny", "eligible"])
    assert table.loc["tiny", "zero_entropy_emotions"] == 2  # tiny decides both emotions ...
    assert report.emotions["zero_entropy_share"].tolist() == [0.0, 0.0]  # ... but does not count
    assert "tiny" not in report.to_text().split("Most biased contexts")[1]


def test_histogram_bins_separate_zero_deciles_and_above_one():
    counts = entropy_histogram_counts(np.array([0.0, 0.05, 0.1, 0.95, 1.0, 1.5, np.nan]))
    assert len(counts) == len(HISTOGRAM_BINS) == 12
    assert counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1]


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="must match one to one"):
        compute_bias_report(["a", "b"], np.array([[1.0], [0.0], [1.0]]))
    with pytest.raises(ValueError, match="no context value"):
        compute_bias_report(["a", None], np.array([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        compute_bias_report(["a", "b"], np.array([[0.3], [0.0]]))


def _synthetic_scenes_and_targets(bias: float, size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """True scene and emotion of each training sample, rendered at the smallest size (labels do not depend on it)."""
    from ccim_lightning.datamodules import SyntheticContextDataModule

    datamodule = SyntheticContextDataModule(
        bias=bias, train_size=size, image_size=16, subject_size=4, max_distractors=0
    )
    dataset = datamodule.dictionary_dataset()
    samples = [dataset[i] for i in range(len(dataset))]
    return np.array([int(s["scene"]) for s in samples]), np.array([int(s["target"]) for s in samples])


def test_synthetic_bias_shows_up_as_mutual_information():
    biased = compute_bias_report(*_synthetic_scenes_and_targets(0.9), context_name="scene")
    unbiased = compute_bias_report(*_synthetic_scenes_and_targets(0.0), context_name="scene")
    assert biased.summary["nmi"] > 0.5
    assert unbiased.summary["nmi"] < 0.03
    assert biased.summary["nmi"] > 10 * unbiased.summary["nmi"]
    assert biased.summary["mean_normalised_mi"] > 10 * unbiased.summary["mean_normalised_mi"]
