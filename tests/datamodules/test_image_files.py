"""Image files: every supported mode decodes to the right values (against formulas written out here), other modes
and anything but a regular file are errors naming the file, and EXIF orientation makes boxes and pixels agree."""

import colorsys
import csv
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccim_lightning.datamodules.decode import SUPPORTED_MODES, check_image_mode, decode_reduced, load_rgb, to_rgb
from ccim_lightning.datamodules.table import TableDataModule

RNG = np.random.default_rng(0)
BYTES = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)  # (H, W, 4) values reused by the modes below
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)


def grey(values):
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, axis=-1)


def srgb_from_lab(lightness, a, b):
    """CIE L*a*b* (D65) -> sRGB in 0..255, the textbook formulas.

    PIL's LAB stores ``L* * 255 / 100``, ``a* + 128`` and ``b* + 128``.
    """
    fy = (lightness + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200])  # (3, ...)
    white = np.array([0.95047, 1.0, 1.08883]).reshape(3, *[1] * (f.ndim - 1))
    xyz = np.where(f**3 > 216 / 24389, f**3, (116 * f - 16) / (24389 / 27)) * white
    matrix = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    linear = np.clip(np.einsum("ij,j...->i...", matrix, xyz), 0, 1)
    return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def make(mode):
    """An image of ``mode`` built from known values, and its expected RGB (float, 0..255)."""
    channels = BYTES[..., :3].astype(np.float64)
    if mode == "1":
        bits = BYTES[..., 0] > 127
        return Image.fromarray(bits), grey(bits * 255.0)
    if mode == "L":
        return Image.fromarray(BYTES[..., 0], "L"), grey(BYTES[..., 0])
    if mode in ("LA", "RGBA", "RGBX"):  # alpha (or padding) ignored: the stored colour
        source = BYTES[..., :2] if mode == "LA" else BYTES
        image = Image.frombytes(mode, (5, 6), source.tobytes())
        return image, grey(BYTES[..., 0]) if mode == "LA" else channels
    if mode in ("P", "P+transparency", "PA"):
        index = BYTES[..., 0]
        if mode == "PA":
            image = Image.frombytes("PA", (5, 6), BYTES[..., :2].tobytes())
        else:
            image = Image.fromarray(index, "P")
        image.putpalette(PALETTE.tobytes())
        if mode == "P+transparency":
            image.info["transparency"] = int(index[0, 0])  # that index's pixels keep their palette colour
        return image, PALETTE[index].astype(np.float64)
    if mode == "RGB":
        return Image.fromarray(BYTES[..., :3]), channels
    if mode == "CMYK":
        cmyk = BYTES.astype(np.float64)
        return Image.frombytes("CMYK", (5, 6), BYTES.tobytes()), (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    if mode == "YCbCr":  # JPEG's (full-range ITU-R BT.601) conversion
        y, cb, cr = (channels[..., i] for i in range(3))
        rgb = np.stack(
            [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)]
        )
        return Image.frombytes("YCbCr", (5, 6), BYTES[..., :3].tobytes()), np.clip(np.moveaxis(rgb, 0, -1), 0, 255)
    if mode == "HSV":
        expected = [[colorsys.hsv_to_rgb(*(pixel / 255.0)) for pixel in row] for row in channels]
        return Image.frombytes("HSV", (5, 6), BYTES[..., :3].tobytes()), np.asarray(expected) * 255
    if mode == "LAB":  # PIL stores L* * 255 / 100 and a*, b* as signed bytes; rows 0-2 grey, rows 3-5 colours
        lightness = BYTES[..., 0].astype(np.float64) * 100 / 255
        ab = (BYTES[..., 1:3].astype(np.int64) % 64 - 32).astype(np.float64)  # moderate chroma, |a*|, |b*| <= 32
        ab[:3] = 0
        stored = np.dstack([BYTES[..., 0], ab.astype(np.int8).view(np.uint8)])
        expected = srgb_from_lab(lightness, ab[..., 0], ab[..., 1])
        return Image.frombytes("LAB", (5, 6), stored.tobytes()), np.moveaxis(expected, 0, -1)
    if mode.startswith("I;16") or mode == "I":
        deep = BYTES[..., 0].astype(np.int64) * 257 + BYTES[..., 1] % 2  # 16-bit values, odd ones included
        if mode == "I":
            image = Image.fromarray(deep.astype(np.int32), "I")
        else:
            order = ">" if mode == "I;16B" else "<" if mode in ("I;16", "I;16L") else "="
            image = Image.frombytes(mode, (5, 6), deep.astype(f"{order}u2").tobytes())
        return image, grey(np.floor((deep * 255 + 32767) / 65535))
    raise AssertionError(mode)


#: PIL's LAB conversion adapts to ICC's D50 white; the textbook D65 formula above differs by a few levels on colours
#: (greys agree within 1.5, checked separately).
TOLERANCE = {"CMYK": 1, "YCbCr": 1.5, "HSV": 1, "LAB": 8}
#: Modes a file can carry, and a format that stores them (the others are tested in memory only).
SAVES_AS = {"1": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "P+transparency": "PNG", "PA": "TIFF", "RGB": "PNG",
            "RGBA": "PNG", "CMYK": "TIFF", "YCbCr": "TIFF", "LAB": "TIFF", "I;16": "PNG", "I;16B": "TIFF",
            "I": "TIFF"}  # fmt: skip
MODES = [*SUPPORTED_MODES, "P+transparency"]


def test_the_docs_list_the_supported_modes():
    text = (Path(__file__).parents[2] / "docs" / "how-to" / "datasets.md").read_text(encoding="utf-8")
    section = text[text.index("## Image files") :][:2500]
    for mode in SUPPORTED_MODES:
        assert f"`{mode}`" in section, mode
    assert "`F`" in section


@pytest.mark.parametrize("mode", MODES)
def test_every_supported_mode_decodes_to_the_right_values(tmp_path, mode):
    image, expected = make(mode)
    assert image.mode == mode.split("+")[0]
    rgb = np.asarray(to_rgb(image, tmp_path / "memory"), dtype=np.float64)
    assert rgb.shape == (6, 5, 3)
    np.testing.assert_allclose(rgb, expected, atol=TOLERANCE.get(mode, 0.5))
    if mode == "LAB":
        np.testing.assert_allclose(rgb[:3], expected[:3], atol=1.5)
    if mode in SAVES_AS:
        path = tmp_path / f"image.{SAVES_AS[mode].lower()}"
        image.save(path, SAVES_AS[mode])
        opened_mode = Image.open(path).mode
        assert opened_mode in SUPPORTED_MODES
        np.testing.assert_allclose(
            np.asarray(load_rgb(path), dtype=np.float64), expected, atol=TOLERANCE.get(mode, 0.5)
        )


def test_float_images_and_unknown_modes_are_errors_naming_file_and_mode(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F").save(path)
    with pytest.raises(OSError, match=r"float\.tif: image mode 'F' \(32-bit floating-point pixels\).*convert"):
        load_rgb(path)
    with pytest.raises(OSError, match=r"x\.png: image mode 'La' is not supported \(supported: 1, L, .*convert"):
        check_image_mode("La", tmp_path / "x.png")


def write_table(root, rows):
    """The train ``rows``, and a val and a test row on the last row's image."""
    with (root / "t.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "x1", "y1", "x2", "y2", "label", "split"])
        writer.writerows(rows + [[*rows[-1][:5], "a", "val"], [*rows[-1][:5], "b", "test"]])


def module(root, **kwargs):
    return TableDataModule(str(root), "t.csv", ["a", "b"], num_workers=0, **kwargs)


def finishes(function, seconds=20):
    """Runs ``function`` in a thread; returns its exception (or None). Fails if it does not end in time."""
    outcome = {}

    def run():
        try:
            function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} blocked (a named pipe opened for reading?)"
    return outcome.get("error")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_a_named_pipe_is_refused_before_it_is_opened(tmp_path, write_image):
    os.mkfifo(tmp_path / "pipe.jpg")
    write_image(tmp_path / "ok.jpg")
    write_table(tmp_path, [["pipe.jpg", 1, 1, 9, 9, "a", "train"], ["ok.jpg", 1, 1, 9, 9, "b", "train"]])
    error = finishes(lambda: module(tmp_path).table("train"))
    assert isinstance(error, OSError)
    assert "t.csv line 2" in str(error) and "pipe.jpg is a named pipe, not a regular file" in str(error)
    skipped = module(tmp_path, on_bad_sample="skip")
    assert finishes(lambda: skipped.table("train")) is None
    assert skipped.dropped["train"] == {"skipped (unreadable image)": 1}
    error = finishes(lambda: load_rgb(tmp_path / "pipe.jpg"))  # the decode path checks too
    assert isinstance(error, OSError) and "named pipe" in str(error)


def test_a_folder_and_a_device_are_refused_naming_what_they_are(tmp_path, write_image):
    (tmp_path / "folder.jpg").mkdir()
    write_image(tmp_path / "ok.jpg")
    write_table(tmp_path, [["folder.jpg", 1, 1, 9, 9, "a", "train"], ["ok.jpg", 1, 1, 9, 9, "b", "train"]])
    with pytest.raises(OSError, match=r"t\.csv line 2: cannot read image .*folder\.jpg is a folder, not a regular"):
        module(tmp_path).table("train")
    write_table(tmp_path, [["/dev/null", 1, 1, 9, 9, "a", "train"], ["ok.jpg", 1, 1, 9, 9, "b", "train"]])
    with pytest.raises(OSError, match=r"/dev/null is a device, not a regular file"):
        module(tmp_path, allow_absolute_paths=True).table("train")


# --- EXIF orientation ----------------------------------------------------------------------------------------------
RED, GREY = (230, 20, 20), (120, 120, 120)


def rotated_jpeg(path, orientation=6):
    """A JPEG stored 320x160 whose EXIF orientation 6 displays it 160x320 with a red box at (20, 40, 100, 200).

    Orientation 6 means: turn the stored image 90 degrees clockwise to display it, so the stored pixels are the
    displayed ones turned 90 degrees counter-clockwise.
    """
    displayed = Image.new("RGB", (160, 320), GREY)
    displayed.paste(RED, (20, 40, 100, 200))
    stored = displayed.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("reduced_decode", [False, True])
def test_exif_orientation_boxes_and_pixels_agree(tmp_path, reduced_decode):
    path = rotated_jpeg(tmp_path / "turned.jpg")
    assert Image.open(path).size == (320, 160)
    assert load_rgb(path).size == (160, 320) and load_rgb(path).getpixel((60, 120))[0] > 200
    write_table(tmp_path, [["turned.jpg", 20, 40, 100, 200, "a", "train"], ["turned.jpg", 0, 0, 10, 10, "b", "train"]])
    data = module(tmp_path, context_size=64, subject_size=16, reduced_decode=reduced_decode)
    table = data.table("train")
    assert table.sizes.tolist() == [[160, 320], [160, 320]]  # the displayed size, which the boxes refer to
    dataset = data.make_dataset("train", data.eval_transform, mask_subject=True)
    subject = dataset[0]["subject"]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = (subject * std[:, None, None] + mean[:, None, None]) * 255
    assert torch.allclose(pixels.mean(dim=(1, 2)), torch.tensor(RED, dtype=torch.float32), atol=12)  # all red


def test_reduced_decoding_of_a_turned_jpeg_is_the_turned_reduced_image(tmp_path):
    path = rotated_jpeg(tmp_path / "turned.jpg")
    image, applied = decode_reduced(path, 2, (160, 320))  # the displayed size recorded at setup
    assert applied == 2 and image.size == (80, 160)
    assert image.getpixel((30, 60))[0] > 200 and image.getpixel((70, 140))[0] < 160


@pytest.mark.parametrize("reduced_decode", [False, True])
def test_the_predictor_reads_boxes_of_a_turned_jpeg_in_displayed_pixels(tmp_path, reduced_decode):
    from ccim_lightning import CCIMLightningModule
    from ccim_lightning.inference.predictor import Predictor

    class MeanHost(torch.nn.Module):
        feature_dim = 3

        def forward(self, batch):
            return batch["subject"].mean(dim=(2, 3))  # the subject's mean colour

    path = rotated_jpeg(tmp_path / "turned.jpg")
    write_table(tmp_path, [["turned.jpg", 20, 40, 100, 200, "a", "train"]])
    inputs = module(tmp_path, context_size=64, subject_size=16, reduced_decode=reduced_decode).input_settings()
    torch.manual_seed(0)
    model = CCIMLightningModule(
        MeanHost(),
        num_classes=2,
        attention="none",
        num_prototypes=2,
        confounder_dim=4,
        hidden_dim=3,
        class_names=["a", "b"],
    )
    with torch.no_grad():  # logit of class a = the subject's mean red (normalised), class b = 0
        model.head.w_h.copy_(torch.eye(3))
        model.head.classifier.fc2.weight.zero_()
        model.head.classifier.fc2.bias.zero_()
        model.head.fc.weight.zero_()
        model.head.fc.bias.zero_()
        model.head.fc.weight[0, 0] = 1.0
    predictor = Predictor(model, inputs, device="cpu")
    box = [(10, 100, 150, 300)]  # half red, half grey in the displayed 160x320 image; all red if cut at y = 160
    from_file = predictor.predict([path], [box])
    from_pixels = predictor.predict([load_rgb(path)], [box])  # the displayed image, decoded whole
    for name in ("a", "b"):
        assert from_file[name].iloc[0] == pytest.approx(from_pixels[name].iloc[0], abs=0.01)
    # by hand: the crop of the displayed image (red block x 20..100, y 40..200 on grey), mean red normalised
    displayed = np.full((320, 160), GREY[0], dtype=np.float64)
    displayed[40:200, 20:100] = RED[0]
    red = (displayed[100:300, 10:150].mean() / 255 - 0.485) / 0.229
    assert from_file["a"].iloc[0] == pytest.approx(math.exp(red) / (math.exp(red) + 1), abs=0.03)
    red_only = predictor.predict([load_rgb(path)], [[(10, 100, 150, 160)]])
    assert abs(red_only["a"].iloc[0] - from_pixels["a"].iloc[0]) > 0.05  # the check tells the two crops apart
