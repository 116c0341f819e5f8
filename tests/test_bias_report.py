"""Tests for ccim_lightning.analysis.report: statistics against hand computations and scikit-learn, the table reader,
the outputs, the command, and the synthetic data's known bias."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from ccim_lightning.analysis.report import (
    HISTOGRAM_BINS,
    add_bias_report_arguments,
    binary_entropy,
    compute_bias_report,
    entropy_histogram_counts,
    main,
    nearest_prototype,
    read_annotation_table,
    write_bias_report,
)

EMOTIC_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "emotic_csv"

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
    assert report.summary["mi_nats"] == pytest.approx(mutual_info_score(contexts, classes))
    assert report.summary["nmi"] == pytest.approx(normalized_mutual_info_score(contexts, classes))
    assert report.summary["null_nmi"] < report.summary["nmi"] / 5
    # the per-context KL (categorical here) weighted by the shares sums to I(K;Y)
    assert (report.contexts["mi_contribution_nats"].sum()) == pytest.approx(report.summary["mi_nats"])
    # one-hot labels give the same report as class ids
    onehot = compute_bias_report(contexts, np.eye(3)[classes], multi_label=False, min_count=1, permutations=3)
    assert onehot.summary["nmi"] == pytest.approx(report.summary["nmi"])


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


def test_table_reader_parses_list_literals_and_names_missing_columns(tmp_path):
    table = tmp_path / "train.csv"
    table.write_text(
        "Index,Folder,Categorical_Labels\n"
        "0,mscoco/images,\"['Engagement', 'Happiness']\"\n"
        "1,framesdb/images,['Anticipation']\n"
        "2,mscoco/images,\"['Happiness']\"\n"
    )
    data = read_annotation_table(table, "Folder", "Categorical_Labels")
    assert data.multi_label and data.emotion_names == ["Anticipation", "Engagement", "Happiness"]
    assert data.labels.tolist() == [[0, 1, 1], [1, 0, 0], [0, 0, 1]]
    assert data.contexts.tolist() == ["mscoco/images", "framesdb/images", "mscoco/images"]
    with pytest.raises(KeyError, match=r"train\.csv.*'Scene'.*'Index', 'Folder', 'Categorical_Labels'"):
        read_annotation_table(table, "Scene", "Categorical_Labels")


def test_table_reader_single_label_column(tmp_path):
    table = tmp_path / "people.csv"
    table.write_text("scene,label\npark,2\npark,10\nstreet,2\n")
    data = read_annotation_table(table, "scene", "label")
    assert not data.multi_label and data.emotion_names == ["2", "10"]
    assert data.labels.tolist() == [[1, 0], [0, 1], [1, 0]]


def test_nearest_prototype():
    prototypes = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = np.array([[1.0, 1.0], [9.0, -1.0], [-1.0, 12.0], [6.0, 0.0]])
    assert nearest_prototype(features, prototypes, chunk_size=3).tolist() == [0, 1, 2, 1]


def test_arguments_require_one_source_and_table_columns(tmp_path):
    parser = add_bias_report_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args([])
    with pytest.raises(SystemExit, match="--label-column"):
        main(["--table", "x.csv", "--context-column", "Folder", "--out", str(tmp_path)])


@pytest.mark.skipif(not EMOTIC_CSV.is_dir(), reason="../shared/data/emotic_csv is not here")
def test_table_mode_on_the_real_emotic_train_csv(tmp_path, capsys):
    out = tmp_path / "report"
    report = main(
        [
            "--table", str(EMOTIC_CSV / "train.csv"), "--context-column", "Folder",
            "--label-column", "Categorical_Labels", "--out", str(out), "--permutations", "2",
        ]
    )  # fmt: skip
    assert report.summary["num_samples"] == 23266
    assert report.summary["num_emotions"] == 26 and report.summary["task"] == "multi-label"
    assert set(report.contexts["context"]) == {
        "mscoco/images",
        "framesdb/images",
        "emodb_small/images",
        "ade20k/images",
    }
    for name in ("contexts.csv", "context_emotion.csv", "emotions.csv", "summary.txt", "summary.json",
                 "ratio_heatmap.png", "entropy_histograms.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text())["num_samples"] == 23266
    assert "Context-bias report: context = Folder" in capsys.readouterr().out
    # the source database does tell something about the labels, far above chance
    assert report.summary["mean_normalised_mi"] > 10 * report.summary["null_mean_normalised_mi"]


def _synthetic_scenes_and_targets(bias: float, size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """True scene and emotion of each training sample, rendered at the smallest size (labels do not depend on it)."""
    from ccim_lightning.datamodules import SyntheticContextDataModule

    datamodule = SyntheticContextDataModule(
        bias=bias, train_size=size, image_size=16, subject_size=4, max_distractors=0
    )
    dataset = datamodule.dictionary_dataset()
    samples = [dataset[i] for i in range(len(dataset))]
    return np.array([int(s["scene"]) for s in samples]), np.array([int(s["target"]) for s in samples])


def test_synthetic_bias_shows_up_as_mutual_information(tmp_path):
    biased = compute_bias_report(*_synthetic_scenes_and_targets(0.9), context_name="scene")
    unbiased = compute_bias_report(*_synthetic_scenes_and_targets(0.0), context_name="scene")
    assert biased.summary["nmi"] > 0.5
    assert unbiased.summary["nmi"] < 0.03
    assert biased.summary["nmi"] > 10 * unbiased.summary["nmi"]
    assert biased.summary["mean_normalised_mi"] > 10 * unbiased.summary["mean_normalised_mi"]
    paths = write_bias_report(biased, tmp_path)
    assert paths["heatmap"].stat().st_size > 0 and paths["histograms"].stat().st_size > 0


def test_a_random_dictionary_is_refused_before_any_work(tmp_path, capsys):
    from ccim_lightning.dictionary.store import ConfounderDictionary

    path = ConfounderDictionary.random(4, 8, seed=0).save(tmp_path / "random.pt")
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "not-read.yaml"), "--dictionary", str(path), "--out", str(tmp_path)])
    assert "random-Z" in capsys.readouterr().err


CLUSTER_CONFIG = """
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  callbacks:
    - class_path: ccim_lightning.callbacks.ConfounderDictionaryCallback
      init_args: {{extractor: resnet18, cache: {cache}, progress: false}}
model:
  class_path: ccim_lightning.CCIMLightningModule
  init_args:
    backbone:
      class_path: ccim_lightning.hosts.TwoStreamHost
      init_args: {{subject_encoder: small_cnn, context_encoder: small_cnn, feature_dim: 32}}
    num_prototypes: 8
    confounder_dim: 512
data:
  class_path: ccim_lightning.datamodules.SyntheticContextDataModule
  init_args: {{bias: 0.9, train_size: 300, image_size: 32, subject_size: 16, batch_size: 100}}
"""


@pytest.mark.slow
def test_cluster_mode_on_synthetic_data_builds_caches_and_reuses_the_dictionary(tmp_path, monkeypatch):
    pytest.importorskip("ccim_lightning.dictionary.kmeans")
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "dictionary.pt"
    config = tmp_path / "config.yaml"
    config.write_text(CLUSTER_CONFIG.format(cache=cache))
    built = main(["--config", str(config), "--out", str(tmp_path / "built"), "--min-count", "5"])
    assert cache.exists()  # built as the callback would, and saved to its cache
    assert built.summary["num_samples"] == 300 and built.summary["task"] == "single-label"
    # the clusters of the (colour/texture-coded) scenes carry the 0.9 bias
    assert built.summary["nmi"] > 0.2 > 5 * built.summary["null_nmi"]
    given = main(["--config", str(config), "--dictionary", str(cache), "--out", str(tmp_path / "given")])
    assert given.summary["nmi"] == pytest.approx(built.summary["nmi"])
