"""Image paths from annotations stay inside the dataset root unless absolute paths are allowed explicitly."""

import csv
import os

import pytest

from ccim_lightning.datamodules import EmoticDataModule, TableDataModule
from ccim_lightning.datamodules.common import AnnotationError, path_outside_root

EMOTIC_HEADER = ["Index", "Folder", "Filename", "Image Size", "BBox", "Categorical_Labels", "Continuous_Labels",
                 "Gender", "Age"]  # fmt: skip


def write_rows(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def table_root(tmp_path, write_image, image):
    """A root with ``ok.jpg`` and a table whose first train row names ``image``; ``outside.jpg`` is beside the root."""
    root = tmp_path / "data"
    write_image(root / "ok.jpg")
    write_image(tmp_path / "outside.jpg")
    rows = [[image, 1, 1, 20, 20, "a", "train"], ["ok.jpg", 1, 1, 20, 20, "b", "train"]]
    rows += [["ok.jpg", 2, 2, 20, 20, "a", "val"], ["ok.jpg", 3, 3, 20, 20, "b", "test"]]
    write_rows(root / "t.csv", ["image", "x1", "y1", "x2", "y2", "label", "split"], rows)
    return root


def module(root, **kwargs):
    return TableDataModule(str(root), "t.csv", ["a", "b"], num_workers=0, **kwargs)


def test_the_rule_on_path_text():
    assert path_outside_root("images/x.jpg") is None
    assert path_outside_root("images/../x.jpg") is None  # stays inside
    assert path_outside_root("./x.jpg") is None
    for climbing in ("../x.jpg", "..", "images/../../x.jpg", "a/b/../../../x.jpg"):
        assert "climbs out of the dataset root" in path_outside_root(climbing), climbing
    assert "allow_absolute_paths" in path_outside_root("/etc/passwd")
    assert path_outside_root("/data/x.jpg", allow_absolute_paths=True) is None
    assert "climbs out" in path_outside_root("../x.jpg", allow_absolute_paths=True)  # allowing absolute is not this


@pytest.mark.parametrize("image", ["../outside.jpg", "sub/../../outside.jpg"])
def test_rows_climbing_out_of_the_root_are_refused_naming_file_row_column_and_value(tmp_path, write_image, image):
    root = table_root(tmp_path, write_image, image)
    with pytest.raises(AnnotationError, match=rf"t\.csv line 2: column 'image' = '{image}' climbs out of the dataset"):
        module(root).table("train")
    skipping = module(root, on_bad_sample="skip")
    assert len(skipping.table("train")) == 1
    assert skipping.dropped["train"]["skipped (image path outside the root)"] == 1


def test_absolute_paths_are_refused_unless_allowed(tmp_path, write_image):
    outside = str(tmp_path / "outside.jpg")
    root = table_root(tmp_path, write_image, outside)
    with pytest.raises(AnnotationError, match=r"line 2: column 'image' = '.*outside\.jpg' is an absolute path.*"
                       r"allow_absolute_paths=True"):  # fmt: skip
        module(root).table("train")
    allowed = module(root, allow_absolute_paths=True)
    assert allowed.table("train").paths == [outside, "ok.jpg"]
    sample = allowed.make_dataset("train", allowed.eval_transform, mask_subject=True)[0]
    assert sample["subject"].shape[0] == 3  # the absolute file is read


def test_an_emotic_folder_climbing_out_is_refused(tmp_path, write_image):
    root = tmp_path / "EMOTIC"
    write_image(root / "emotic" / "mscoco" / "images" / "x.jpg")
    write_image(tmp_path / "elsewhere" / "x.jpg")
    good = [0, "mscoco/images", "x.jpg", "[64, 48]", "[10, 8, 30, 40]", "['Fear']", "[5, 3, 9]", "Male", "Adult"]
    bad = [1, "../../elsewhere", *good[2:]]
    for split in ("train", "val", "test"):
        write_rows(root / "emotic_pre" / f"{split}.csv", EMOTIC_HEADER, [bad, good] if split == "train" else [good])
    data = EmoticDataModule(str(root), num_workers=0)
    with pytest.raises(
        AnnotationError, match=r"train\.csv line 2.*: Folder/Filename = '(\.\./)+elsewhere/x\.jpg' climbs"
    ):
        data.table("train")


def test_a_symlink_inside_the_root_is_followed(tmp_path, write_image):
    # Decision (README "Image files"): the root's owner made the link; only the annotation text is distrusted.
    root = table_root(tmp_path, write_image, "linked.jpg")
    os.symlink(tmp_path / "outside.jpg", root / "linked.jpg")
    assert module(root).table("train").paths == ["linked.jpg", "ok.jpg"]
