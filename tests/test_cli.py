from pathlib import Path

import pytest
import torch

from ccim_lightning import CCIMLightningModule
from ccim_lightning.cli import build_cli

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
SYNTHETIC = str(Path(__file__).parents[1] / "configs" / "synthetic.yaml")
TINY = [
    "--data.init_args.train_size=128",
    "--data.init_args.val_size=32",
    "--data.init_args.test_size=32",
    "--data.init_args.image_size=32",
    "--data.init_args.subject_size=16",
    "--data.init_args.num_workers=0",
    "--model.init_args.num_prototypes=8",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
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


def test_build_dictionary_then_fit_reuses_it_and_resume_keeps_it(tmp_path, monkeypatch, caplog):
    import logging

    from ccim_lightning.cli import build_dictionary
    from ccim_lightning.dictionary.store import ConfounderDictionary

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "dictionary.pt"
    out = build_dictionary(["--config", SYNTHETIC, *TINY, "--out", str(cache)])
    assert out == cache
    saved = ConfounderDictionary.load(cache)
    assert saved.num_prototypes == 8 and saved.num_samples == 128 and saved.extractor == "test_efficientnet"

    # The fit finds the same file through the callback's cache and does not extract again.
    import ccim_lightning.callbacks.confounder_dictionary as callback_module

    def no_extraction(*args, **kwargs):
        raise AssertionError("the cached dictionary must be reused")

    monkeypatch.setattr(callback_module, "extract_context_features", no_extraction)
    override = tmp_path / "cache.yaml"
    override.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: ccim_lightning.callbacks.ConfounderDictionaryCallback\n"
        f"      init_args: {{extractor: test_efficientnet, cache: {cache}}}\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: runs/synthetic/checkpoints, save_last: true}\n"
    )
    with caplog.at_level(logging.INFO):
        fitted = build_cli(["fit", "--config", SYNTHETIC, "--config", str(override), *TINY])
    assert "reusing" in caplog.text
    assert torch.equal(fitted.model.head.dictionary, saved.prototypes)

    # Resuming restores the dictionary from the checkpoint, even where the data would now give another one.
    checkpoint = tmp_path / "runs" / "synthetic" / "checkpoints" / "last.ckpt"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = build_cli(
            [
                "fit",
                "--config",
                SYNTHETIC,
                *TINY,
                "--data.init_args.seed=7",
                "--trainer.max_epochs=2",
                "--ckpt_path",
                str(checkpoint),
            ]
        )
    assert "already filled" in caplog.text
    assert torch.equal(resumed.model.head.dictionary, saved.prototypes)


def test_test_from_checkpoint_needs_no_dictionary_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fitted = build_cli(["fit", "--config", SYNTHETIC, *TINY])
    checkpoint = tmp_path / "runs" / "synthetic" / "checkpoints" / "last.ckpt"
    tested = build_cli(["test", "--config", SYNTHETIC, *TINY, "--trainer.callbacks=[]", "--ckpt_path", str(checkpoint)])
    assert not tested.trainer.callbacks or all(
        type(cb).__name__ != "ConfounderDictionaryCallback" for cb in tested.trainer.callbacks
    )
    assert torch.equal(tested.model.head.dictionary, fitted.model.head.dictionary)
    assert "test_unbiased/acc" in tested.trainer.callback_metrics
