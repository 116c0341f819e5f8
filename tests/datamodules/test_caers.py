import logging
from collections import Counter

import numpy as np
import pytest
import torch

from ccim_lightning.datamodules.caers import CLASSES, CAERSDataModule, read_face_boxes
from ccim_lightning.datamodules.common import AnnotationError

TRAIN_FOLDERS = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
TEST_FOLDERS = ("Anger",) + TRAIN_FOLDERS[1:]
WIDTH, HEIGHT = 100, 60
BOX = (20, 10, 60, 50)
SPECIAL_BOXES = {  # unusual boxes of the public file: negative, and past the image edge
    "train/Angry/0001.png": ((-5, -3, 30, 20), (0, 0, 30, 20)),
    "train/Fear/0002.png": ((80, 40, 120, 70), (80, 40, 100, 60)),
}
LEFT_OUT = "train/Happy/0003.png"  # on disk, not in the face-box file


@pytest.fixture
def caers_root(tmp_path, write_image):
    """CAER-S with a capitalised ``Train`` folder, ``Angry``/``Anger``, 4 train and 2 test images per class."""
    root = tmp_path / "CAER-S"
    lines = []
    for split, disk_split, folders, count in (("train", "Train", TRAIN_FOLDERS, 4), ("test", "test", TEST_FOLDERS, 2)):
        for label, folder in enumerate(folders):
            for number in range(1, count + 1):
                relative = f"{split}/{folder}/{number:04d}.png"
                box = SPECIAL_BOXES.get(relative, (BOX, BOX))[0]
                write_image(root / disk_split / folder / f"{number:04d}.png", WIDTH, HEIGHT, box=box)
                if relative != LEFT_OUT:
                    lines.append(f"{relative},{label},{','.join(str(v) for v in box)}")
    (root / "faces.txt").write_text("\n".join(lines) + "\n")
    return root


def datamodule(root, **kwargs):
    kwargs.setdefault("face_boxes", str(root / "faces.txt"))
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 4)
    return CAERSDataModule(str(root), **kwargs)


def test_both_anger_spellings_are_class_zero_and_capitalised_splits_are_found(caers_root):
    dm = datamodule(caers_root, val_fraction=0.25)
    assert (dm.num_classes, dm.task, dm.class_names) == (7, "multiclass", list(CLASSES))
    dm.setup()
    train, val, test = dm.table("train"), dm.table("val"), dm.table("test")
    labels = {path: int(t) for table in (train, val, test) for path, t in zip(table.paths, table.targets)}
    assert labels["Train/Angry/0002.png"] == 0 and labels["test/Anger/0001.png"] == 0
    assert labels["Train/Surprise/0004.png"] == 6 and labels["test/Happy/0002.png"] == 3
    assert len(train) + len(val) == 7 * 4 - 1 and len(test) == 14
    assert "Train/Happy/0003.png" not in labels
    assert dm.dropped["train"] == {"images left out: not in the face-box file": 1}


def test_face_boxes_are_clipped_and_give_the_subject_and_the_mask(caers_root, colours):
    background, face = colours
    dm = datamodule(caers_root, val_fraction=0.25)
    dm.setup("fit")
    boxes = {}
    for table in (dm.table("train"), dm.table("val")):
        boxes.update({path: box.tolist() for path, box in zip(table.paths, table.boxes)})
    assert boxes["Train/Angry/0001.png"] == [0, 0, 30, 20]
    assert boxes["Train/Fear/0002.png"] == [80, 40, 100, 60]
    assert boxes["Train/Sad/0001.png"] == list(BOX)
    dataset = dm.dictionary_dataset()
    sample = dataset[dm.table("train").paths.index("Train/Sad/0001.png")]
    assert sample["subject"].shape == (3, 96, 96) and sample["context"].shape == (3, 224, 224)
    assert sample["target"].dtype == torch.int64 and sample["target"].ndim == 0 and int(sample["target"]) == 5
    np.testing.assert_allclose(sample["subject"][:, 48, 48], face, atol=0.02)
    # (20, 10, 60, 50) in 100x60 -> columns 44.8..134.4 -> 44..135, rows 37.3..186.7 -> 37..187
    assert torch.all(sample["context"][:, 37:187, 44:135] == 0)
    np.testing.assert_allclose(sample["context"][:, 200, 10], background, atol=0.02)


def test_validation_is_a_deterministic_stratified_holdout(caers_root):
    def split(**kwargs):
        dm = datamodule(caers_root, val_fraction=0.25, **kwargs)
        return dm.table("train"), dm.table("val")

    train, val = split()
    assert Counter(val.targets.tolist()) == dict.fromkeys(range(7), 1)  # round(0.25 * 4) = round(0.25 * 3) = 1
    assert not set(train.paths) & set(val.paths)
    again_train, again_val = split()
    assert again_val.paths == val.paths and again_train.paths == train.paths
    other = [split(seed=seed)[1].paths for seed in range(1, 6)]
    assert any(paths != val.paths for paths in other)
    with pytest.raises(ValueError, match="val_fraction"):
        CAERSDataModule(str(caers_root), val_fraction=0.0)


def test_without_face_boxes_the_subject_is_the_whole_frame_and_a_warning_says_so(caers_root, caplog):
    dm = datamodule(caers_root, face_boxes=None)
    with caplog.at_level(logging.WARNING):
        dm.setup("test")
    assert any("not localised" in record.message for record in caplog.records)
    assert len(dm.test_dataset) == 14
    sample = dm.test_dataset[0]
    assert sample["box"].tolist() == [0, 0, WIDTH, HEIGHT]
    assert not torch.any(sample["context"] == 0)


def test_missing_and_corrupt_images_are_errors_or_counted(caers_root):
    with (caers_root / "faces.txt").open("a") as file:
        file.write("test/Sad/0099.png,5,1,2,30,40\n")
    with pytest.raises(FileNotFoundError, match=r"faces\.txt line 42: image test/Sad/0099\.png is not under"):
        datamodule(caers_root).setup("test")
    (caers_root / "test" / "Fear" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dm = datamodule(caers_root, on_bad_sample="skip")
    dm.setup("test")
    assert len(dm.test_dataset) == 13
    assert dm.dropped["test"] == {"skipped (missing images)": 1, "skipped (unreadable image)": 1}
    lines = (caers_root / "faces.txt").read_text().splitlines()
    (caers_root / "faces.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(OSError, match=r"cannot read image .*Fear/0001\.png"):
        datamodule(caers_root).setup("test")


def test_malformed_face_box_lines_name_the_line(caers_root, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("train/Angry/0001.png,0,1,2,3,4\ntrain/Happy/0001.png,2,1,2,3,4\ntrain/Sad/0001.png,5,1,2\n")
    with pytest.raises(AnnotationError, match=r"bad\.txt line 2: label 2 does not match class folder 'Happy'"):
        read_face_boxes(bad)
    dm = datamodule(caers_root, face_boxes=[str(caers_root / "faces.txt"), str(bad)], on_bad_sample="skip")
    dm.setup("test")
    assert dm.dropped["face boxes"] == {"skipped (malformed face-box lines)": 3}  # + a repeated image
    with pytest.raises(FileNotFoundError, match="no folder named 'train'"):
        CAERSDataModule(str(tmp_path), num_workers=0).setup("fit")


def test_real_face_box_files_give_the_published_per_class_counts(shared_data):
    faces = read_face_boxes(shared_data / "caers_faces")
    counts = Counter((face.split, face.folder) for face in faces)
    expected = {
        ("train", "Angry"): 6856, ("train", "Disgust"): 6890, ("train", "Fear"): 6873, ("train", "Happy"): 6814,
        ("train", "Neutral"): 6799, ("train", "Sad"): 6910, ("train", "Surprise"): 6824,
        ("test", "Anger"): 2988, ("test", "Disgust"): 2980, ("test", "Fear"): 2972, ("test", "Happy"): 2990,
        ("test", "Neutral"): 2985, ("test", "Sad"): 2983, ("test", "Surprise"): 2970,
    }  # fmt: skip
    assert counts == expected
    assert sum(1 for face in faces if face.split == "train") == 47966
    assert sum(1 for face in faces if face.split == "test") == 20868
    assert {face.label for face in faces if face.folder in ("Angry", "Anger")} == {0}
    assert any(min(face.box) < 0 for face in faces)  # the real file has boxes to clip
