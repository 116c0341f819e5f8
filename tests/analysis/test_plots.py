"""The bias report's entropy figure: one readable panel, its counts checked by hand."""

import math

import matplotlib.image
import numpy as np

from ccim_lightning.analysis.plots import ENTROPY_BIN_LABELS, entropy_distribution, plot_entropy_histograms
from ccim_lightning.analysis.statistics import compute_bias_report


def test_entropy_distribution_counts_contexts_per_bin_as_computed_by_hand():
    # context A: 40 samples, all "x"; context B: 40 samples, half "x", half "y"; C: 10 samples (below min_count)
    contexts = ["A"] * 40 + ["B"] * 40 + ["C"] * 10
    labels = [0] * 40 + [0, 1] * 20 + [1] * 10  # 0: "x", 1: "y"
    report = compute_bias_report(contexts, labels, emotion_names=["x", "y"], min_count=20, permutations=0)
    names, counts = entropy_distribution(report)
    # P(x) = 60/90 overall. A decides x: H(x|A) = 0. B: h(1/2) / h(2/3) = ln 2 / 0.6365 = 1.089 > 1. Same for y.
    h = lambda p: -p * math.log(p) - (1 - p) * math.log(1 - p)  # noqa: E731
    assert h(0.5) / h(60 / 90) > 1
    assert names == ["x", "y"]
    expected = np.zeros(12, dtype=np.int64)
    expected[0] = expected[11] = 1
    np.testing.assert_array_equal(counts, [expected, expected])
    assert ENTROPY_BIN_LABELS[0] == "0" and ENTROPY_BIN_LABELS[-1] == ">1" and len(ENTROPY_BIN_LABELS) == 12


def test_entropy_plot_is_one_labelled_panel_for_many_emotions_and_few_contexts(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    contexts = rng.integers(0, 5, 2000)
    labels = (rng.random((2000, 26)) < rng.uniform(0.05, 0.5, (5, 26))[contexts]).astype(np.int64)
    report = compute_bias_report(contexts, labels, multi_label=True, min_count=20, permutations=0)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at its axes
    path = plot_entropy_histograms(report, tmp_path / "entropy.png")
    (figure,) = figures
    panel, colorbar = figure.axes  # one panel (and its colour bar), not 26 small ones
    assert panel.get_xlabel().startswith("H(e | context=k) / H(e)") and panel.get_ylabel() == "emotion"
    assert "5 contexts" in panel.get_title()
    assert [t.get_text() for t in panel.get_xticklabels()] == ENTROPY_BIN_LABELS
    assert len(panel.get_yticklabels()) == 26
    assert "% of the contexts" in colorbar.get_ylabel()
    names, counts = entropy_distribution(report)
    shown = sorted(int(t.get_text()) for t in panel.texts)  # each non-empty cell holds its number of contexts
    assert shown == sorted(counts[counts > 0].tolist())
    assert matplotlib.image.imread(path).shape[1] > 600
