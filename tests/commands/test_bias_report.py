"""Tests for ccim_lightning.commands.bias_report (``ccim bias-report``): arguments, config overrides, both modes
end to end, and the written files."""

import json
from pathlib import Path

import numpy as np
import pytest

from ccim_lightning.analysis.statistics import compute_bias_report
from ccim_lightning.commands.bias_report import write_bias_report
from ccim_lightning.commands.main import main as ccim_main
from ccim_lightning.commands.main import run_command
from ccim_lightning.dictionary.store import ConfounderDictionary


def main(args):
    """``ccim bias-report ARGS`` as the console script runs it (input errors end in ``ccim: error: ...``)."""
    return ccim_main(["bias-report", *args])


def report_of(args):
    """The report of ``ccim bias-report ARGS``."""
    return run_command(["bias-report", *args])


EMOTIC_CSV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "emotic_csv"


def test_arguments_require_one_source_and_table_columns(tmp_path):
    with pytest.raises(SystemExit, match="needs --table FILE .* or --config FILE"):
        main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--label-column"):
        main(["--table", "x.csv", "--context-column", "Folder", "--out", str(tmp_path)])


def test_help_lists_the_own_options_and_says_config_overrides_are_accepted(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--config", "--table", "--dictionary", "--min-count", "--out"):
        assert option in text
    assert "every other option is a config override as for `ccim fit`" in text
    assert "--data.init_args.bias 0.5" in text


def test_config_overrides_are_refused_with_table_mode_by_name(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("scene,label\npark,a\nstreet,b\n")
    args = ["--table", str(table), "--context-column", "scene", "--label-column", "label", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"--data\.init_args\.bias.*go with --config"):
        main([*args, "--data.init_args.bias", "0.5"])


def test_write_bias_report_writes_tables_summary_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, 3, size=120)
    report = compute_bias_report(contexts, (contexts + rng.integers(0, 2, size=120)) % 3, min_count=5)
    paths = write_bias_report(report, tmp_path / "out")
    assert set(paths) == {"contexts", "cells", "emotions", "summary", "summary_json", "heatmap", "histograms"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert json.loads(paths["summary_json"].read_text())["nmi"] == pytest.approx(report.summary["nmi"])
    assert paths["summary"].read_text().startswith("Context-bias report")
    assert "x2.00 means the emotion is twice as frequent" in paths["summary"].read_text()  # the ratios explained
    # no context with min_count samples: tables, but no plots
    sparse = compute_bias_report(contexts, contexts % 3, min_count=1000, permutations=0)
    assert "heatmap" not in write_bias_report(sparse, tmp_path / "sparse")


@pytest.mark.slow
@pytest.mark.skipif(not EMOTIC_CSV.is_dir(), reason="../shared/data/emotic_csv is not here")
def test_table_mode_on_the_real_emotic_train_csv(tmp_path, capsys):
    out = tmp_path / "report"
    report = report_of(
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


def test_a_random_dictionary_is_refused_before_any_work(tmp_path):
    from ccim_lightning.dictionary.store import ConfounderDictionary

    path = ConfounderDictionary.random(4, 8, seed=0).save(tmp_path / "random.pt")
    with pytest.raises(SystemExit, match="^ccim: error: bias-report --dictionary: .*random-Z"):
        main(["--config", str(tmp_path / "not-read.yaml"), "--dictionary", str(path), "--out", str(tmp_path)])


CLUSTER_CONFIG = """
trainer:
  accelerator: cpu
  devices: 1
  logger: false
dictionary: {{extractor: resnet18, cache: {cache}, progress: false}}
model:
  class_path: ccim_lightning.CCIMLightningModule
  init_args:
    backbone:
      class_path: ccim_lightning.hosts.TwoStreamHost
      init_args: {{subject_encoder: small_cnn, context_encoder: small_cnn, feature_dim: 32}}
    num_prototypes: 8
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
    built = report_of(["--config", str(config), "--out", str(tmp_path / "built"), "--min-count", "5"])
    assert cache.exists()  # built as the callback would, and saved to its cache
    assert built.summary["num_samples"] == 300 and built.summary["task"] == "single-label"
    # the clusters of the (colour/texture-coded) scenes carry the 0.9 bias
    assert built.summary["nmi"] > 0.2 > 5 * built.summary["null_nmi"]
    given = report_of(["--config", str(config), "--dictionary", str(cache), "--out", str(tmp_path / "given")])
    assert given.summary["nmi"] == pytest.approx(built.summary["nmi"])


OVERRIDE_CONFIG = """
trainer:
  accelerator: auto
  devices: 1
  logger: false
dictionary: {extractor: test_efficientnet, progress: false, num_iterations: 5}
model:
  class_path: ccim_lightning.CCIMLightningModule
  init_args:
    backbone:
      class_path: ccim_lightning.hosts.TwoStreamHost
      init_args: {subject_encoder: small_cnn, context_encoder: small_cnn, feature_dim: 16}
    num_prototypes: 8
data:
  class_path: ccim_lightning.datamodules.SyntheticContextDataModule
  init_args: {bias: 0.9, train_size: 300, image_size: 32, subject_size: 8, batch_size: 32, max_distractors: 0}
"""


def test_config_overrides_reach_the_datamodule_and_model_in_cluster_mode(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(OVERRIDE_CONFIG)
    report = report_of(
        [
            "--config", str(config), "--out", str(tmp_path / "out"), "--min-count", "1", "--permutations", "0",
            "--data.init_args.train_size", "24", "--data.init_args.num_classes", "3", "--data.init_args.bias", "0.5",
            "--model.init_args.num_prototypes", "2", "--trainer.accelerator", "cpu", "--device", "cpu",
        ]
    )  # fmt: skip
    # the config says 300 samples, 4 classes (the default) and 8 prototypes; the overrides win
    assert report.summary["num_samples"] == 24
    assert report.summary["num_emotions"] == 3
    assert report.summary["num_contexts"] <= 2
    assert set(report.contexts["context"]) <= {0, 1}


def test_a_typo_in_cluster_mode_is_reported_by_the_config_parser(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(OVERRIDE_CONFIG)
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--data.init_args.trian_size", "24"])
    assert "trian_size" in capsys.readouterr().err


def test_the_ccim_command_routes_bias_report_here(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("scene,label\n" + "park,a\n" * 3 + "street,b\n" * 3)
    ccim_main(["bias-report", "--table", str(table), "--context-column", "scene", "--label-column", "label",
               "--out", str(tmp_path / "out"), "--min-count", "1", "--permutations", "0"])  # fmt: skip
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["nmi"] == pytest.approx(1.0)
    with pytest.raises(SystemExit):
        ccim_main(["bias-report", "--help"])
    assert "config override" in capsys.readouterr().out


def test_a_dictionary_file_of_this_data_gives_its_stored_clusters_without_extracting(tmp_path, monkeypatch):
    from ccim_lightning.commands import dictionary_contexts

    config = tmp_path / "config.yaml"
    config.write_text(OVERRIDE_CONFIG)
    cache = tmp_path / "dictionary.pt"
    small = ["--data.init_args.train_size", "24", "--model.init_args.num_prototypes", "2", "--trainer.accelerator",
             "cpu", "--device", "cpu", "--min-count", "1", "--permutations", "0"]  # fmt: skip
    built = report_of(["--config", str(config), "--dictionary.cache", str(cache), "--out", str(tmp_path / "a"), *small])
    assert cache.exists()

    class Extracted(Exception):
        pass

    def no_extraction(*args, **kwargs):
        raise Extracted

    monkeypatch.setattr(dictionary_contexts, "extract_context_features", no_extraction)
    given = report_of(["--config", str(config), "--dictionary", str(cache), "--out", str(tmp_path / "b"), *small])
    stored = ConfounderDictionary.load(cache)
    assert sorted(given.contexts["context"]) == sorted(set(stored.assignments.tolist()))
    assert given.contexts.set_index("context")["count"].to_dict() == dict(
        zip(*np.unique(stored.assignments.numpy(), return_counts=True))
    )
    assert given.summary["mi_nats"] == pytest.approx(built.summary["mi_nats"])
    # other data (another bias): the stored clusters are not this data's, so the samples are assigned afresh
    with pytest.raises(Extracted):
        report_of(["--config", str(config), "--dictionary", str(cache), "--out", str(tmp_path / "c"), *small,
                   "--data.init_args.bias", "0.5"])  # fmt: skip
