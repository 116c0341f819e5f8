from pathlib import Path

import pytest
import torch

from ccim_lightning import CCIMLightningModule
from ccim_lightning.commands.checkpoint_config import CheckpointConfigMismatch
from ccim_lightning.commands.cli import build_cli, scene_feature_dim
from ccim_lightning.commands.main import main, run_command

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
SYNTHETIC = str(Path(__file__).parents[2] / "configs" / "synthetic.yaml")
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


def run_checkpoint(root: Path) -> Path:
    """The one last.ckpt of the runs under ``root`` (a test that finds two has a collision)."""
    found = sorted(root.glob("**/checkpoints/last.ckpt"))
    assert len(found) == 1, found
    return found[0]


def test_fit_then_test_from_checkpoint_reports_both_test_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fitted = build_cli(["fit", "--config", SYNTHETIC, *TINY])
    assert bool(fitted.model.head.dictionary_filled)
    checkpoint = run_checkpoint(tmp_path / "runs" / "synthetic")

    tested = build_cli(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", "last"])
    metrics = tested.trainer.callback_metrics
    for name in ("test_biased/acc", "test_unbiased/acc", "test_biased/macro_acc", "test_unbiased/macro_acc"):
        assert 0.0 <= float(metrics[name]) <= 1.0, name
    # the dictionary came from the checkpoint, not from a rebuild
    assert torch.equal(tested.model.head.dictionary, fitted.model.head.dictionary)

    # A checkpoint written by the CLI restores the whole model, host included, without arguments.
    restored = CCIMLightningModule.load_from_checkpoint(checkpoint)
    assert torch.equal(restored.head.dictionary, fitted.model.head.dictionary)
    assert restored.num_classes == 4 and restored.task == "multiclass"


def test_named_groups_reach_the_dictionary_and_checkpoint_and_runs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = build_cli(["fit", "--config", SYNTHETIC, *TINY, "--dictionary.source", "random", "--checkpoint.monitor",
                       "val/loss", "--trainer.default_root_dir", "elsewhere"])  # fmt: skip
    (callback,) = [cb for cb in first.trainer.callbacks if type(cb).__name__ == "ConfounderDictionaryCallback"]
    assert callback.recipe.source == "random" and callback.last_dictionary.source == "random"
    assert first.trainer.checkpoint_callback.monitor == "val/loss"
    # Checkpoints land under the run's default_root_dir, one folder per run: a second run never writes beside it.
    first_ckpt = run_checkpoint(tmp_path / "elsewhere")
    build_cli(["fit", "--config", SYNTHETIC, *TINY, "--trainer.default_root_dir", "elsewhere"])
    found = sorted((tmp_path / "elsewhere").glob("**/checkpoints/*.ckpt"))
    assert all("-v1" not in p.name for p in found)
    assert len({p.parent for p in found}) == 2 and first_ckpt.exists()
    assert not (tmp_path / "runs").exists()


def test_dictionary_options_are_the_recipe_and_the_callback_is_built_from_it(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import Checkpoint

    from ccim_lightning.callbacks import ConfounderDictionaryCallback
    from ccim_lightning.dictionary.recipe import DictionaryRecipe

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", SYNTHETIC, *TINY, "--dictionary.seed", "3", "--dictionary.cache", "z.pt"], run=False)
    assert type(cli.recipe) is DictionaryRecipe
    assert (cli.recipe.seed, cli.recipe.cache, cli.recipe.extractor) == (3, "z.pt", "test_efficientnet")
    callbacks = cli.trainer.callbacks
    (position,) = [i for i, cb in enumerate(callbacks) if isinstance(cb, ConfounderDictionaryCallback)]
    assert callbacks[position].recipe is cli.recipe
    assert all(not isinstance(cb, Checkpoint) for cb in callbacks[:position])  # checkpoints still come last
    with pytest.raises(SystemExit):  # a recipe field that does not exist is the config parser's error
        build_cli(["--config", SYNTHETIC, "--dictionary.sede", "3"], run=False)


def test_confounder_dim_follows_the_scene_cnn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", SYNTHETIC, *TINY], run=False)
    assert cli.model.head.confounder_dim == 256  # test_efficientnet's pooled width
    cli = build_cli(["--config", SYNTHETIC, *TINY, "--dictionary.extractor", "test_resnet"], run=False)
    assert cli.model.head.confounder_dim == 96 == scene_feature_dim("test_resnet")


def test_checkpoint_that_disagrees_with_the_config_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", SYNTHETIC, *TINY, "--model.init_args.attention", "none"])
    with pytest.raises(CheckpointConfigMismatch) as error:
        build_cli(["test", "--config", SYNTHETIC, *TINY, "--model.init_args.num_prototypes=4", "--ckpt_path", "last"])
    message = str(error.value)
    assert "attention: config 'dot_product', checkpoint 'none'" in message
    assert "num_prototypes: config 4, checkpoint 8" in message
    # Agreeing settings (here given as overrides) test fine.
    tested = build_cli(["test", "--config", SYNTHETIC, *TINY, "--model.init_args.attention", "none", "--ckpt_path",
                        "last"])  # fmt: skip
    assert tested.model.head.attention == "none"


def test_ckpt_path_last_without_a_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^ccim: error: --ckpt_path last: no run under"):
        main(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", "last"])


def test_more_prototypes_than_training_samples_is_one_line_naming_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^ccim: error: .*asks for 200 clusters .*--model.init_args.num_prototypes"):
        main(["fit", "--config", SYNTHETIC, *TINY, "--model.init_args.num_prototypes=200"])


def test_overview_lists_every_subcommand_and_help_is_readable(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "build-dictionary", "bias-report"):
        assert f"  {name} " in text
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "CCIMLightningModule"])
    help_text = capsys.readouterr().out
    assert len(help_text.splitlines()) < 300
    assert "ccim_lightning.hosts.EmotNet" in help_text and "torch.nn.Conv2d" not in help_text
    with pytest.raises(SystemExit):
        main(["build-dictionary", "--help"])
    assert "--out" in capsys.readouterr().out


def test_build_dictionary_then_fit_reuses_it_and_resume_keeps_it(tmp_path, monkeypatch, caplog):
    import logging

    from ccim_lightning.dictionary.store import ConfounderDictionary

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "dictionary.pt"
    with pytest.warns() as record:
        out = run_command(["build-dictionary", "--config", SYNTHETIC, *TINY, "--out", str(cache)])
    assert not [w for w in record if "LightningCLI's args parameter" in str(w.message)]
    assert out == cache
    saved = ConfounderDictionary.load(cache)
    assert saved.num_prototypes == 8 and saved.num_samples == 128 and saved.key.extractor == "test_efficientnet"
    assert saved.assignments.shape == (128,)

    # The fit finds the same file through --dictionary.cache and does not extract again.
    import ccim_lightning.dictionary.recipe as recipe_module

    def no_extraction(*args, **kwargs):
        raise AssertionError("the cached dictionary must be reused")

    monkeypatch.setattr(recipe_module, "extract_context_features", no_extraction)
    with caplog.at_level(logging.INFO):
        fitted = build_cli(["fit", "--config", SYNTHETIC, *TINY, "--dictionary.cache", str(cache)])
    assert "reusing" in caplog.text
    assert torch.equal(fitted.model.head.dictionary, saved.prototypes)
    assert torch.equal(fitted.model.train_clusters, saved.assignments)

    # Resuming restores the dictionary from the checkpoint, even where the data would now give another one.
    checkpoint = run_checkpoint(tmp_path / "runs" / "synthetic")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = build_cli(
            ["fit", "--config", SYNTHETIC, *TINY, "--data.init_args.seed=7", "--trainer.max_epochs=2", "--ckpt_path",
             str(checkpoint)]
        )  # fmt: skip
    assert "already filled" in caplog.text
    assert torch.equal(resumed.model.head.dictionary, saved.prototypes)
    assert torch.equal(resumed.model.train_clusters, saved.assignments)


def test_predict_without_a_writer_says_where_predictions_went(tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", SYNTHETIC, *TINY])
    with caplog.at_level(logging.WARNING):
        build_cli(["predict", "--config", SYNTHETIC, *TINY, "--trainer.callbacks=[]", "--ckpt_path", "last"])
    assert "only returned in memory" in caplog.text and "PredictionWriter" in caplog.text


def test_checkpoints_are_loaded_weights_only_and_checked_before_use(tmp_path, monkeypatch):
    import pickle

    from ccim_lightning.checkpoints import CheckpointError

    monkeypatch.chdir(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises((CheckpointError, ValueError), match="truncated.ckpt"):
        build_cli(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", str(truncated)])
    unsafe = tmp_path / "unsafe.ckpt"

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    unsafe.write_bytes(pickle.dumps({"state_dict": {}, "x": Evil()}))
    with pytest.raises(CheckpointError, match="unsafe.ckpt"):
        build_cli(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", str(unsafe)])
    cli = build_cli(["--config", SYNTHETIC, *TINY], run=False)
    assert any(type(cb).__name__ == "FiniteLossGuard" for cb in cli.trainer.callbacks)


def test_nan_dictionary_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", SYNTHETIC, *TINY])
    checkpoint = run_checkpoint(tmp_path / "runs" / "synthetic")
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"]["head.dictionary"][0, 0] = float("nan")
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="head.dictionary"):
        build_cli(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", str(checkpoint)])


def test_a_finished_command_closes_the_process_group_it_opened(tmp_path, monkeypatch):
    import torch.distributed as dist

    from ccim_lightning.commands import main as ccim

    # An open gloo group at interpreter exit can abort a finished run (exit -6): ccim closes the group its command
    # opened (as Lightning's DDP setup does, simulated here), and leaves alone one its caller opened.
    store = iter(tmp_path / f"store{i}" for i in range(3))
    opened = lambda: dist.init_process_group("gloo", init_method=f"file://{next(store)}", rank=0, world_size=1)  # noqa: E731
    try:
        monkeypatch.setattr(ccim, "run_command", lambda args: opened())
        main(["fit"])
        assert not dist.is_initialized()
        monkeypatch.setattr(ccim, "run_command", lambda args: None)
        opened()
        main(["fit"])
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_every_subcommand_reports_input_errors_the_same_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(SystemExit, match="^ccim: error: build-dictionary: say where to save it"):
        main(["build-dictionary", "--config", SYNTHETIC, *TINY])
    with pytest.raises(SystemExit, match="^ccim: error: bias-report needs --table FILE"):
        main(["bias-report", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="^ccim: error: .*missing.ckpt"):
        main(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", missing])
