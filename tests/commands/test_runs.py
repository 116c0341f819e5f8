"""A run owns its folder, never loses its last good checkpoint, and a debugging run never becomes ``last``."""

import multiprocessing
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from ccim_lightning.checkpoints import AtomicCheckpointIO, load_checkpoint
from ccim_lightning.commands.cli import build_cli, claim_version_folder
from ccim_lightning.commands.errors import CommandError
from ccim_lightning.commands.main import run_command

SYNTHETIC = str(Path(__file__).parents[2] / "configs" / "synthetic.yaml")
TINY = [
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=16",
    "--data.init_args.test_size=16",
    "--data.init_args.image_size=32",
    "--data.init_args.subject_size=16",
    "--data.init_args.num_workers=0",
    "--model.init_args.num_prototypes=4",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
RACERS = 6


def _claim(parent: str, barrier, results) -> None:
    barrier.wait()  # all claim at the same moment
    results.put(claim_version_folder(Path(parent)).name)


def test_runs_started_together_each_claim_their_own_version_folder(tmp_path):
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)  # an earlier run
    context = multiprocessing.get_context("fork")  # no re-import: all start within milliseconds
    barrier, results = context.Barrier(RACERS), context.Queue()
    racers = [context.Process(target=_claim, args=(str(tmp_path / "lightning_logs"), barrier, results))
              for _ in range(RACERS)]  # fmt: skip
    for racer in racers:
        racer.start()
    claimed = sorted(results.get(timeout=120) for _ in racers)
    for racer in racers:
        racer.join(timeout=60)
    assert claimed == sorted(f"version_{i}" for i in range(1, RACERS + 1))  # distinct, none took version_0


def test_fit_writes_logs_config_and_checkpoints_into_the_folder_it_claimed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "lightning_logs" / "version_0").mkdir(parents=True)  # claimed by a run still starting
    cli = build_cli(["fit", "--config", SYNTHETIC, *TINY, "--trainer.default_root_dir", "runs"])
    run = tmp_path / "runs" / "lightning_logs" / "version_1"
    assert Path(cli.trainer.log_dir).resolve() == run.resolve()
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "runs" / "lightning_logs" / "version_0").iterdir()) == []  # the other run's, untouched
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.slow
def test_two_ccim_fit_processes_started_together_never_share_a_folder(tmp_path):
    commands = [
        [sys.executable, "-m", "ccim_lightning.commands.main", "fit", "--config", SYNTHETIC, *TINY,
         "--trainer.default_root_dir", str(tmp_path), "--model.init_args.hidden_dim", str(width)]
        for width in (32, 48)
    ]  # fmt: skip
    processes = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for command in commands]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    widths = set()
    for run in runs:  # each folder's config is the one its checkpoint was trained with
        config = yaml.safe_load((run / "config.yaml").read_text())
        saved = load_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
        assert config["model"]["init_args"]["hidden_dim"] == saved["hidden_dim"]
        widths.add(saved["hidden_dim"])
    assert widths == {32, 48}


def test_fast_dev_run_writes_no_checkpoint_that_last_could_pick(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", SYNTHETIC, *TINY, "--trainer.fast_dev_run", "true"])
    assert "fast_dev_run" in caplog.text and "no checkpoint is saved" in caplog.text
    assert list(tmp_path.glob("**/*.ckpt")) == []
    assert not (tmp_path / "runs" / "synthetic" / "lightning_logs").exists()  # no empty folder claimed either
    with pytest.raises(CommandError, match="no run under"):
        build_cli(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", "last"])


def test_disabled_checkpointing_trains_saves_nothing_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", SYNTHETIC, *TINY, "--trainer.enable_checkpointing", "false"])
    assert cli.trainer.global_step > 0 and cli.trainer.checkpoint_callback is None
    assert "enable_checkpointing false: no checkpoint is saved" in caplog.text
    assert list(tmp_path.glob("**/*.ckpt")) == []
    with pytest.raises(CommandError, match="no run under"):
        build_cli(["test", "--config", SYNTHETIC, *TINY, "--ckpt_path", "last"])


def test_evaluating_a_checkpoint_raises_no_warning_about_the_suites_own_callbacks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", SYNTHETIC, *TINY])
    checkpoints = sorted(p.name for p in tmp_path.glob("**/*.ckpt"))
    for subcommand in ("validate", "test", "predict"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_cli([subcommand, "--config", SYNTHETIC, *TINY, "--ckpt_path", "last"])
        messages = [str(w.message) for w in caught]
        assert not [m for m in messages if "Please add the following callbacks" in m or "dirpath has changed" in m]
    assert sorted(p.name for p in tmp_path.glob("**/*.ckpt")) == checkpoints  # evaluating saved nothing


def test_build_dictionary_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_command(["build-dictionary", "--config", SYNTHETIC, *TINY, "--out", "z.pt"])
    assert out.exists()
    assert not (tmp_path / "runs").exists()


def test_a_metric_name_with_a_slash_in_the_checkpoint_filename_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandError, match="auto_insert_metric_name false") as error:
        build_cli(["fit", "--config", SYNTHETIC, *TINY, "--checkpoint.filename", "{epoch}-{val/acc:.2f}"])
    assert "'val/acc'" in str(error.value)
    assert not (tmp_path / "runs").exists()  # refused before anything was created
    # The suggested form works: the value without its name, no sub-folder.
    build_cli(["fit", "--config", SYNTHETIC, *TINY, "--checkpoint.auto_insert_metric_name", "false",
               "--checkpoint.filename", "epoch={epoch}-val_acc={val/acc:.2f}", "--checkpoint.monitor", "val/acc",
               "--checkpoint.mode", "max"])  # fmt: skip
    (best,) = [p for p in tmp_path.glob("**/checkpoints/**/*.ckpt") if p.name != "last.ckpt"]
    assert best.parent.name == "checkpoints" and best.name.startswith("epoch=0-val_acc=")


def test_a_confounder_dim_that_disagrees_with_the_scene_cnn_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandError, match=r"confounder_dim is 512, .*test_efficientnet gives features of width 256"):
        build_cli(["--config", SYNTHETIC, *TINY, "--model.init_args.confounder_dim", "512"], run=False)
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    confounder_dim: 100\n")
    with pytest.raises(CommandError, match=r"model.init_args.confounder_dim in .*extra.yaml is 100"):
        build_cli(["--config", SYNTHETIC, "--config", str(extra), *TINY], run=False)
    # The value the extractor gives is accepted (e.g. from a run's saved config.yaml).
    cli = build_cli(["--config", SYNTHETIC, *TINY, "--model.init_args.confounder_dim=256"], run=False)
    assert cli.model.head.confounder_dim == 256


def test_a_prediction_file_that_cannot_be_written_keeps_the_old_one_and_leaves_no_partial(tmp_path, monkeypatch):
    import errno

    import pandas as pd

    from ccim_lightning.checkpoints import AtomicWriteError

    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", SYNTHETIC, *TINY])
    writer = tmp_path / "writer.yaml"
    writer.write_text(
        "trainer:\n  callbacks:\n    - class_path: ccim_lightning.callbacks.PredictionWriter\n"
        "      init_args: {path: out/preds.csv, overwrite: true}\n"
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "preds.csv").write_text("earlier,predictions\n")

    def fills_the_disk(frame, buffer, **kwargs):
        buffer.write("index,happy\n0,0.5\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fills_the_disk)
    with pytest.raises(AtomicWriteError, match=r"preds\.csv.*previous file is unchanged"):
        build_cli(["predict", "--config", SYNTHETIC, "--config", str(writer), *TINY, "--ckpt_path", "last"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["preds.csv"]
    assert (tmp_path / "out" / "preds.csv").read_text() == "earlier,predictions\n"
