"""``ccim fit`` / ``ccim test`` on the synthetic tasks shaped like CAER-S and EMOTIC, with every debiasing method."""

import inspect

import pytest

from ccim_lightning import debias
from ccim_lightning.commands.cli import build_cli
from tests.commands.test_cli import SYNTHETIC, TINY

#: Every concrete method the package exports (a method added to ``debias.__all__`` is tested here too).
METHODS = [
    name
    for name in debias.__all__
    if inspect.isclass(getattr(debias, name))
    and issubclass(getattr(debias, name), debias.DebiasMethod)
    and getattr(debias, name) is not debias.DebiasMethod  # the base class, not a method
    and not inspect.isabstract(getattr(debias, name))
]
#: Methods whose rule is defined for one label per sample only: on multilabel data they refuse with a clear error.
MULTICLASS_ONLY = {"GroupBalancedReweighting"}
CAERS_LIKE = ["--data.init_args.num_classes", "7", "--data.init_args.num_scenes", "16"]
MULTILABEL = ["--data.init_args.task", "multilabel", "--data.init_args.num_classes", "12"]


def fit_and_test(task_args: list[str], extra: list[str]) -> dict:
    build_cli(["fit", "--config", SYNTHETIC, *TINY, *task_args, *extra])
    tested = build_cli(["test", "--config", SYNTHETIC, *TINY, *task_args, *extra, "--ckpt_path", "last"])
    return {name: float(value) for name, value in tested.trainer.callback_metrics.items()}


def test_multilabel_fit_and_test_log_map_on_both_test_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = fit_and_test(MULTILABEL, [])
    for name in ("test_biased/mAP", "test_unbiased/mAP", "test_unbiased/AP/affection"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert "test_unbiased/acc" not in metrics
    # the config's checkpoint monitor (val/acc) was pointed at val/mAP: the best checkpoint was chosen on it
    assert len(list(tmp_path.glob("runs/synthetic/**/checkpoints/epoch=*.ckpt"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("task", ["caers_like", "multilabel"])
@pytest.mark.parametrize("method", METHODS)
def test_every_debiasing_method_trains_and_tests_on_the_real_shaped_tasks(method, task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task_args = CAERS_LIKE if task == "caers_like" else MULTILABEL
    if task == "multilabel" and method in MULTICLASS_ONLY:
        with pytest.raises(ValueError, match="is for task='multiclass'.*use ClusterReweighting for multilabel"):
            fit_and_test(task_args, ["--model.init_args.debias", method])
        return
    metrics = fit_and_test(task_args, ["--model.init_args.debias", method])
    metric = "acc" if task == "caers_like" else "mAP"
    for test_set in ("biased", "unbiased"):
        assert 0.0 <= metrics[f"test_{test_set}/{metric}"] <= 1.0


def test_every_method_is_listed():
    assert {"CLEF", "ClusterReweighting", "GroupDRO", "ProductOfExperts"} <= set(METHODS)
