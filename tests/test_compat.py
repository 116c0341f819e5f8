"""The one private Lightning API the project reads (``ccim_lightning/compat.py``): fails when Lightning changes it."""

import contextvars
from pathlib import Path

from ccim_lightning.commands.cli import build_cli
from ccim_lightning.compat import _given_hyperparameters, instantiated_by_cli

SYNTHETIC = str(Path(__file__).parents[1] / "configs" / "synthetic.yaml")


def test_lightning_still_has_the_context_variable():
    assert isinstance(_given_hyperparameters, contextvars.ContextVar)
    assert not instantiated_by_cli()  # outside LightningCLI's instantiation


def test_the_cli_sets_it_so_the_checkpoint_keeps_the_host_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", SYNTHETIC, "--data.init_args.train_size=16"], run=False)
    # Seen as a CLI instantiation: the backbone is stored as its config, not dropped (the Python-call behaviour).
    backbone = cli.model.hparams["backbone"]
    assert backbone["class_path"] == "ccim_lightning.hosts.TwoStreamHost"
