"""Predictor: a ``ccim fit`` checkpoint gives, for a photo and its boxes, what the datamodule's test path gives.

Each dataset type is fitted for one epoch through the ``ccim`` CLI (tiny images, tiny host), then every test-split
person is given to the predictor as a file path with its annotated box, and its probabilities are compared with
``trainer.predict`` on the datamodule (the test split, through the loaders' uint8 + device-normalisation path).
"""

import csv
import dataclasses
import re
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from ccim_lightning import Predictor
from ccim_lightning.callbacks.prediction_writer import PredictionWriter
from ccim_lightning.checkpoints import CheckpointError
from ccim_lightning.commands.cli import build_cli
from ccim_lightning.datamodules import CAERSDataModule, EmoticDataModule, GroupWalkDataModule, TableDataModule
from ccim_lightning.datamodules.decode import load_rgb
from ccim_lightning.datamodules.inputs import INPUT_SETTINGS_KEY
from ccim_lightning.datamodules.synthetic import SyntheticContextDataModule
from ccim_lightning.inference.predictor import BoxError
from tests.conftest import _write_image
from tests.datamodules.test_emotic import write_emotic
from tests.test_thresholds import sklearn_reference

ROOT = Path(__file__).parents[2]
HOST = {
    "class_path": "ccim_lightning.hosts.TwoStreamHost",
    "init_args": {"subject_encoder": "small_cnn", "context_encoder": "small_cnn", "feature_dim": 8},
}
TOLERANCE = 1e-5
MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "CMYK")
"""Every PIL mode the datamodules decode (``datamodules/common.py``'s ``to_rgb``), as test images."""


def fit(folder: Path, data_class: str, data_args: dict, sizes: bool = True) -> Path:
    """Fits a tiny model (no dictionary) for one epoch with ``ccim fit``; returns its ``last.ckpt``.

    ``sizes``: pass the image datamodules' 32-pixel context and 16-pixel subject sizes.
    """
    if sizes:
        data_args = {"context_size": 32, "subject_size": 16, **data_args}
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "accelerator": "cpu", "default_root_dir": str(folder / "run")},
        "model": {"class_path": "ccim_lightning.CCIMLightningModule",
                  "init_args": {"backbone": HOST, "attention": "none"}},
        "data": {"class_path": data_class, "init_args": {"num_workers": 0, "batch_size": 4, **data_args}},
    }  # fmt: skip
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    build_cli(["fit", "--config", str(path)])
    return folder / "run" / "checkpoints" / "last.ckpt"


def test_split_probabilities(model, datamodule) -> np.ndarray:
    """(N, C) probabilities of the test split in sample order, from ``trainer.predict`` on the datamodule."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    outputs = trainer.predict(model, datamodule=datamodule)
    index = torch.cat([o["index"] for o in outputs])
    probabilities = torch.cat([o["probabilities"] for o in outputs])
    return probabilities[index.argsort()].double().numpy()


test_split_probabilities.__test__ = False  # a helper, not a test


def persons_by_image(datamodule, boxes=None):
    """The test split as predictor input: image paths, per image its persons' boxes, and the table order used."""
    table = datamodule.table("test")
    images, image_boxes, order = [], [], []
    for path in dict.fromkeys(table.paths):
        rows = [i for i, p in enumerate(table.paths) if p == path]
        images.append(str(datamodule.image_root / path))
        if not table.localised[rows].all():  # a person without a box is the whole image (one person per image)
            assert len(rows) == 1
            image_boxes.append(None)
        else:
            image_boxes.append([list(boxes[i]) if boxes is not None else table.boxes[i].tolist() for i in rows])
        order += rows
    return images, image_boxes, order


def check_equal_to_test_split(checkpoint, datamodule, boxes=None):
    """Asserts the predictor's probabilities equal the test path's within 1e-5; returns both and the order."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    images, image_boxes, order = persons_by_image(datamodule, boxes)
    frame = predictor.predict(images, image_boxes, batch_size=3)
    expected = test_split_probabilities(predictor.model, datamodule)
    assert len(frame) == len(expected)
    np.testing.assert_allclose(frame[predictor.class_names].to_numpy(), expected[order], atol=TOLERANCE, rtol=0)
    return predictor, frame, expected, order


# --- tiny datasets -------------------------------------------------------------------------------------------------
def write_table(path, rows, header=("image", "x1", "y1", "x2", "y2", "label", "split")):
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def textured(width, height, seed):
    """An RGB image with structure (a gradient plus noise), so that masking and resizing change the model input."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    return np.clip(ramp + rng.integers(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def save_in_mode(pixels, mode, folder, name):
    """Saves ``pixels`` (RGB uint8) converted to PIL ``mode``; returns the file name."""
    if mode in ("I;16", "I"):
        grey = np.asarray(Image.fromarray(pixels).convert("L")).astype(np.int32) * 257
        if mode == "I;16":
            Image.fromarray(grey.astype(np.uint16)).save(folder / f"{name}.png")
            return f"{name}.png"
        Image.fromarray(grey, mode="I").save(folder / f"{name}.tif")
        return f"{name}.tif"
    image = Image.fromarray(pixels).convert(mode)
    suffix = "jpg" if mode == "CMYK" else "png"
    image.save(folder / f"{name}.{suffix}")
    return f"{name}.{suffix}"


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory):
    """A multiclass table whose test images come in every supported mode (two persons in the RGB one)."""
    folder = tmp_path_factory.mktemp("modes")
    data = folder / "data"
    data.mkdir()
    rows = []
    for i in range(8):
        Image.fromarray(textured(48, 40, i)).save(data / f"train{i}.png")
        rows.append([f"train{i}.png", 6, 4, 30, 36, "calm" if i % 2 else "joy", "train" if i < 6 else "val"])
    for i, mode in enumerate(MODES):
        name = save_in_mode(textured(48, 40, 100 + i), mode, data, f"test_{mode.replace(';', '_')}")
        rows.append([name, 4 + i, 3, 28 + i, 37, "joy", "test"])
        if mode == "RGB":
            rows.append([name, 30, 10, 47, 39, "calm", "test"])
    write_table(data / "people.csv", rows)
    args = {"root": str(data), "table": "people.csv", "class_names": ["joy", "calm"]}
    checkpoint = fit(folder, "ccim_lightning.datamodules.TableDataModule", args)
    datamodule = TableDataModule(str(data), "people.csv", ["joy", "calm"], num_workers=0, batch_size=4,
                                 context_size=32, subject_size=16)  # fmt: skip
    return checkpoint, datamodule


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    """A multilabel table of large JPEGs (reduced decoding applies), with a validation split for the thresholds."""
    folder = tmp_path_factory.mktemp("multilabel")
    data = folder / "data"
    data.mkdir()
    rows = []
    labels = ["a", "b", "a|b", "c", "a|c", "b|c"]
    for i in range(20):
        Image.fromarray(textured(200, 160, i)).save(data / f"{i}.jpg", quality=90)
        split = "train" if i < 8 else "val" if i < 16 else "test"
        rows.append([f"{i}.jpg", 20 + i, 10, 120 + i, 150, labels[i % 6], split])
    write_table(data / "people.csv", rows)
    args = {"root": str(data), "table": "people.csv", "class_names": ["a", "b", "c"], "task": "multilabel"}
    checkpoint = fit(folder, "ccim_lightning.datamodules.TableDataModule", args)
    datamodule = TableDataModule(str(data), "people.csv", ["a", "b", "c"], task="multilabel", num_workers=0,
                                 batch_size=4, context_size=32, subject_size=16)  # fmt: skip
    return checkpoint, datamodule


# --- equality with the datamodules' test path, every dataset type --------------------------------------------------
def test_every_image_mode_and_several_persons_match_the_test_path(modes_run):
    checkpoint, datamodule = modes_run
    predictor, frame, expected, order = check_equal_to_test_split(checkpoint, datamodule)
    assert predictor.task == "multiclass" and predictor.inputs.datamodule == "TableDataModule"
    assert list(frame.columns) == ["image", "person", "x1", "y1", "x2", "y2", "joy", "calm", "prediction"]
    rgb = frame[frame["image"].str.endswith("test_RGB.png")]
    assert rgb["person"].tolist() == [0, 1] and rgb["x1"].tolist() == [4.0, 30.0]
    names = np.array(["joy", "calm"])
    assert frame["prediction"].tolist() == names[expected[order].argmax(axis=1)].tolist()
    # the 1e-5 comparison can see a forgotten mask: without it the probabilities of this tiny model move by more
    unmasked = Predictor(predictor.model, dataclasses.replace(predictor.inputs, mask_subject=False), device="cpu")
    images, boxes, _ = persons_by_image(datamodule)
    moved = unmasked.predict(images, boxes)[predictor.class_names].to_numpy() - expected[order]
    assert np.abs(moved).max() > 5 * TOLERANCE


def test_path_pil_and_array_inputs_agree(modes_run):
    checkpoint, datamodule = modes_run
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    images, boxes, _ = persons_by_image(datamodule)
    by_path = predictor.predict(images, boxes)
    by_pil = predictor.predict([Image.open(path) for path in images], boxes)  # lazily opened, any mode
    by_array = predictor.predict([np.asarray(load_rgb(Path(path))) for path in images], boxes)
    names = predictor.class_names
    for other in (by_pil, by_array):
        np.testing.assert_allclose(other[names].to_numpy(), by_path[names].to_numpy(), atol=TOLERANCE, rtol=0)
        assert other["image"].tolist() == [i for i, b in enumerate(boxes) for _ in b]  # positions, not paths
    assert by_path["image"].tolist() == [path for path, b in zip(images, boxes) for _ in b]
    # one photo alone: boxes is that photo's list of boxes
    single = predictor.predict(images[0], boxes[0])
    np.testing.assert_allclose(single[names].to_numpy(), by_path[names].to_numpy()[: len(boxes[0])], atol=TOLERANCE)


def test_multilabel_table_with_reduced_jpeg_decoding_matches_and_uses_the_validation_thresholds(
    multilabel_run, tmp_path
):
    checkpoint, datamodule = multilabel_run
    predictor, frame, expected, order = check_equal_to_test_split(checkpoint, datamodule)
    assert predictor.inputs.reduced_decode and "labels" in frame.columns and "prediction" not in frame.columns
    names = predictor.class_names
    # the thresholds are the rule applied to the validation probabilities of the fitted model
    datamodule.setup("validate")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    outputs = trainer.predict(predictor.model, dataloaders=datamodule.val_dataloader())
    probabilities = torch.cat([o["probabilities"] for o in outputs]).numpy()
    targets = datamodule.table("val").targets.astype(np.int64)
    reference = [sklearn_reference(probabilities[:, c], targets[:, c]) for c in range(len(names))]
    np.testing.assert_allclose(predictor.thresholds, reference, atol=TOLERANCE)
    decided = [
        "|".join(n for n, p, t in zip(names, row, predictor.thresholds) if p >= t)
        for row in frame[names].to_numpy()
    ]  # fmt: skip
    assert frame["labels"].tolist() == decided
    # the predictions CSV decides with the same thresholds
    out = tmp_path / "predictions.csv"
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[PredictionWriter(str(out))])  # fmt: skip
    trainer.predict(predictor.model, datamodule=datamodule, return_predictions=False)
    written = pd.read_csv(out, keep_default_na=False)
    assert written["prediction"].tolist() == [frame["labels"].tolist()[order.index(i)] for i in range(len(order))]


@pytest.mark.slow
def test_groupwalk_boxes_reaching_outside_are_clipped_as_the_datamodule_clips_them(tmp_path):
    data = tmp_path / "GroupWalk"
    rows, raw_boxes = [], []
    labels = ["Happy", "Sad", "Angry", "Neutral", "Happy|Neutral", "Sad"]
    for video in ("v01", "v02", "v03"):
        for frame in range(4):
            image = f"frames/{video}/{frame:06d}.jpg"
            (data / image).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(textured(80, 60, frame)).save(data / image)
            split = {"v01": "train", "v02": "train", "v03": "test"}[video]
            for box, label in (((10, 5, 30, 55), labels[frame]), ((50, -4, 95, 40), labels[5 - frame])):
                rows.append([image, *box, label, split, video])
                if split == "test":
                    raw_boxes.append(box)
    write_table(data / "annotations.csv", rows, ("image", "x1", "y1", "x2", "y2", "label", "split", "video"))
    checkpoint = fit(
        tmp_path, "ccim_lightning.datamodules.GroupWalkDataModule", {"root": str(data), "val_fraction": 0.5}
    )
    datamodule = GroupWalkDataModule(str(data), val_fraction=0.5, num_workers=0, batch_size=4, context_size=32,
                                     subject_size=16)  # fmt: skip
    datamodule.setup("test")
    predictor, frame, _, _ = check_equal_to_test_split(checkpoint, datamodule, boxes=raw_boxes)
    assert predictor.task == "multilabel"
    assert frame[["x1", "y1", "x2", "y2"]].to_numpy()[1].tolist() == [50, 0, 80, 40]  # clipped to the 80x60 frame


@pytest.mark.slow
def test_emotic_multilabel_matches_the_test_path(tmp_path, write_image):
    root = write_emotic(tmp_path / "EMOTIC", write_image)
    checkpoint = fit(tmp_path, "ccim_lightning.datamodules.EmoticDataModule", {"root": str(root)})
    datamodule = EmoticDataModule(str(root), num_workers=0, batch_size=4, context_size=32, subject_size=16)
    datamodule.setup("test")
    predictor, _, _, _ = check_equal_to_test_split(checkpoint, datamodule)
    assert predictor.task == "multilabel" and len(predictor.class_names) == 26


@pytest.mark.slow
def test_caers_multiclass_matches_the_test_path(tmp_path):
    root = tmp_path / "CAER-S"
    lines = []
    for split, count in (("train", 3), ("test", 1)):
        for label, folder in enumerate(("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")):
            for number in range(count):
                relative = f"{split}/{folder}/{number:04d}.png"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(textured(100, 60, 7 * label + number)).save(root / relative)
                box = (20, 10, 60, 50) if number else (-5, -3, 30, 20)  # partly outside: clipped
                lines.append(f"{relative},{label},{','.join(map(str, box))}")
    (root / "faces.txt").write_text("\n".join(lines) + "\n")
    args = {"root": str(root), "face_boxes": str(root / "faces.txt"), "val_fraction": 0.3}
    checkpoint = fit(tmp_path, "ccim_lightning.datamodules.CAERSDataModule", args)
    datamodule = CAERSDataModule(str(root), face_boxes=str(root / "faces.txt"), val_fraction=0.3, num_workers=0,
                                 batch_size=4, context_size=32, subject_size=16)  # fmt: skip
    datamodule.setup("test")
    predictor, _, _, _ = check_equal_to_test_split(checkpoint, datamodule)
    assert predictor.task == "multiclass" and len(predictor.class_names) == 7


@pytest.mark.slow
def test_synthetic_inputs_are_rebuilt_from_the_rendered_photo(tmp_path):
    """The synthetic datamodule renders its samples, so it has no photo path to equal within 1e-5.

    What a photo of a sample can be checked for: the predictor's context is the rendered image (to uint8
    rounding), masked over exactly the same pixels with the same fill, at the trained sizes.
    """
    args = {"train_size": 16, "val_size": 8, "test_size": 4, "image_size": 32, "subject_size": 16}
    checkpoint = fit(tmp_path, "ccim_lightning.datamodules.SyntheticContextDataModule", args, sizes=False)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert (predictor.inputs.context_size, predictor.inputs.subject_size) == ((32, 32), (16, 16))
    datamodule = SyntheticContextDataModule(**args, num_workers=0)
    datamodule.setup("test")
    dataset = datamodule.test_dataset
    for index in range(len(dataset)):
        image, _, box, _, _ = dataset.render(index)
        photo = np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)
        _, batch = predictor.preprocess(photo, [box])
        sample = dataset[index]
        context, expected = batch["context"][0].numpy(), sample["context"].numpy()
        assert np.array_equal(context == 0, expected == 0)  # the same masked pixels
        # where the rendering is inside [0, 1] (a photo clips its pixel noise), the same values to uint8 rounding
        mean, std = (np.asarray(v)[:, None, None] for v in (predictor.inputs.mean, predictor.inputs.std))
        inside = (expected * std + mean >= 0) & (expected * std + mean <= 1)
        assert inside.mean() > 0.9
        np.testing.assert_allclose(context[inside], expected[inside], atol=0.6 / 255 / 0.224)
    frame = predictor.predict(photo, [box])
    assert frame["prediction"].iloc[0] in predictor.class_names


# --- refusals and old checkpoints ----------------------------------------------------------------------------------
def test_boxes_outside_the_image_reversed_or_not_finite_are_refused_naming_image_and_box(modes_run):
    checkpoint, datamodule = modes_run
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    path = str(datamodule.image_root / "test_RGB.png")
    with pytest.raises(BoxError, match=re.escape(f"image '{path}': box [60.0, 5.0, 90.0, 20.0] has less than one")):
        predictor.predict([path], [[(60, 5, 90, 20)]])
    with pytest.raises(BoxError, match=r"image 0 of the input: box \[30\.0, 5\.0, 10\.0, 20\.0\] has x2 <= x1"):
        predictor.predict([np.zeros((40, 48, 3), np.uint8)], [[(30, 5, 10, 20)]])
    with pytest.raises(BoxError, match="not four finite numbers"):
        predictor.predict([path], [[(1, 2, float("nan"), 4)]])
    with pytest.raises(ValueError, match="boxes has 1 entries for 2 images"):
        predictor.predict([path, path], [[(1, 2, 3, 4)]])
    with pytest.raises(TypeError, match=r"\(H, W, 3\) uint8"):
        predictor.predict([np.zeros((40, 48), np.float32)])
    empty = predictor.predict([path], [[]])  # nobody in the photo: no row
    assert len(empty) == 0 and "joy" in empty.columns
    whole = predictor.predict([path])  # no boxes: the whole image is the person
    assert whole[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[0, 0, 48, 40]]


def test_checkpoints_without_input_settings_or_backbone_config_are_clear_errors(modes_run, tmp_path):
    checkpoint, _ = modes_run
    saved = torch.load(checkpoint, weights_only=True)
    old = {k: v for k, v in saved.items() if k != INPUT_SETTINGS_KEY}
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match=f"holds no input settings .'{INPUT_SETTINGS_KEY}'"):
        Predictor.from_checkpoint(tmp_path / "old.ckpt")
    partial = {**saved, INPUT_SETTINGS_KEY: {k: v for k, v in saved[INPUT_SETTINGS_KEY].items() if k != "std"}}
    torch.save(partial, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="the stored input settings lack std"):
        Predictor.from_checkpoint(tmp_path / "partial.ckpt")
    python_saved = {**saved, "hyper_parameters": {"num_classes": 2}}
    torch.save(python_saved, tmp_path / "python.ckpt")
    with pytest.raises(CheckpointError, match=r"no configuration of its backbone"):
        Predictor.from_checkpoint(tmp_path / "python.ckpt")


def test_a_multilabel_checkpoint_without_thresholds_uses_one_half_and_says_so(multilabel_run, tmp_path, caplog):
    checkpoint, _ = multilabel_run
    saved = torch.load(checkpoint, weights_only=True)
    state = saved["state_dict"]
    assert bool(state["thresholds_chosen"]) and not np.allclose(state["decision_thresholds"].numpy(), 0.5)
    saved["state_dict"] = {k: v for k, v in state.items() if k not in ("decision_thresholds", "thresholds_chosen")}
    torch.save(saved, tmp_path / "old.ckpt")
    with caplog.at_level("WARNING", logger="ccim_lightning"):
        predictor = Predictor.from_checkpoint(tmp_path / "old.ckpt", device="cpu")
    assert predictor.thresholds.tolist() == [0.5, 0.5, 0.5]
    assert "no decision thresholds chosen on a validation split" in caplog.text


# --- the docs' snippet (docs/how-to/using-it.md) ------------------------------------------------------------------
def readme_snippet(page: str = "docs/how-to/using-it.md", heading: str = "## Use a trained model on new photos") -> str:
    """The first Python block under ``heading`` on ``page``."""
    readme = (ROOT / page).read_text()
    section = readme[readme.index(heading) :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_the_readme_shows_the_same_snippet_as_the_docs():
    # The docs' snippet runs below (and the README's block, after its ``ccim fit`` block, in tests/test_docs.py).
    readme = readme_snippet("README.md", "## Use a trained model on a new photo")
    assert readme == readme_snippet() and "Predictor.from_checkpoint" in readme


def test_the_readme_snippet_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 5
    monkeypatch.chdir(tmp_path)
    tiny = [
        "--data.init_args.train_size=32",
        "--data.init_args.val_size=8",
        "--data.init_args.test_size=8",
        "--data.init_args.image_size=32",
        "--data.init_args.subject_size=16",
        "--data.init_args.num_workers=0",
        "--model.init_args.num_prototypes=4",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
    ]
    # fmt: skip
    build_cli(["fit", "--config", str(ROOT / "configs" / "synthetic.yaml"), *tiny])
    _write_image(tmp_path / "photo.jpg", 480, 440, box=(120, 40, 260, 400))
    namespace = {}
    exec(compile(code, "docs/how-to/using-it.md", "exec"), namespace)
    people = namespace["people"]
    assert people["person"].tolist() == [0, 1] and people["image"].tolist() == ["photo.jpg"] * 2
    assert set(people["prediction"]) <= {"angry", "happy", "neutral", "sad"}
    np.testing.assert_allclose(people[["angry", "happy", "neutral", "sad"]].sum(axis=1), 1.0, atol=1e-6)
