from pathlib import Path

import pytest
import torch

from ccim_lightning import CCIMLightningModule
from ccim_lightning.cli import build_cli

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
SYNTHETIC = str(Path(__file__).parents[1] / "configs" / "synthetic.yaml")
TINY = [
    "--data.init_args.train_size=128", "--data.init_args.val_size=32", "--data.init_args.test_size=32",
    "--data.init_args.image_size=32", "--data.init_args.subject_size=16", "--data.init_args.num_workers=0",
    "--model.init_args.num_prototypes=8", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(config)], run=False)
    assert isinstance(cli.model, CCIMLightningModule)
    # num_classes and task come from the datamodule
    assert cli.model.num_classes == cli.datamodule.num_classes
    assert cli.model.task == cli.datamodule.task


def test_fit_then_test_from_checkpoint_reports_both_test_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fitted = build_cli(["fit", "--config", SYNTHETIC, *TINY])
    assert bool(fitted.model.head.dictionary_filled)
    checkpoint = tmp_path / "runs" / "synthetic" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()

    tested = build_cli(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", str(checkpoint)])
    metrics = tested.trainer.callback_metrics
    for name in ("test_biased/acc", "test_unbiased/acc", "test_biased/macro_acc", "test_unbiased/macro_acc"):
        assert 0.0 <= float(metrics[name]) <= 1.0, name
    # the dictionary came from the checkpoint, not from a rebuild
    assert torch.equal(tested.model.head.dictionary, fitted.model.head.dictionary)

    # A checkpoint written by the CLI restores the whole model, host included, without arguments.
    restored = CCIMLightningModule.load_from_checkpoint(checkpoint)
    assert torch.equal(restored.head.dictionary, fitted.model.head.dictionary)
    assert restored.num_classes == 4 and restored.task == "multiclass"
