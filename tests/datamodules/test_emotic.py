import csv
import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from ccim_lightning.datamodules.common import AnnotationError
from ccim_lightning.datamodules.dataset import collate_skipping_none
from ccim_lightning.datamodules.emotic import CATEGORIES, EmoticDataModule, read_emotic_csv
from ccim_lightning.losses import EmoticContinuousLoss, EmoticDiscreteLoss

NAN = float("nan")

# (folder in the annotation, folder on disk, filename, decoded (W, H), stored image_size (n_col, n_row), persons)
# person: (box, train categories or val/test combined categories, (V, A, D))
COCO, FRAMES, EMODB, ADE = "mscoco/images", "framesdb/images", "emodb_small/images", "ade20k/images"
IMAGES = {
    "train": [
        (COCO, COCO, "a.jpg", (64, 48), (64, 48), [([10, 8, 30, 40], ["Anger"], (5, NAN, 3))]),
        # some copies have framesdb/framesdb/images on disk
        (FRAMES, "framesdb/framesdb/images", "b.jpg", (64, 48), (64, 48), [
            ([0, 0, 20, 30], ["Engagement", "Happiness"], (6, 4, 7)),
            ([-5, 10, 80, 60], ["Doubt/Confusion"], (1, 2, 3)),
        ]),
        # emodb_small stores image_size transposed: the box only fits the decoded 40x60 image
        (EMODB, EMODB, "c.jpg", (40, 60), (60, 40), [([5, 30, 35, 58], ["Peace", "Yearning"], (7, 7, 7))]),
    ],
    "val": [
        (COCO, COCO, "d.jpg", (64, 48), (64, 48), [([4, 4, 40, 44], [], (4, 5, 6))]),
        (ADE, ADE, "e.jpg", (64, 48), (64, 48), [
            ([0, 0, 32, 48], ["Fear", "Pain"], (2, 8, 2)),
            ([32, 0, 64, 48], ["Sadness"], (2, 3, 2)),
        ]),
    ],
    "test": [(COCO, COCO, "f.jpg", (64, 48), (64, 48), [([8, 8, 56, 40], ["Affection", "Yearning"], (9, 9, 9))])],
}  # fmt: skip


def multi_hot(names):
    target = np.zeros(len(CATEGORIES), dtype=np.float32)
    for name in names:
        target[CATEGORIES.index(name)] = 1.0
    return target


def persons(split):
    return [(folder, disk, name, person) for folder, disk, name, _, _, people in IMAGES[split] for person in people]


def struct_array(records):
    """A 1xN MATLAB struct array (what savemat writes for a structured numpy array)."""
    array = np.empty((1, len(records)), dtype=[(key, object) for key in records[0]])
    for i, record in enumerate(records):
        for key, value in record.items():
            array[0, i][key] = value
    return array


def cell(names):
    array = np.empty((len(names),), dtype=object)
    array[:] = names
    return array


def vad_struct(vad):
    return {"valence": float(vad[0]), "arousal": float(vad[1]), "dominance": float(vad[2])}


def mat_person(split, box, names, vad):
    person = {"body_bbox": np.asarray(box, dtype=np.float64), "gender": "Female", "age": "Adult"}
    if split == "train":
        person["annotations_categories"] = {"categories": cell(names)}  # one name squeezes to a bare str
        person["annotations_continuous"] = vad_struct(vad)
    else:  # several annotators, plus the combined fields
        person["annotations_categories"] = struct_array([{"categories": cell(names[:1])}, {"categories": cell(names)}])
        person["annotations_continuous"] = struct_array([vad_struct(vad), vad_struct(vad)])
        person["combined_categories"] = cell(names)
        person["combined_continuous"] = vad_struct(vad)
    return person


def write_emotic(root, write_image, forms=("mat", "csv")):
    for images in IMAGES.values():
        for _, disk, name, (width, height), _, people in images:
            write_image(root / "emotic" / disk / name, width, height, box=people[0][0])
    if "mat" in forms:
        content = {}
        for split, images in IMAGES.items():
            records = [
                {
                    "filename": name,
                    "folder": folder,
                    "image_size": {"n_col": stored[0], "n_row": stored[1]},
                    "original_database": {"name": folder.split("/")[0], "info": {"x": 1}},
                    "person": struct_array([mat_person(split, *person) for person in people]),  # 1 person: 1x1
                }
                for folder, _, name, _, stored, people in images
            ]
            content[split] = struct_array(records)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        savemat(root / "Annotations" / "Annotations.mat", content)
    if "csv" in forms:
        for split in IMAGES:
            write_csv(root / "emotic_pre" / f"{split}.csv", csv_rows(split))
    return root


def csv_rows(split):
    sizes = {name: size for _, _, name, size, _, _ in IMAGES[split]}
    rows = []
    for i, (folder, _, name, (box, names, vad)) in enumerate(persons(split)):
        vad_cell = f"[{', '.join(f'{v:g}' for v in vad)}]"
        rows.append([i, folder, name, str(list(sizes[name])), str(box), str(names), vad_cell, "Male", "Adult"])
    return rows


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)  # quotes cells with commas, as the preprocessing tool's pandas output does
        writer.writerow(["Index", "Folder", "Filename", "Image Size", "BBox", "Categorical_Labels",
                         "Continuous_Labels", "Gender", "Age"])  # fmt: skip
        writer.writerows(rows)


@pytest.fixture
def emotic_root(tmp_path, write_image):
    return write_emotic(tmp_path / "EMOTIC", write_image)


def datamodule(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return EmoticDataModule(str(root), **kwargs)


# --- annotations -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("annotation_format", ["mat", "csv"])
def test_both_forms_read_every_person_with_its_labels_vad_and_clipped_box(emotic_root, annotation_format):
    dm = datamodule(emotic_root, annotation_format=annotation_format)
    for split in ("train", "val", "test"):
        table = dm.table(split)
        expected = persons(split)
        assert len(table) == len(expected)
        for i, (_, disk, name, (_, names, vad)) in enumerate(expected):
            assert table.paths[i] == f"{disk}/{name}"
            np.testing.assert_array_equal(table.targets[i], multi_hot(names))
            np.testing.assert_array_equal(table.extras["vad"][i], np.asarray(vad, dtype=np.float32))
    train = dm.table("train")
    np.testing.assert_array_equal(train.boxes[2], [0, 10, 64, 48])  # clipped to the decoded 64x48 image
    np.testing.assert_array_equal(train.boxes[3], [5, 30, 35, 58])  # fits the decoded size, not the stored one
    assert dm.table("val").targets[0].sum() == 0  # empty combined categories: an all-zero target, counted
    assert dm.dropped["val"]["persons without categories (all-zero target)"] == 1
    assert dm.dropped["train"]["persons without V/A/D (vad = NaN)"] == 1


def test_the_mat_is_chosen_automatically_and_annotations_can_point_elsewhere(emotic_root, tmp_path):
    assert datamodule(emotic_root).annotation_source() == ("mat", emotic_root / "Annotations" / "Annotations.mat")
    (emotic_root / "Annotations" / "Annotations.mat").unlink()
    assert datamodule(emotic_root).annotation_source() == ("csv", emotic_root / "emotic_pre")
    moved = tmp_path / "elsewhere"
    (emotic_root / "emotic_pre").rename(moved)
    dm = datamodule(emotic_root, annotations=str(moved / "train.csv"))
    assert dm.annotation_source() == ("csv", moved)
    assert len(dm.table("test")) == 1
    with pytest.raises(FileNotFoundError, match=r"Annotations\.mat.*emotic_pre"):
        datamodule(emotic_root).setup("fit")


def test_construction_reads_nothing_and_exposes_the_task(tmp_path):
    dm = EmoticDataModule(str(tmp_path / "missing"))
    assert (dm.num_classes, dm.task, dm.class_names) == (26, "multilabel", list(CATEGORIES))
    with pytest.raises(FileNotFoundError, match="EMOTIC root .*missing does not exist"):
        dm.setup("fit")


# --- samples ---------------------------------------------------------------------------------------------------------
def test_samples_follow_the_schema_with_the_body_masked_in_the_context(emotic_root, colours):
    background, subject_colour = colours
    dm = datamodule(emotic_root)
    dm.setup("fit")
    sample = dm.dictionary_dataset()[0]
    assert sample["subject"].shape == (3, 128, 128) and sample["subject"].dtype == torch.float32
    assert sample["context"].shape == (3, 224, 224) and sample["context"].dtype == torch.float32
    assert sample["target"].dtype == torch.float32 and sample["target"].shape == (26,)
    assert sample["index"].dtype == torch.int64 and int(sample["index"]) == 0
    assert sample["box"].tolist() == [10, 8, 30, 40] and sample["box"].dtype == torch.float32
    assert sample["vad"].dtype == torch.float32 and math.isnan(sample["vad"][1])
    np.testing.assert_allclose(sample["subject"][:, 64, 64], subject_colour, atol=0.15)
    # box (10, 8, 30, 40) in a 64x48 image -> columns floor(35.0)..ceil(105.0), rows floor(37.3)..ceil(186.7)
    context = sample["context"]
    assert torch.all(context[:, 37:187, 35:105] == 0)
    assert not torch.any(context[:, 37:187, 105] == 0) and not torch.any(context[:, 36, 35:105] == 0)
    np.testing.assert_allclose(context[:, 5, 5], background, atol=0.15)
    unmasked = dm.dictionary_dataset(mask_subject=False)[0]["context"]
    np.testing.assert_allclose(unmasked[:, 110, 70], subject_colour, atol=0.15)


def test_training_flips_subject_context_and_box_together(emotic_root):
    dm = datamodule(emotic_root)
    dm.setup("fit")
    torch.manual_seed(0)
    boxes = {tuple(dm.train_dataset[0]["box"].tolist()) for _ in range(20)}
    assert boxes == {(10, 8, 30, 40), (34, 8, 54, 40)}
    while (sample := dm.train_dataset[0])["box"][0] != 34:
        pass
    assert torch.all(sample["context"][:, 37:187, 224 - 105 : 224 - 35] == 0)
    assert not torch.any(sample["context"][:, 100, 35:60] == 0)


def test_loaders_batch_and_the_dictionary_split_is_fixed_and_identified(emotic_root):
    dm = datamodule(emotic_root)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["subject"].shape == (2, 3, 128, 128) and batch["context"].shape == (2, 3, 224, 224)
    assert batch["target"].shape == (2, 26) and batch["vad"].shape == (2, 3) and batch["box"].shape == (2, 4)
    starts = [int(batch["index"][0]) for batch in dm.dictionary_dataloader(batch_size=3)]
    assert starts == [0, 3]  # fixed order
    identities = dm.dictionary_dataset().sample_identities()
    assert identities == datamodule(emotic_root, annotation_format="csv").dictionary_dataset().sample_identities()
    stat = (emotic_root / "emotic" / "mscoco" / "images" / "a.jpg").stat()
    assert identities[0] == f"mscoco/images/a.jpg|10,8,30,40|{stat.st_size}:{stat.st_mtime_ns}"
    assert len(set(identities)) == 4


def test_degenerate_box_falls_back_to_the_whole_image_and_is_counted(tmp_path, write_image):
    root = tmp_path / "EMOTIC"
    write_image(root / "emotic" / "mscoco" / "images" / "x.jpg", 64, 48)
    rows = [[0, "mscoco/images", "x.jpg", "[64, 48]", "[70, 10, 90, 30]", "['Fear']", "[1, 2, 3]", "Male", "Adult"]]
    for split in ("train", "val", "test"):
        write_csv(root / "emotic_pre" / f"{split}.csv", rows)
    dm = datamodule(root)
    dm.setup("test")
    sample = dm.test_dataset[0]
    assert sample["box"].tolist() == [0, 0, 64, 48]
    assert not torch.any(sample["context"] == 0)  # nothing masked: the subject is not localised
    assert dm.dropped["test"] == {"degenerate boxes (subject = whole image, context not masked)": 1}


def test_preprocessed_arrays_give_the_same_kind_of_samples(emotic_root, colours):
    _, subject_colour = colours
    (emotic_root / "Annotations" / "Annotations.mat").unlink()
    for split in ("train", "val", "test"):
        contexts, bodies = [], []
        for _, disk, name, (box, _, _) in persons(split):
            image = Image.open(emotic_root / "emotic" / disk / name).convert("RGB")
            contexts.append(np.asarray(image.resize((224, 224))))
            bodies.append(np.asarray(image.crop([max(v, 0) for v in box]).resize((128, 128))))
        np.save(emotic_root / "emotic_pre" / f"{split}_context_arr.npy", np.stack(contexts))
        np.save(emotic_root / "emotic_pre" / f"{split}_body_arr.npy", np.stack(bodies))
    dm = datamodule(emotic_root, use_arrays=True)
    dm.setup("test")
    sample = dm.test_dataset[0]
    assert sample["box"].tolist() == [8, 8, 56, 40]
    np.testing.assert_allclose(sample["subject"][:, 64, 64], subject_colour, atol=0.15)
    assert torch.all(sample["context"][:, 37:187, 28:196] == 0)  # (8, 8, 56, 40) * 224 / (64, 48)
    np.save(emotic_root / "emotic_pre" / "val_body_arr.npy", np.zeros((2, 128, 128, 3), np.uint8))
    with pytest.raises(AnnotationError, match=r"val_body_arr\.npy has shape \(2, 128, 128, 3\).*\(3, H, W, 3\)"):
        dm.setup("fit")


# --- bad input -------------------------------------------------------------------------------------------------------
def test_missing_image_is_an_error_or_skipped_and_reported_once(emotic_root, caplog):
    (emotic_root / "emotic" / "mscoco" / "images" / "a.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.jpg does not exist.*on_bad_sample='skip'"):
        datamodule(emotic_root).setup("fit")
    dm = datamodule(emotic_root, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
        dm.setup("fit")
    assert len(dm.train_dataset) == 3
    assert dm.dropped["train"]["skipped (missing image)"] == 1
    assert sum("skipped (missing image)" in r.message for r in caplog.records) == 1


def test_malformed_rows_name_the_file_and_line(emotic_root):
    rows = csv_rows("test")
    rows.append([1, "mscoco/images", "f.jpg", "[64, 48]", "[1, 2, 3]", "['Fear']", "[1, 2, 3]", "Male", "Adult"])
    rows.append([2, "mscoco/images", "f.jpg", "[64, 48]", "[1, 2, 3, 4]", "['Joy']", "[1, 2, 3]", "Male", "Adult"])
    write_csv(emotic_root / "emotic_pre" / "test.csv", rows)
    with pytest.raises(AnnotationError, match=r"test\.csv line 3: BBox '\[1, 2, 3\]' has 3 numbers, expected 4"):
        datamodule(emotic_root, annotation_format="csv").setup("test")
    dm = datamodule(emotic_root, annotation_format="csv", on_bad_sample="skip")
    dm.setup("test")
    assert len(dm.test_dataset) == 1 and dm.dropped["test"] == {"skipped (malformed rows)": 2}
    write_csv(emotic_root / "emotic_pre" / "test.csv", rows[:1] + rows[2:])
    with pytest.raises(AnnotationError, match=r"test\.csv line 3: unknown categories \['Joy'\]"):
        read_emotic_csv(emotic_root / "emotic_pre" / "test.csv")


def test_unreadable_and_truncated_images(emotic_root):
    path = emotic_root / "emotic" / "mscoco" / "images" / "f.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"cannot read image .*f\.jpg"):
        datamodule(emotic_root).setup("test")
    path.write_bytes(data[: len(data) // 2])  # the header is fine, decoding fails
    dm = datamodule(emotic_root)
    dm.setup("test")
    with pytest.raises(OSError, match=r"cannot decode image .*f\.jpg"):
        dm.test_dataset[0]
    dm = datamodule(emotic_root, on_bad_sample="skip")
    dm.setup("test")
    assert dm.test_dataset[0] is None
    assert collate_skipping_none([None])["index"].shape == (0,)  # an empty batch, skipped by the module's steps


# --- real annotation files -------------------------------------------------------------------------------------------
def test_real_emotic_csv_files_give_every_person_and_category_count(shared_data):
    for split, expected_rows in (("train", 23266), ("val", 3315), ("test", 7203)):
        path = shared_data / "emotic_csv" / f"{split}.csv"
        table = read_emotic_csv(path)
        assert len(table) == expected_rows
        counts = {name: 0 for name in CATEGORIES}
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                for name in re.findall(r"'([^']+)'", row["Categorical_Labels"]):
                    counts[name] += 1
        assert table.targets.sum(axis=0).astype(int).tolist() == [counts[name] for name in CATEGORIES]
        assert not np.isnan(table.extras["vad"]).any()


# --- losses ----------------------------------------------------------------------------------------------------------
def discrete_reference(logits, target, statistic, c=1.2, empty=1e-4):
    batch, classes = len(target), len(target[0])
    total = 0.0
    for i in range(classes):
        positives = sum(target[b][i] for b in range(batch))
        p = positives / batch if statistic == "fraction" else positives
        weight = 1.0 / math.log(c + p) if positives else empty
        total += weight * sum((logits[b][i] - target[b][i]) ** 2 for b in range(batch))
    return total


@pytest.mark.parametrize("statistic", ["fraction", "count"])
def test_discrete_loss_matches_the_hand_computed_weighted_error(statistic):
    logits = [[0.3, -1.0, 2.0], [1.2, 0.5, 0.1], [-0.4, 0.0, 0.9], [0.8, 0.2, 1.5]]
    target = [[1, 0, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1]]
    loss = EmoticDiscreteLoss(statistic=statistic)
    value = loss(torch.tensor(logits), torch.tensor(target, dtype=torch.float32))
    assert value.item() == pytest.approx(discrete_reference(logits, target, statistic), rel=1e-6)
    weights = loss.class_weights(torch.tensor(target, dtype=torch.float32))
    p = (0.5, 1.0) if statistic == "fraction" else (2.0, 4.0)
    np.testing.assert_allclose(weights, [1 / math.log(1.2 + p[0]), 1e-4, 1 / math.log(1.2 + p[1])], rtol=1e-6)
    mean = EmoticDiscreteLoss(statistic=statistic, reduction="mean")(torch.tensor(logits), torch.tensor(target).float())
    assert mean.item() == pytest.approx(value.item() / 4, rel=1e-6)


def test_discrete_loss_sigmoid_option_and_gradients():
    logits = torch.tensor([[0.3, -1.0], [1.2, 0.5]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    loss = EmoticDiscreteLoss(sigmoid=True)(logits, target)
    probabilities = torch.sigmoid(logits.detach()).tolist()
    expected = discrete_reference(probabilities, target.tolist(), "fraction")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="same"):
        EmoticDiscreteLoss()(torch.zeros(2, 3), torch.zeros(2, 4))


def test_continuous_losses_follow_the_margin_formulas_and_ignore_missing_targets():
    prediction = torch.tensor([[5.5, 4.0, 3.0], [1.0, 9.0, 6.0]])
    target = torch.tensor([[5.0, 5.0, 5.0], [4.0, NAN, 6.0]])  # errors 0.5, 1, 2 / 3, missing, 0
    l2 = EmoticContinuousLoss("l2", margin=1.0)(prediction, target)
    assert l2.item() == pytest.approx(0 + 1 + 4 + 9 + 0)
    smooth = EmoticContinuousLoss("smooth_l1", margin=1.0)(prediction, target)
    assert smooth.item() == pytest.approx(0.125 + 0.5 + (2 - 0.5) + (3 - 0.5) + 0)
    wide = EmoticContinuousLoss("smooth_l1", margin=2.0, reduction="mean")(prediction, target)
    assert wide.item() == pytest.approx((0.125 + 0.5 + 2.0 + 2 * (3 - 1)) / 2)
    prediction.requires_grad_(True)
    EmoticContinuousLoss()(prediction, target).backward()
    assert torch.isfinite(prediction.grad).all() and prediction.grad[1, 1] == 0


@pytest.mark.slow
def test_a_model_trains_and_tests_on_the_datamodule(emotic_root, tmp_path):
    import lightning as L

    from ccim_lightning import CCIMLightningModule
    from ccim_lightning.hosts import TwoStreamHost

    dm = datamodule(emotic_root, context_size=32, subject_size=16)
    model = CCIMLightningModule(TwoStreamHost(feature_dim=8), dm.num_classes, dm.task, attention="none",
                                loss=EmoticDiscreteLoss(), class_names=dm.class_names)  # fmt: skip
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test/mAP"]) <= 1.0


def test_predictions_csv_names_each_persons_image_and_box(emotic_root, tmp_path):
    import lightning as L
    import pandas as pd

    from ccim_lightning import CCIMLightningModule
    from ccim_lightning.callbacks import PredictionWriter
    from ccim_lightning.hosts import TwoStreamHost

    dm = datamodule(emotic_root, context_size=32, subject_size=16)
    model = CCIMLightningModule(TwoStreamHost(feature_dim=8), dm.num_classes, dm.task, attention="none",
                                class_names=dm.class_names)  # fmt: skip
    csv = tmp_path / "predictions.csv"
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[PredictionWriter(str(csv))])  # fmt: skip
    dm.setup("test")
    trainer.predict(model, dataloaders=dm.test_dataloader(), return_predictions=False)
    frame = pd.read_csv(csv)
    expected = dm.test_dataset.sample_table()
    assert len(frame) == len(dm.test_dataset)
    assert frame["image"].tolist() == expected["image"].tolist()
    assert frame[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == expected[["x1", "y1", "x2", "y2"]].to_numpy().tolist()
    assert set(dm.class_names) <= set(frame.columns)
