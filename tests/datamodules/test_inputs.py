"""Inputs that used to be silently wrong: 16-bit images, non-finite or outlying boxes, off-scale V/A/D, broken files."""

import csv
import logging

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from ccim_lightning.datamodules import CAERSDataModule, EmoticDataModule, TableDataModule
from ccim_lightning.datamodules.caers import read_face_boxes
from ccim_lightning.datamodules.common import AnnotationError
from ccim_lightning.datamodules.decode import load_rgb
from ccim_lightning.datamodules.emotic import read_emotic_csv, read_emotic_mat

EMOTIC_HEADER = ["Index", "Folder", "Filename", "Image Size", "BBox", "Categorical_Labels", "Continuous_Labels",
                 "Gender", "Age"]  # fmt: skip


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def emotic_row(box="[10, 8, 30, 40]", vad="[5, 3, 9]", size="[64, 48]", name="x.jpg"):
    return [0, "mscoco/images", name, size, box, "['Fear']", vad, "Male", "Adult"]


@pytest.fixture
def emotic_root(tmp_path, write_image):
    root = tmp_path / "EMOTIC"
    write_image(root / "emotic" / "mscoco" / "images" / "x.jpg", 64, 48, box=(10, 8, 30, 40))
    for split in ("train", "val", "test"):
        write_csv(root / "emotic_pre" / f"{split}.csv", EMOTIC_HEADER, [emotic_row()])
    return root


def table(root, rows, name="t.csv"):
    header = ["image", "x1", "y1", "x2", "y2", "label", "split"]
    return write_csv(root / name, header, rows)


# --- 16-bit images ---------------------------------------------------------------------------------------------------
def test_16_bit_greyscale_pngs_are_scaled_not_clipped(tmp_path, write_image):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    path = tmp_path / "data" / "deep.png"
    path.parent.mkdir()
    Image.fromarray(np.tile(ramp, (48, 1))).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_rgb(path))
    expected = np.round(ramp.astype(np.float64) * 255 / 65535)  # the 16 -> 8 bit rescaling, written out
    assert pixels.shape == (48, 256, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[10, :, 0], expected)
    assert len(np.unique(pixels)) == 256  # a gradient, not black and white
    Image.fromarray(np.tile(ramp.astype(np.int32), (48, 1)), mode="I").save(tmp_path / "int.tif")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "int.tif"))[0, :, 1], expected)
    # through a datamodule: the whole context, normalised, follows the ramp
    table(tmp_path / "data", [["deep.png", 0, 0, 10, 10, "a", split] for split in ("train", "val", "test")])
    dm = TableDataModule(str(tmp_path / "data"), "t.csv", ["a", "b"], num_workers=0, context_size=(48, 256))
    dm.setup("test")
    context = dm.test_dataset[0]["context"].numpy()
    np.testing.assert_allclose(context[0, 30, 20:], (expected[20:] / 255 - 0.485) / 0.229, atol=0.02)


def test_32_bit_integer_images_beyond_16_bits_are_an_error(tmp_path):
    Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(OSError, match=r"wide\.tif: 32-bit integer image with values 70000\.\.70000"):
        load_rgb(tmp_path / "wide.tif")


# --- boxes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_boxes_are_bad_samples_naming_file_row_and_field(tmp_path, write_image, value):
    root = tmp_path / "data"
    write_image(root / "a.png")
    table(
        root,
        [
            ["a.png", 1, 1, 30, 30, "a", "train"],
            ["a.png", 1, value, 30, 30, "a", "train"],
            ["a.png", 1, 1, 9, 9, "a", "val"],
        ],
    )
    with pytest.raises(AnnotationError, match=r"t\.csv line 3: box \(x1, y1, x2, y2\) .* is not finite"):
        TableDataModule(str(root), "t.csv", ["a", "b"]).table("train")
    dm = TableDataModule(str(root), "t.csv", ["a", "b"], on_bad_sample="skip")
    assert len(dm.table("train")) == 1 and dm.dropped["table"] == {"skipped (malformed rows)": 1}


def test_non_finite_boxes_in_emotic_and_caers_files(emotic_root, tmp_path):
    write_csv(emotic_root / "emotic_pre" / "test.csv", EMOTIC_HEADER, [emotic_row(), emotic_row("[nan, 8, 30, 40]")])
    with pytest.raises(AnnotationError, match=r"test\.csv line 3: BBox \[nan, 8\.0, 30\.0, 40\.0\] is not finite"):
        read_emotic_csv(emotic_root / "emotic_pre" / "test.csv")
    faces = tmp_path / "faces.txt"
    faces.write_text("train/Angry/0001.png,0,1,2,inf,40\n")
    with pytest.raises(AnnotationError, match=r"faces\.txt line 1: box \[1\.0, 2\.0, inf, 40\.0\] is not finite"):
        read_face_boxes(faces)
    person = {"body_bbox": np.array([1.0, np.nan, 30, 40]), "annotations_categories": {"categories": "Fear"},
              "annotations_continuous": {"valence": 5.0, "arousal": 5.0, "dominance": 5.0}}  # fmt: skip
    image = {"filename": "x.jpg", "folder": "mscoco/images", "person": person}
    savemat(tmp_path / "a.mat", {"train": [image], "val": [image], "test": [image]})
    with pytest.raises(
        AnnotationError, match=r"a\.mat train\[0\] \(mscoco/images/x\.jpg\) person 0: body_bbox .*finite"
    ):
        read_emotic_mat(tmp_path / "a.mat", splits=("train",))


def test_boxes_mostly_outside_the_image_are_counted_with_a_warning(tmp_path, write_image, caplog):
    root = tmp_path / "data"
    write_image(root / "a.png", 64, 48)
    rows = [
        ["a.png", 50, 10, 500, 30, "a", "test"],  # 14 of 450 px wide inside: 3%
        ["a.png", -10, 0, 40, 48, "a", "test"],  # 80% inside: fine
        ["a.png", 0, 0, 64, 48, "b", "test"],
    ]
    table(root, rows)
    dm = TableDataModule(str(root), "t.csv", ["a", "b"])
    with caplog.at_level(logging.WARNING):
        boxes = dm.table("test").boxes
    key = "boxes mostly outside the image (< 50% of the box inside; kept, clipped)"
    assert dm.dropped["test"] == {key: 1}
    np.testing.assert_array_equal(boxes[0], [50, 10, 64, 30])
    assert any(key in record.message and "t.csv line 2" in record.message for record in caplog.records)


# --- V/A/D -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vad", ["[5, inf, 3]", "[0, 5, 5]", "[5, 5, 11]"])
def test_vad_off_the_1_to_10_scale_is_a_bad_sample(emotic_root, vad):
    path = write_csv(emotic_root / "emotic_pre" / "test.csv", EMOTIC_HEADER, [emotic_row(), emotic_row(vad=vad)])
    with pytest.raises(AnnotationError, match=r"test\.csv line 3: Continuous_Labels .* off the 1\.\.10 scale"):
        read_emotic_csv(path)
    dm = EmoticDataModule(str(emotic_root), on_bad_sample="skip", num_workers=0)
    assert len(dm.table("test")) == 1 and dm.dropped["test"] == {"skipped (malformed rows)": 1}
    write_csv(path, EMOTIC_HEADER, [emotic_row(vad="[nan, 1, 10]")])  # NaN = not annotated; 1 and 10 are fine
    np.testing.assert_array_equal(read_emotic_csv(path).extras["vad"][0], [np.nan, 1, 10])


def test_vad_off_scale_in_the_mat_names_the_entry(tmp_path):
    person = {"body_bbox": np.array([1.0, 2, 30, 40]), "combined_categories": np.array(["Fear"], dtype=object),
              "combined_continuous": {"valence": 12.0, "arousal": 5.0, "dominance": 5.0}}  # fmt: skip
    image = {"filename": "x.jpg", "folder": "mscoco/images", "person": person}
    savemat(tmp_path / "a.mat", {"train": [], "val": [image], "test": []})
    with pytest.raises(AnnotationError, match=r"a\.mat val\[0\] .* person 0: combined_continuous .*valence=12"):
        read_emotic_mat(tmp_path / "a.mat", splits=("val",))


# --- broken files ----------------------------------------------------------------------------------------------------
def test_csv_encoding_and_quoting_errors_name_the_file(tmp_path, emotic_root):
    root = tmp_path / "data"
    root.mkdir()
    (root / "t.csv").write_bytes("image,x1,y1,x2,y2,label,split\ncaf\xe9.png,1,1,9,9,a,train\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"t\.csv line 2 is not UTF-8 text \(bytes b'caf\\xe9\.png.*iconv"):
        TableDataModule(str(root), "t.csv", ["a", "b"]).table("train")
    broken = emotic_root / "emotic_pre" / "train.csv"
    text = broken.read_text()
    broken.write_text(text + '1,mscoco/images,"y.jpg,[64, 48]' + "x" * 140_000 + "\n")
    with pytest.raises(AnnotationError, match=r"train\.csv line 3: field larger than field limit.*unclosed quote"):
        EmoticDataModule(str(emotic_root), num_workers=0).table("train")


def test_arrays_that_cannot_be_memory_mapped_name_the_file(emotic_root):
    folder = emotic_root / "emotic_pre"
    np.save(folder / "test_body_arr.npy", np.zeros((1, 16, 16, 3), np.uint8))
    np.save(folder / "test_context_arr.npy", np.zeros((1, 32, 32, 3), np.uint8))
    data = (folder / "test_context_arr.npy").read_bytes()
    (folder / "test_context_arr.npy").write_bytes(data[: len(data) // 2])  # an interrupted copy
    dm = EmoticDataModule(str(emotic_root), use_arrays=True, num_workers=0)
    with pytest.raises(AnnotationError, match=r"test_context_arr\.npy cannot be memory-mapped .*truncated"):
        dm.setup("test")
    np.save(folder / "test_context_arr.npy", np.array([None], dtype=object), allow_pickle=True)
    with pytest.raises(AnnotationError, match=r"test_context_arr\.npy cannot be memory-mapped"):
        EmoticDataModule(str(emotic_root), use_arrays=True, num_workers=0).setup("test")


def test_caers_with_a_16_bit_frame_gives_a_proportional_face(tmp_path):
    root = tmp_path / "CAER-S"
    for split, folder in (("train", "Angry"), ("train", "Happy"), ("test", "Anger")):
        (root / split / folder).mkdir(parents=True)
        for i in range(1, 3):
            Image.fromarray(np.full((20, 30), 32896, np.uint16)).save(root / split / folder / f"{i:04d}.png")
    dm = CAERSDataModule(str(root), num_workers=0, val_fraction=0.5, subject_size=8, context_size=8)
    dm.setup("test")
    # 32896 / 65535 * 255 = 128.0 -> grey 128, normalised per channel
    np.testing.assert_allclose(dm.test_dataset[0]["subject"][:, 4, 4], (128 / 255 - np.array([0.485, 0.456, 0.406]))
                               / np.array([0.229, 0.224, 0.225]), atol=1e-4)  # fmt: skip
