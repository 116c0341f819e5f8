"""``python -m benchmarks.debias --task ...``: the real-shaped tasks' plumbing, and the multilabel bootstrap's mAP."""

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from benchmarks.debias import multilabel
from benchmarks.debias.cli import main, parse_args
from benchmarks.debias.data import RunConfig, generator_settings
from benchmarks.debias.tasks import TASKS, metric_of
from tests.benchmarks.test_debias import TINY, restore_global_state  # noqa: F401 (an autouse fixture)


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "debias_runs.jsonl").read_text().splitlines()]


def test_weighted_map_matches_scikit_learn_with_sample_weights_and_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((60, 3)), 1).astype(np.float32)  # rounded: many ties
    labels = rng.random((60, 3)) < np.array([0.5, 0.2, 0.05])
    labels[:, 2] = False
    labels[:2, 2] = True
    weights = rng.multinomial(60, np.full(60, 1 / 60), size=5).astype(np.float32)
    expected = []
    for w in weights:
        per_class = []
        for c in range(3):
            positive = (w * labels[:, c]).sum() > 0
            per_class.append(average_precision_score(labels[:, c], scores[:, c], sample_weight=w) if positive else 0.0)
        expected.append(np.mean(per_class))
    assert np.allclose(multilabel.weighted_map(scores, labels, weights), expected, atol=1e-5)
    # unit weights: the record's mAP (torchmetrics, as the model logs it) and scikit-learn's mean AP agree
    ones = np.ones((1, 60), np.float32)
    assert multilabel.weighted_map(scores, labels, ones)[0] == pytest.approx(
        multilabel.mean_average_precision(scores, labels), abs=1e-5
    )


def test_scores_round_trip_through_the_record():
    rng = np.random.default_rng(1)
    scores, labels = rng.random((7, 5)).astype(np.float32), rng.random((7, 5)) < 0.3
    back_scores, back_labels = multilabel.unpack_scores(json.loads(json.dumps(multilabel.pack_scores(scores, labels))))
    assert np.array_equal(back_labels, labels) and np.allclose(back_scores, scores, atol=1e-3)


def test_task_overrides_reach_the_data_and_the_generator_text():
    assert metric_of("emotic_like") == "mAP" and metric_of("caers_like") == "acc" and metric_of("default") == "acc"
    config = RunConfig(task="caers_like")
    assert config.data_kwargs(0, 0.9)["num_classes"] == 7 and config.data_kwargs(0, 0.9)["num_scenes"] == 16
    assert "num_classes" not in RunConfig().data_kwargs(0, 0.9)  # the default task's records stay comparable
    assert generator_settings() == "synthetic-v2(classes=4,scenes=4,size=64/32,noise=0.4/0.06,distractors=2)"
    assert generator_settings("emotic_like").endswith("classes=26,scenes=16,size=64/32,noise=0.4/0.06,distractors=2"
                                                      ",task=multilabel)")  # fmt: skip
    assert set(TASKS) == {"default", "caers_like", "emotic_like", "continuous"}
    assert parse_args(["--task", "continuous"]).task == "continuous"
    with pytest.raises(SystemExit):
        parse_args(["--task", "emotic"])
    with pytest.raises(SystemExit, match="--task default only"):
        main(["--task", "caers_like", "--ccim-checkpoint", "x.ckpt", "--out", "unused"])


@pytest.mark.parametrize("task", ["caers_like", "emotic_like", "continuous"])
def test_task_runs_record_their_metric_and_report_it(task, tmp_path, capsys):
    tiny = [*TINY, "--train-size", "64", "--test-size", "40", "--seeds", "0"]
    assert main(["--task", task, "--only", "baseline", "oracle", *tiny, "--out", str(tmp_path)]) == 0
    records = _records(tmp_path)
    assert [r["setting"] for r in records] == ["baseline", "oracle"]
    data = records[0]["config"]["data"]
    assert data["generator"] == generator_settings(task) and all(data[k] == v for k, v in TASKS[task].items())
    out = capsys.readouterr().out
    if task == "emotic_like":
        for record in records:
            assert record["metric"] == "mAP" and record["scores"]["size"] == 40
            for test_set in ("biased", "unbiased"):
                scores, labels = multilabel.unpack_scores(record["scores"][test_set])
                assert scores.shape == (40, 26) and labels.shape == (40, 26)
                assert record[f"{test_set}_mAP"] == pytest.approx(multilabel.mean_average_precision(scores, labels))
        assert "biased mAP" in out and "Macro mAP" in (tmp_path / "debias.md").read_text()
    else:
        assert all("correct" in r and "metric" not in r for r in records)
        assert "| baseline |" in (tmp_path / "debias.md").read_text()
    # resumable: a second call with --resume trains nothing
    assert main(["--task", task, "--only", "baseline", "oracle", *tiny, "--out", str(tmp_path), "--resume"]) == 0
    assert len(_records(tmp_path)) == 2 and "already done, skipped" in capsys.readouterr().out
