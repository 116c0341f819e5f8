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
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from ccim_lightning import CCIMLightningModule
from ccim_lightning.callbacks.prediction_writer import (
    PredictionWriter,
    dataset_file_stem,
    default_predictions_path,
    predictions_frame,
)
from ccim_lightning.commands.cli import build_cli
from ccim_lightning.datamodules.synthetic import (
    EMOTIONS,
    SceneSettings,
    SyntheticContextDataModule,
    SyntheticContextDataset,
)
from ccim_lightning.hosts import CAERNet, EmotNet, TwoStreamHost

ROOT = Path(__file__).parents[2]
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


def test_multiclass_ground_truth_is_the_class_name_and_index_in_row_order():
    # padded shards: sample 0 twice; rows arrive as samples 2, 0, 1, 0
    probabilities = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.5, 0.3, 0.2]])
    frame = predictions_frame([2, 0, 1, 0], probabilities, ["a", "b", "c"], target=torch.tensor([1, 0, 2, 0]))
    assert list(frame.columns) == ["index", "a", "b", "c", "prediction", "target", "target_index"]
    assert frame["target_index"].tolist() == [0, 2, 1]  # samples 0, 1, 2
    assert frame["target"].tolist() == ["a", "c", "b"]
    assert frame["prediction"].tolist() == ["a", "b", "c"]


def test_multilabel_ground_truth_is_the_joined_labels_and_one_0_1_column_per_class():
    probabilities = np.full((3, 3), 0.4)
    target = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    frame = predictions_frame([1, 0, 2], probabilities, ["a", "b", "c"], task="multilabel", target=target)
    truth = ["target", "true_a", "true_b", "true_c"]
    assert list(frame.columns) == ["index", "a", "b", "c", "prediction", *truth]
    assert frame["target"].tolist() == ["", "a|c", "b"]  # sample 0 is the second row given
    assert frame[truth[1:]].to_numpy().tolist() == [[0, 0, 0], [1, 0, 1], [0, 1, 0]]


@pytest.mark.parametrize(
    ("task", "target", "match"),
    [
        ("multiclass", torch.tensor([0, 3]), "Sample 1 has target 3, not a class index in 0 .. 2"),
        ("multiclass", torch.tensor([-1, 0]), "Sample 0 has target -1"),
        ("multiclass", torch.tensor([0.0, 1.0]), "integer class indices"),
        ("multiclass", torch.zeros(2, 3, dtype=torch.long), "integer class indices"),
        ("multilabel", torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.7, 0.0]]), r"Sample 1 .*must be 0 or 1"),
        ("multilabel", torch.tensor([0, 1]), r"must be \(M, 3\) multi-hot"),
        ("multiclass", torch.tensor([0, 1, 2]), "one row per index"),
    ],
)
def test_bad_targets_are_errors_naming_the_sample(task, target, match):
    with pytest.raises(ValueError, match=match):
        predictions_frame([0, 1], np.full((2, 3), 0.3), ["a", "b", "c"], task=task, target=target)


def test_ground_truth_columns_may_not_clash_with_class_or_identity_names():
    probabilities, target = np.full((2, 2), 0.5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="clash"):
        predictions_frame([0, 1], probabilities, ["target", "q"], target=target)
    with pytest.raises(ValueError, match="clash"):
        predictions_frame(
            [0, 1], probabilities, ["p", "q"], target=target, sample_table=pd.DataFrame({"target": [0, 1]})
        )
    with pytest.raises(ValueError, match="clash"):
        table = pd.DataFrame({"true_p": [0, 1]})
        predictions_frame([0, 1], probabilities, ["p", "q"], "multilabel", target=np.eye(2), sample_table=table)


def test_synthetic_sample_table_matches_the_samples_without_rendering():
    dataset = SyntheticContextDataset("test", 6, SceneSettings(seed=3, num_scenes=5, image_size=16, subject_size=8))
    table = dataset.sample_table()
    assert list(table.columns) == ["index", "split", "scene"] and len(table) == 6
    assert table["index"].tolist() == list(range(6)) and set(table["split"]) == {"test"}
    assert table["scene"].tolist() == [int(dataset[i]["scene"]) for i in range(6)]


# --- through a Trainer ---------------------------------------------------------------------------------------------
class Samples(torch.utils.data.Dataset):
    """Random batch-schema samples, without a sample table (the CSV then identifies rows by index).

    ``labelled``: the number of leading samples with an all-zero multi-hot ``target`` (default all; the others have
    no ``target`` key).
    """

    def __init__(self, size, num_classes, labelled=None):
        self.size, self.num_classes = size, num_classes
        self.labelled = size if labelled is None else labelled

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(i)
        sample = {
            "subject": torch.randn(3, 16, 16, generator=generator),
            "context": torch.randn(3, 16, 16, generator=generator),
            "index": torch.tensor(i),
        }
        if i < self.labelled:
            sample["target"] = torch.zeros(self.num_classes)
        return sample


def quiet_trainer(root, writer, logger=False):
    return L.Trainer(accelerator="cpu", callbacks=[writer], logger=logger, default_root_dir=root,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def tiny_synthetic(test_size=7):
    datamodule = SyntheticContextDataModule(seed=0, test_size=test_size, image_size=16, subject_size=8, batch_size=4)
    datamodule.setup("predict")
    return datamodule


def synthetic_labels(**settings):
    """The unbiased test split's targets, from the dataset's label draw (no rendering, not through the writer)."""
    datamodule = SyntheticContextDataModule(**settings)
    datamodule.setup("predict")
    return datamodule.test_unbiased_dataset.labels()[0]


class CountingModule(CCIMLightningModule):
    """Counts predict steps (to see whether a refused run predicted anything)."""

    steps = 0

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        CountingModule.steps += 1
        return super().predict_step(batch, batch_idx, dataloader_idx)


def synthetic_model(datamodule, cls=CCIMLightningModule):
    torch.manual_seed(0)
    host = TwoStreamHost(feature_dim=8)
    return cls(host, datamodule.num_classes, attention="none", class_names=datamodule.class_names)


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
        truth = ["target", "true_x", "true_y", "true_z"]
        assert list(frame.columns) == ["index", "x", "y", "z", "prediction", *truth]
        assert frame["index"].tolist() == list(range(size))
        assert frame["target"].tolist() == [""] * size and (frame[truth[1:]].to_numpy() == 0).all()
        probabilities = frame[["x", "y", "z"]].to_numpy()
        assert ((probabilities > 0) & (probabilities < 1)).all()
        expected = ["|".join(n for n, p in zip("xyz", row) if p >= 0.5) for row in probabilities]
        assert frame["prediction"].tolist() == expected


@pytest.mark.parametrize("logger", [False, "csv"])
def test_default_file_is_in_the_run_folder_with_the_ground_truth(logger, tmp_path):
    datamodule = tiny_synthetic()
    writer = PredictionWriter()
    run_logger = CSVLogger(tmp_path / "run") if logger else False
    trainer = quiet_trainer(tmp_path / "run", writer, run_logger)
    trainer.predict(synthetic_model(datamodule), datamodule=datamodule, return_predictions=False)

    run_folder = tmp_path / "run" / ("lightning_logs/version_0" if logger else "")
    expected = run_folder / "predictions" / "synthetic_context.csv"
    assert writer.written == [expected] and default_predictions_path(trainer) == expected
    frame = pd.read_csv(expected)
    targets = datamodule.test_unbiased_dataset.labels()[0]
    assert frame["index"].tolist() == list(range(7))
    assert frame["target_index"].tolist() == targets.tolist()
    assert frame["target"].tolist() == [EMOTIONS[i] for i in targets]


def test_a_second_run_never_overwrites_the_file_silently(tmp_path, caplog):
    datamodule = tiny_synthetic()
    model = synthetic_model(datamodule, CountingModule)
    quiet_trainer(tmp_path, PredictionWriter()).predict(model, datamodule=datamodule, return_predictions=False)
    path = tmp_path / "predictions" / "synthetic_context.csv"
    first = path.read_bytes()
    path.write_text("keep me\n")

    CountingModule.steps = 0
    with pytest.raises(FileExistsError, match=f"{path} already exists.*another `path`.*`overwrite: true`"):
        quiet_trainer(tmp_path, PredictionWriter()).predict(model, datamodule=datamodule, return_predictions=False)
    assert CountingModule.steps == 0  # refused before predicting anything
    assert path.read_text() == "keep me\n"

    caplog.clear()
    with caplog.at_level("INFO", logger="ccim_lightning.callbacks.prediction_writer"):
        writer = PredictionWriter(overwrite=True)
        quiet_trainer(tmp_path, writer).predict(model, datamodule=datamodule, return_predictions=False)
    assert writer.written == [path] and path.read_bytes() == first
    messages = [r.getMessage() for r in caplog.records if r.name == "ccim_lightning.callbacks.prediction_writer"]
    assert messages == [f"Predictions for 7 samples written to {path}"]  # the final path, once
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no partial file left behind


def test_with_a_logger_each_run_gets_its_own_file(tmp_path):
    datamodule = tiny_synthetic()
    model = synthetic_model(datamodule)
    written = []
    for _ in range(2):
        writer = PredictionWriter()
        quiet_trainer(tmp_path, writer, CSVLogger(tmp_path)).predict(
            model, datamodule=datamodule, return_predictions=False
        )
        written += writer.written
    assert [p.relative_to(tmp_path).parts[:2] for p in written] == [
        ("lightning_logs", "version_0"),
        ("lightning_logs", "version_1"),
    ]


def test_unlabelled_batches_give_no_ground_truth_and_mixed_ones_are_an_error(tmp_path):
    model = CCIMLightningModule(TwoStreamHost(feature_dim=8), num_classes=2, task="multilabel", attention="none")
    writer = PredictionWriter(path=str(tmp_path / "u.csv"))
    quiet_trainer(tmp_path, writer).predict(model, DataLoader(Samples(3, 2, labelled=0), batch_size=2))
    assert list(pd.read_csv(writer.written[0]).columns) == ["index", "class_0", "class_1", "prediction"]

    writer = PredictionWriter(path=str(tmp_path / "mixed.csv"))
    with pytest.raises(ValueError, match="dataloader 0 disagree on `target`"):
        quiet_trainer(tmp_path, writer).predict(model, DataLoader(Samples(4, 2, labelled=2), batch_size=2))
    assert not (tmp_path / "mixed.csv").exists()


class BareModule(L.LightningModule):
    """Predicts without saying what it classifies (no task, num_classes, class_names)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 3)

    def predict_step(self, batch, batch_idx):
        scores = self.layer(torch.ones(len(batch["index"]), 1))
        return {"index": batch["index"], "probabilities": scores.softmax(-1)}


def test_a_module_that_does_not_say_what_it_classifies_gets_the_defaults_with_a_warning(tmp_path):
    writer = PredictionWriter(path=str(tmp_path / "bare.csv"))
    with pytest.warns(UserWarning, match=r"BareModule lacks \['class_names', 'num_classes', 'task'\]"):
        quiet_trainer(tmp_path, writer).predict(BareModule(), DataLoader(Samples(3, 3, labelled=0), batch_size=2))
    frame = pd.read_csv(writer.written[0])
    assert list(frame.columns) == ["index", "class_0", "class_1", "class_2", "prediction"]
    assert frame["prediction"].tolist() == [frame.iloc[0, 1:4].astype(float).idxmax()] * 3  # arg-max: multiclass


def test_file_stems_name_the_datamodule():
    class CAERSDataModule(L.LightningDataModule):
        pass

    class GroupWalkDataModule(L.LightningDataModule):
        pass

    assert dataset_file_stem(CAERSDataModule()) == "caers"
    assert dataset_file_stem(GroupWalkDataModule()) == "group_walk"
    assert dataset_file_stem(SyntheticContextDataModule()) == "synthetic_context"
    assert dataset_file_stem(None) == "predictions"


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
            "--model.init_args.use_prior=false", "--dictionary.source=random", "--dictionary.mask_subject=false",
        ],
        run=False,
    )  # fmt: skip
    head = ablation.model.head
    assert head.uniform_attention and not head.use_prior
    (callback,) = [c for c in ablation.trainer.callbacks if type(c).__name__ == "ConfounderDictionaryCallback"]
    assert callback.recipe.source == "random" and callback.recipe.mask_subject is False
    baseline = build_cli(["--config", str(CONFIGS / config), *small, "--model.init_args.attention=none"], run=False)
    assert not baseline.model.head.uses_dictionary


# --- through the CLI -----------------------------------------------------------------------------------------------
def callbacks_arg(csv):
    """A small scene CNN for the dictionary, and the PredictionWriter writing to ``csv``."""
    writer = "--trainer.callbacks=" + json.dumps([{"class_path": WRITER, "init_args": {"path": str(csv)}}])
    return [
        writer,
        "--dictionary.extractor=test_resnet",
        "--dictionary.num_iterations=5",
        "--dictionary.progress=false",
    ]


def test_one_batch_fit_then_predict_writes_the_csv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "predictions" / "synthetic.csv"
    common = [
        "--config", SYNTHETIC, *TINY, *callbacks_arg(csv), "--model.init_args.num_prototypes=4",
        "--model.init_args.backbone.init_args.feature_dim=16",
    ]  # fmt: skip
    fitted = build_cli(["fit", *common, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    assert bool(fitted.model.head.dictionary_filled)
    build_cli(["predict", *common, "--ckpt_path", "last"])
    frame = pd.read_csv(csv)
    classes = list(EMOTIONS[:4])
    assert list(frame.columns) == ["index", "split", "scene", *classes, "prediction", "target", "target_index"]
    assert frame["index"].tolist() == list(range(11))  # the predict split (test_unbiased), in sample order
    assert set(frame["split"]) == {"test_unbiased"}
    probabilities = frame[classes].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert frame["prediction"].tolist() == [classes[i] for i in probabilities.argmax(axis=1)]
    targets = synthetic_labels(seed=0, test_size=11, image_size=32, subject_size=16)
    assert frame["target_index"].tolist() == targets.tolist()
    assert frame["target"].tolist() == [classes[i] for i in targets]


DDP_SCRIPT = """
import logging, sys
import lightning as L
import torch
from ccim_lightning import CCIMLightningModule
from ccim_lightning.callbacks.prediction_writer import PredictionWriter
from ccim_lightning.datamodules.synthetic import SyntheticContextDataModule
from ccim_lightning.hosts import TwoStreamHost

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
torch.set_num_threads(1)
L.seed_everything(0)  # the same weights on both ranks (predict does not broadcast them)
datamodule = SyntheticContextDataModule(seed=0, test_size=11, image_size=16, subject_size=8, batch_size=4)
model = CCIMLightningModule(TwoStreamHost(feature_dim=8), 4, attention="none", class_names=datamodule.class_names)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=sys.argv[1],
                    callbacks=[PredictionWriter()], enable_progress_bar=False, enable_model_summary=False)
trainer.predict(model, datamodule=datamodule, return_predictions=False)
try:
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
except FileExistsError:
    print(f"rank {trainer.global_rank} refused", flush=True)
torch.distributed.destroy_process_group()  # gloo can abort at exit otherwise (as ccim's close_process_group)
"""


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_predictions_are_merged_into_one_file_with_the_ground_truth(tmp_path):
    script = tmp_path / "ddp_predict.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    (csv,) = (tmp_path / "run" / "predictions").glob("*.csv")
    frame = pd.read_csv(csv)
    assert frame["index"].tolist() == list(range(11))  # 11 samples over 2 ranks: 6 + 6 padded, merged, no repeat
    np.testing.assert_allclose(frame[list(EMOTIONS[:4])].to_numpy().sum(axis=1), 1.0, atol=1e-5)
    targets = synthetic_labels(seed=0, test_size=11, image_size=16, subject_size=8)
    assert frame["target_index"].tolist() == targets.tolist()
    assert output.count("Predictions for 11 samples written to") == 1  # rank 0 only
    assert "rank 0 refused" in output and "rank 1 refused" in output  # both ranks stop together, none hangs
