"""Tests for the predictions CSV (PredictionWriter), the trainer presets and the paired configs, and a CLI run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from ccim_lightning import CCIMLightningModule
from ccim_lightning.callbacks.prediction_writer import PredictionWriter, predictions_frame
from ccim_lightning.cli import build_cli
from ccim_lightning.datamodules.synthetic import EMOTIONS, SyntheticContextDataset
from ccim_lightning.hosts import CAERNet, EmotNet, TwoStreamHost

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
SYNTHETIC = str(CONFIGS / "synthetic.yaml")
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
WRITER = "ccim_lightning.callbacks.prediction_writer.PredictionWriter"
# Tiny synthetic data: 16 training samples, an odd number of test samples, 16-pixel subjects.
TINY = [
    "--data.init_args.train_size=16", "--data.init_args.val_size=8", "--data.init_args.test_size=11",
    "--data.init_args.image_size=32", "--data.init_args.subject_size=16", "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=8", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.logger=false",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: on a busy machine, intra-op threads cost far more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the table -----------------------------------------------------------------------------------------------------
def test_frame_has_one_row_per_sample_in_index_order_without_padding_repeats():
    # two "ranks" of an uneven, padded split: sample 0 is repeated as padding
    index = torch.tensor([3, 1, 0, 2, 4, 0])
    probabilities = torch.tensor(
        [[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5], [0.3, 0.7]], dtype=torch.float32
    )
    frame = predictions_frame(index, probabilities, ["calm", "joy"])
    assert list(frame.columns) == ["index", "calm", "joy", "prediction"]
    assert frame["index"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(frame[["calm", "joy"]].to_numpy(), probabilities[[2, 1, 3, 0, 4]].numpy())
    assert frame["prediction"].tolist() == ["joy", "calm", "calm", "joy", "calm"]  # ties: the first class


def test_multilabel_predictions_join_the_labels_at_or_above_the_threshold():
    probabilities = np.array([[0.9, 0.2, 0.6], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    frame = predictions_frame([0, 1, 2], probabilities, ["a", "b", "c"], task="multilabel")
    assert frame["prediction"].tolist() == ["a|c", "", "a|b|c"]
    strict = predictions_frame([0, 1, 2], probabilities, ["a", "b", "c"], task="multilabel", threshold=0.7)
    assert strict["prediction"].tolist() == ["a", "", ""]


def test_sample_table_columns_identify_each_row():
    table = pd.DataFrame({"image": ["x.jpg", "y.jpg", "z.jpg"], "x1": [1, 2, 3], "y1": [4, 5, 6]})
    frame = predictions_frame([2, 0], np.array([[0.2, 0.8], [0.6, 0.4]]), ["p", "q"], sample_table=table)
    assert list(frame.columns) == ["index", "image", "x1", "y1", "p", "q", "prediction"]
    assert frame[["index", "image", "x1"]].values.tolist() == [[0, "x.jpg", 1], [2, "z.jpg", 3]]
    assert frame["prediction"].tolist() == ["p", "q"]


def test_bad_tables_and_names_are_errors():
    probabilities = np.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="one row per sample"):
        predictions_frame([0, 5], probabilities, ["p", "q"], sample_table=pd.DataFrame({"image": ["a", "b"]}))
    with pytest.raises(ValueError, match="index order"):
        predictions_frame([0, 1], probabilities, ["p", "q"], sample_table=pd.DataFrame({"index": [1, 0]}))
    with pytest.raises(ValueError, match="clash"):
        predictions_frame([0, 1], probabilities, ["image", "q"], sample_table=pd.DataFrame({"image": ["a", "b"]}))
    with pytest.raises(ValueError, match="2 class names for 3"):
        predictions_frame([0, 1], np.full((2, 3), 0.3), ["p", "q"])


def test_synthetic_sample_table_matches_the_samples_without_rendering():
    dataset = SyntheticContextDataset("test", 6, seed=3, num_scenes=5, image_size=16, subject_size=8)
    table = dataset.sample_table()
    assert list(table.columns) == ["index", "split", "scene"] and len(table) == 6
    assert table["index"].tolist() == list(range(6)) and set(table["split"]) == {"test"}
    assert table["scene"].tolist() == [int(dataset[i]["scene"]) for i in range(6)]


# --- through a Trainer ---------------------------------------------------------------------------------------------
class Samples(torch.utils.data.Dataset):
    """Random batch-schema samples, without a sample table (the CSV then identifies rows by index)."""

    def __init__(self, size, num_classes):
        self.size, self.num_classes = size, num_classes

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(i)
        return {
            "subject": torch.randn(3, 16, 16, generator=generator),
            "context": torch.randn(3, 16, 16, generator=generator),
            "target": torch.zeros(self.num_classes),
            "index": torch.tensor(i),
        }


def test_multilabel_module_and_several_loaders_write_one_file_each(tmp_path):
    torch.manual_seed(0)
    host = TwoStreamHost(feature_dim=8)
    model = CCIMLightningModule(host, num_classes=3, task="multilabel", attention="none", class_names=["x", "y", "z"])
    writer = PredictionWriter(path=str(tmp_path / "out" / "preds.csv"), threshold=0.5)
    trainer = L.Trainer(
        accelerator="cpu", callbacks=[writer], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loaders = [DataLoader(Samples(5, 3), batch_size=2), DataLoader(Samples(3, 3), batch_size=2)]
    trainer.predict(model, loaders, return_predictions=False)

    assert writer.written == [tmp_path / "out" / "preds_0.csv", tmp_path / "out" / "preds_1.csv"]
    for path, size in zip(writer.written, (5, 3)):
        frame = pd.read_csv(path, keep_default_na=False)
        assert list(frame.columns) == ["index", "x", "y", "z", "prediction"]
        assert frame["index"].tolist() == list(range(size))
        probabilities = frame[["x", "y", "z"]].to_numpy()
        assert ((probabilities > 0) & (probabilities < 1)).all()
        expected = ["|".join(n for n, p in zip("xyz", row) if p >= 0.5) for row in probabilities]
        assert frame["prediction"].tolist() == expected


# --- configs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=[p.name for p in TRAINER_PRESETS])
def test_trainer_presets_compose_with_a_dataset_config(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", SYNTHETIC, "--config", str(preset)]
    if preset.stem != "cpu" and not torch.cuda.is_available():
        args += ["--trainer.accelerator=cpu"]  # the preset itself asks for GPUs; the rest is checked on CPU
        if preset.stem == "ddp":
            args += ["--trainer.devices=2"]
    cli = build_cli(args, run=False)
    trainer = cli.trainer
    # the dataset config's trainer settings and callbacks survive the preset
    assert trainer.max_epochs == 4
    assert any(type(c).__name__ == "ConfounderDictionaryCallback" for c in trainer.callbacks)
    if preset.stem in ("gpu", "ddp"):
        assert trainer.precision == "bf16-mixed"
    if preset.stem == "ddp":
        assert isinstance(trainer.strategy, L.pytorch.strategies.DDPStrategy)
        assert trainer.strategy._timeout.total_seconds() >= 3600
        assert trainer.strategy._layer_sync is not None  # SyncBatchNorm


@pytest.mark.parametrize(
    ("config", "host", "feature_dim", "data", "num_prototypes"),
    [
        ("emotic_emotnet.yaml", EmotNet, 256, "EmoticDataModule", 256),
        ("caers_caernet.yaml", CAERNet, 128, "CAERSDataModule", 128),
        ("groupwalk_emotnet.yaml", EmotNet, 256, "GroupWalkDataModule", 256),
    ],
)
def test_paired_configs_reuse_the_dataset_config_and_reach_every_ablation(
    config, host, feature_dim, data, num_prototypes, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(CONFIGS / config)], run=False)
    assert type(cli.model.backbone) is host and type(cli.datamodule).__name__ == data
    assert cli.model.head.num_prototypes == num_prototypes and cli.model.head.feature_dim == feature_dim
    assert any(isinstance(c, PredictionWriter) for c in cli.trainer.callbacks)

    small = [  # the ablations only change the head and the callback: tiny streams keep this fast
        "--model.init_args.backbone.init_args.subject_encoder=small_cnn",
        "--model.init_args.backbone.init_args.context_encoder=small_cnn",
    ]
    ablation = build_cli(
        [
            "--config", str(CONFIGS / config), *small, "--model.init_args.uniform_attention=true",
            "--model.init_args.use_prior=false", "--trainer.callbacks.init_args.source=random",
            "--trainer.callbacks.init_args.mask_subject=false",
        ],
        run=False,
    )  # fmt: skip
    head = ablation.model.head
    assert head.uniform_attention and not head.use_prior
    (callback,) = [c for c in ablation.trainer.callbacks if type(c).__name__ == "ConfounderDictionaryCallback"]
    assert callback.source == "random" and callback.mask_subject is False
    baseline = build_cli(["--config", str(CONFIGS / config), *small, "--model.init_args.attention=none"], run=False)
    assert not baseline.model.head.uses_dictionary


# --- through the CLI -----------------------------------------------------------------------------------------------
def callbacks_arg(csv):
    """The synthetic config's callbacks, with a small scene CNN, plus the PredictionWriter."""
    return "--trainer.callbacks=" + json.dumps(
        [
            {
                "class_path": "ccim_lightning.callbacks.ConfounderDictionaryCallback",
                "init_args": {"extractor": "test_resnet", "num_iterations": 5, "progress": False},
            },
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "ckpt"}},
            {"class_path": WRITER, "init_args": {"path": str(csv)}},
        ]
    )


def test_one_batch_fit_then_predict_writes_the_csv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "predictions" / "synthetic.csv"
    common = [
        "--config", SYNTHETIC, *TINY, callbacks_arg(csv), "--model.init_args.num_prototypes=4",
        "--model.init_args.confounder_dim=96", "--model.init_args.backbone.init_args.feature_dim=16",
    ]  # fmt: skip
    fitted = build_cli(["fit", *common, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    assert bool(fitted.model.head.dictionary_filled)
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")

    build_cli(["predict", *common, "--ckpt_path", str(checkpoint)])
    frame = pd.read_csv(csv)
    classes = list(EMOTIONS[:4])
    assert list(frame.columns) == ["index", "split", "scene", *classes, "prediction"]
    assert frame["index"].tolist() == list(range(11))  # the predict split (test_unbiased), in sample order
    assert set(frame["split"]) == {"test_unbiased"}
    probabilities = frame[classes].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert frame["prediction"].tolist() == [classes[i] for i in probabilities.argmax(axis=1)]


@pytest.mark.slow
def test_ddp_predictions_are_merged_into_one_file_in_sample_order(tmp_path):
    csv = tmp_path / "ddp.csv"
    args = [
        "predict", "--config", SYNTHETIC, *TINY, callbacks_arg(csv), "--model.init_args.attention=none",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "ccim_lightning.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    frame = pd.read_csv(csv)
    assert frame["index"].tolist() == list(range(11))  # 11 samples over 2 ranks: 6 + 5, merged, nothing repeated
    assert set(frame["split"]) == {"test_unbiased"}
    np.testing.assert_allclose(frame[list(EMOTIONS[:4])].to_numpy().sum(axis=1), 1.0, atol=1e-5)
    assert not list(tmp_path.glob("ddp*.csv"))[1:]  # one file
