import csv
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ccim_lightning.datamodules.common import AnnotationError
from ccim_lightning.datamodules.groupwalk import CLASSES, GroupWalkDataModule
from ccim_lightning.datamodules.table import TableDataModule

HEADER = ["image", "x1", "y1", "x2", "y2", "label", "split", "agent"]  # extra columns are ignored


def write_table(path, rows, header=HEADER):
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def groupwalk_root(tmp_path, write_image):
    """Extracted frames of two videos and an 85/15-style table without val rows (GroupWalk has none)."""
    root = tmp_path / "GroupWalk"
    labels = ["Happy", "Sad", "Angry", "Neutral", "Happy|Neutral", "Sad"]
    rows = []
    for video in ("v01", "v02"):
        for frame in range(6):
            image = f"frames/{video}/{frame:06d}.jpg"
            write_image(root / image, 80, 60, box=(10, 5, 30, 55))
            rows.append([image, 10, 5, 30, 55, labels[frame], "train" if video == "v01" else "test", frame])
            rows.append([image, 50, -4, 95, 40, labels[5 - frame], "train" if video == "v01" else "test", 10 + frame])
    write_table(root / "annotations.csv", rows)
    return root


def datamodule(root, cls=GroupWalkDataModule, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 4)
    return cls(str(root), **kwargs)


def test_groupwalk_reads_multi_label_rows_and_holds_out_validation(groupwalk_root):
    dm = datamodule(groupwalk_root, val_fraction=0.25)
    assert (dm.num_classes, dm.task, dm.class_names) == (4, "multilabel", list(CLASSES))
    dm.setup()
    train, val, test = dm.table("train"), dm.table("val"), dm.table("test")
    assert len(train) + len(val) == 12 and len(val) >= 2 and len(test) == 12
    assert not set(zip(train.paths, map(tuple, train.boxes))) & set(zip(val.paths, map(tuple, val.boxes)))
    np.testing.assert_array_equal(test.targets[8], [0, 1, 1, 0])  # "Happy|Neutral"
    np.testing.assert_array_equal(test.boxes[1], [50, 0, 80, 40])  # clipped to the 80x60 frame
    batch = next(iter(dm.test_dataloader()))
    assert batch["target"].dtype == torch.float32 and batch["target"].shape == (4, 4)
    assert batch["subject"].shape == (4, 3, 128, 128) and batch["context"].shape == (4, 3, 224, 224)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    again = datamodule(groupwalk_root, val_fraction=0.25)
    assert again.table("val").paths == val.paths


def test_a_generic_table_serves_single_label_data_with_its_own_val_rows(tmp_path, write_image, colours):
    _, subject_colour = colours
    root = tmp_path / "data"
    rows = []
    for i, split in enumerate(["train", "train", "val", "test", "Test"]):
        write_image(root / "images" / f"{i}.png", 50, 40, box=(5, 5, 25, 35))
        rows.append([f"images/{i}.png", 5, 5, 25, 35, "Calm" if i % 2 else "excited", split, ""])
    write_table(root / "people.csv", rows)
    dm = datamodule(root, TableDataModule, table="people.csv", class_names=["excited", "calm"])
    assert (dm.num_classes, dm.task) == (2, "multiclass")
    dm.setup()
    assert [len(dm.table(s)) for s in ("train", "val", "test")] == [2, 1, 2]
    sample = dm.val_dataset[0]
    assert sample["target"].dtype == torch.int64 and int(sample["target"]) == 0
    np.testing.assert_allclose(sample["subject"][:, 64, 64], subject_colour, atol=0.02)
    assert dm.table("train").targets.tolist() == [0, 1]


def test_malformed_rows_name_the_line_and_skip_counts_them(groupwalk_root):
    path = groupwalk_root / "annotations.csv"
    rows = list(csv.reader(path.open()))[1:]
    bad_rows = [
        ["frames/v01/000000.jpg", 1, 2, 3, 4, "Joyful", "train", 0],
        ["frames/v01/000000.jpg", 1, 2, "x", 4, "Sad", "train", 0],
        ["frames/v01/000000.jpg", 1, 2, 3, 4, "Sad", "holdout", 0],
        ["frames/v01/000000.jpg", 1, 2, 3, 4, "", "train", 0],
    ]
    write_table(path, rows + bad_rows)
    with pytest.raises(AnnotationError, match=r"annotations\.csv line 26: label \['Joyful'\] is not one of"):
        datamodule(groupwalk_root).setup("fit")
    with pytest.raises(ValueError, match=r"val_fraction=0.1 holds out no row.*sizes \[2, 2, 2, 2, 4\]"):
        datamodule(groupwalk_root, on_bad_sample="skip").setup("fit")
    dm = datamodule(groupwalk_root, on_bad_sample="skip", val_fraction=0.25)
    dm.setup("fit")
    assert dm.dropped["table"] == {"skipped (malformed rows)": 4} and not dm.dropped["train"]
    write_table(path, rows[:3], header=HEADER[:5] + ["split"])
    with pytest.raises(AnnotationError, match=r"lacks the columns \['label'\]"):
        datamodule(groupwalk_root).setup("fit")


def test_multiclass_tables_reject_several_labels(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    write_table(tmp_path / "t.csv", [["a.png", 1, 1, 9, 9, "a|b", "train", ""]])
    with pytest.raises(AnnotationError, match=r"t\.csv line 2: label 'a\|b' has several classes"):
        datamodule(tmp_path, TableDataModule, table="t.csv", class_names=["a", "b"]).setup("fit")
    with pytest.raises(ValueError, match="two distinct names"):
        TableDataModule(str(tmp_path), "t.csv", ["a", "A"])


def test_missing_and_truncated_images(groupwalk_root, caplog):
    (groupwalk_root / "frames" / "v02" / "000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 20: image .*000003\.jpg does not exist"):
        datamodule(groupwalk_root).setup("test")
    frame = groupwalk_root / "frames" / "v02" / "000004.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(frame)
    frame.write_bytes(frame.read_bytes()[:-400])
    dm = datamodule(groupwalk_root, on_bad_sample="skip", batch_size=12)
    dm.setup("test")
    assert len(dm.test_dataset) == 10 and dm.dropped["test"] == {"skipped (missing image)": 2}
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dm.test_dataloader()))
    assert batch["index"].tolist() == [0, 1, 2, 3, 4, 5, 8, 9]  # both persons of the truncated frame dropped
    assert sum("cannot decode image" in record.message for record in caplog.records) == 1
