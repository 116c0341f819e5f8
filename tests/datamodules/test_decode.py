"""Reduced JPEG decoding: the reduction rule, never below the output sizes, close to a full decode, exact when off."""

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ccim_lightning.datamodules.dataset import sample_dict
from ccim_lightning.datamodules.decode import context_reduction, decode_reduced, image_reductions, person_reductions
from ccim_lightning.datamodules.table import TableDataModule
from ccim_lightning.datamodules.transforms import ContextTransform

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
MAD_TOLERANCE = 2.0
"""Largest mean absolute difference (0-255 units) of reduced-decode outputs from full-decode ones in these tests."""


def photo(rng, width, height):
    """A photo-like frame: gradients, blocks and noise at two scales (flat images would hide resampling errors)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([(x * a + y * b) % 256 for a, b in rng.uniform(0.1, 0.6, (3, 2))], axis=-1)
    coarse = rng.normal(0, 30, (height // 16 + 1, width // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)
    pixels += coarse[:height, :width] + rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photo_table(root, persons, seed=0, quality=90):
    """persons: [(name, (width, height), [box, ...])]; writes JPEGs and a table with every person in train."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, (width, height), boxes in persons:
        photo(rng, width, height).save(root / name, quality=quality)
        for k, box in enumerate(boxes):
            rows.append([name, *box, ("a", "b")[k % 2], "train"])
    with (root / "table.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "x1", "y1", "x2", "y2", "label", "split"])
        first = [persons[0][0], *persons[0][2][0]]
        writer.writerows(rows + [[*first, "a", "val"], [*first, "b", "test"]])
    return root


def table_module(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    return TableDataModule(str(root), "table.csv", ["a", "b"], **kwargs)


PERSONS = [
    ("big.jpg", (640, 480), [(40, 20, 600, 470), (0, 0, 300, 250)]),  # 1/4 and 1/2 allowed: the image gets 1/2
    ("wide.jpg", (800, 300), [(100, 10, 700, 290)]),
    ("edge.jpg", (480, 360), [(430, -10, 520, 350)]),  # clipped at the edge: 50 px wide, no reduction
    ("tiny.jpg", (400, 400), [(200, 200, 212, 215), (0, 0, 400, 400)]),  # a tiny subject keeps the image whole
    ("small.png", (320, 240), [(0, 0, 320, 240)]),  # not a JPEG: never reduced
]


def test_reduction_rule_matches_hand_computed_factors():
    sizes = np.array([[640, 480], [640, 480], [4000, 3000], [640, 480], [640, 480], [100, 80]])
    boxes = np.array([[0, 0, 300, 300], [10, 10, 100, 300], [0, 0, 2000, 2000], [600, 0, 640, 480],
                      [0, 0, 640, 480], [0, 0, 100, 80]], dtype=float)  # fmt: skip
    localised = np.array([True, True, True, True, False, True])
    # context (224, 224), subject (128, 128): the factor is min(W/224, H/224, bw/128, bh/128), then a power of two
    # row 0: min(2.86, 2.14, 2.34, 2.34) = 2.14 -> 2; row 1: 90/128 < 1 -> 1; row 2: min(17.9, 13.4, 15.6) -> 8;
    # row 3: 40/128 -> 1; row 4: not localised, the whole image: min(2.86, 2.14, 5, 3.75) -> 2; row 5: upscaled -> 1
    got = person_reductions(sizes, boxes, localised, (224, 224), (128, 128))
    assert got.tolist() == [2, 1, 8, 1, 2, 1]
    # (height, width) order: a 300-wide, 200-high context on 640x480 allows min(640/300, 480/200) = 2.13 -> 2
    assert person_reductions(sizes[:1], boxes[:1], localised[:1], (200, 300), (10, 10)).tolist() == [2]
    assert person_reductions(sizes[:1], boxes[:1], localised[:1], (100, 100), (10, 10)).tolist() == [4]
    assert image_reductions(["a", "b", "a", "c"], np.array([4, 2, 1, 8])).tolist() == [1, 2, 1, 8]
    # the context alone: min(W / Wc, H / Hc), then a power of two up to 8
    assert context_reduction((640, 480), (224, 224)) == 2  # min(2.86, 2.14)
    assert context_reduction((640, 480), (96, 96)) == 4  # min(6.7, 5)
    assert context_reduction((4000, 3000), (224, 224)) == 8  # 13.4, capped at 8
    assert context_reduction((200, 480), (224, 224)) == 1  # upscaled width
    assert context_reduction((448, 300), (150, 224)) == 2  # (height, width): min(448/224, 300/150) = 2


def test_draft_never_gives_less_than_the_outputs_need(tmp_path):
    """Random sizes, boxes at the edges and tiny subjects: the decoded image always covers both output sizes."""
    rng = np.random.default_rng(1)
    reduced = 0
    for case in range(40):
        width, height = int(rng.integers(40, 520)), int(rng.integers(40, 520))
        path = tmp_path / f"{case}.jpg"
        photo(rng, width, height).save(path, quality=80)
        context = (int(rng.integers(8, 80)), int(rng.integers(8, 80)))
        subject = (int(rng.integers(4, 40)), int(rng.integers(4, 40)))
        x1, y1 = rng.uniform(-0.3, 0.9) * width, rng.uniform(-0.3, 0.9) * height
        box = np.array([x1, y1, x1 + rng.uniform(0.01, 1.2) * width, y1 + rng.uniform(0.01, 1.2) * height])
        box = np.clip(box, 0, [width, height, width, height])
        localised = bool(box[2] - box[0] >= 1 and box[3] - box[1] >= 1)
        r = int(person_reductions(np.array([[width, height]]), box[None], np.array([localised]), context, subject)[0])
        image, applied = decode_reduced(path, r, (width, height))
        assert applied == r and image.size == (math.ceil(width / r), math.ceil(height / r))
        box_w, box_h = (box[2] - box[0], box[3] - box[1]) if localised else (width, height)
        # what the outputs are resized from, in decoded pixels, is never smaller than the outputs
        assert width / r >= context[1] or r == 1
        assert height / r >= context[0] or r == 1
        assert box_w / r >= subject[1] or r == 1
        assert box_h / r >= subject[0] or r == 1
        if r > 1:  # and the next reduction would have gone below one of them
            assert min(width / context[1], height / context[0], box_w / subject[1], box_h / subject[0]) < 2 * r
        reduced += r > 1
    assert reduced >= 10  # the cases exercise reductions, not only full decodes


def test_a_changed_file_or_a_png_is_decoded_whole(tmp_path):
    photo(np.random.default_rng(0), 320, 240).save(tmp_path / "a.jpg")
    photo(np.random.default_rng(0), 320, 240).save(tmp_path / "a.png")
    image, applied = decode_reduced(tmp_path / "a.jpg", 4, (640, 480))  # not the recorded size: no reduction
    assert (applied, image.size) == (1, (320, 240))
    image, applied = decode_reduced(tmp_path / "a.png", 4, (320, 240))
    assert (applied, image.size) == (1, (320, 240))
    image, applied = decode_reduced(tmp_path / "a.jpg", 4, (320, 240))
    assert (applied, image.size, image.mode) == (4, (80, 60), "RGB")


def grey_levels(tensor):
    """Normalised (3, H, W) float back to 0-255 units."""
    return tensor.numpy() * (STD * 255)[:, None, None] + (MEAN * 255)[:, None, None]


def test_reduced_outputs_are_within_tolerance_of_full_decode(tmp_path):
    root = write_photo_table(tmp_path, PERSONS)
    reduced = table_module(root, context_size=96, subject_size=64).dictionary_dataset()
    full = table_module(root, context_size=96, subject_size=64, reduced_decode=False).dictionary_dataset()
    by_image = dict(zip(reduced.table.paths, reduced.reductions.tolist()))
    assert by_image["big.jpg"] == 2 and by_image["edge.jpg"] == 1 and by_image["tiny.jpg"] == 1
    assert by_image["wide.jpg"] == 2  # min(800/96, 300/96, 600/64, 280/64) = 3.1 -> 2
    assert full.reductions.tolist() == [1] * len(full)
    for i in range(len(full)):
        a, b = reduced[i], full[i]
        assert a["box"].tolist() == b["box"].tolist()
        for key in ("subject", "context"):
            assert a[key].shape == b[key].shape
            mad = np.abs(grey_levels(a[key]) - grey_levels(b[key])).mean()
            whole = reduced.reductions[i] == 1 or reduced.table.paths[i].endswith(".png")
            if key == "subject" and whole:  # decoded whole: the subject is the full-resolution one
                assert mad == 0.0
            else:  # the context is box-reduced where its size allows it, also from a whole decode
                assert mad <= MAD_TOLERANCE, (reduced.table.paths[i], key, mad)
        # the masked region is the same (in full-resolution terms) with both decodes
        assert torch.equal(a["context"] == 0, b["context"] == 0)


def test_the_switch_off_gives_exactly_the_full_resolution_outputs(tmp_path):
    """reduced_decode=False: bit-equal to the plain transform on PIL's full decode, and to the formula."""
    root = write_photo_table(tmp_path, PERSONS)
    dataset = table_module(root, context_size=(48, 64), subject_size=32, reduced_decode=False).dictionary_dataset()
    plain = ContextTransform((48, 64), 32)
    for i in range(len(dataset)):
        path = root / dataset.table.paths[i]
        image = Image.open(path).convert("RGB")
        box = tuple(dataset.table.boxes[i]) if dataset.table.localised[i] else None
        expected = sample_dict(plain(image, box), dataset.table, i, mask_subject=True)
        got = dataset[i]
        for key in ("subject", "context", "box", "target"):
            assert torch.equal(got[key], expected[key]), key
        # independent of ContextTransform: resize, (x / 255 - mean) / std, the box filled with 0
        context = np.asarray(image.resize((64, 48), Image.Resampling.BILINEAR)).transpose(2, 0, 1) / 255.0
        context = (context - MEAN[:, None, None]) / STD[:, None, None]
        if box is not None:
            sx, sy = 64 / image.width, 48 / image.height
            x1, y1 = math.floor(box[0] * sx), math.floor(box[1] * sy)
            context[:, y1 : math.ceil(box[3] * sy), x1 : math.ceil(box[2] * sx)] = 0.0
        np.testing.assert_allclose(got["context"].numpy(), context, atol=1e-5)


@pytest.mark.parametrize("reduced_decode", [True, False])
def test_persons_sharing_an_image_get_what_a_fresh_decode_gives(tmp_path, reduced_decode):
    """The last-image cache (and the cached context resize) never hands one person another's pixels."""
    root = write_photo_table(tmp_path, PERSONS)
    dm = table_module(root, context_size=64, subject_size=32, reduced_decode=reduced_decode)
    dataset = dm.dictionary_dataset()
    for i in range(len(dataset)):
        fresh = dm.dictionary_dataset()[i]  # a new dataset: nothing cached
        cached = dataset[i]
        for key in ("subject", "context", "box"):
            assert torch.equal(cached[key], fresh[key])


@pytest.mark.parametrize("decoded_at", [1, 2])
def test_the_context_is_box_reduced_never_below_its_size(tmp_path, decoded_at):
    """A 640x480 JPEG, context 96: the context comes from the image at 1/4 (160x120), whatever the decode was."""
    photo(np.random.default_rng(3), 640, 480).save(tmp_path / "a.jpg", quality=90)
    image, applied = decode_reduced(tmp_path / "a.jpg", decoded_at, (640, 480))
    assert applied == decoded_at
    transform = ContextTransform(96, 32)
    got = transform(image, (0, 0, 640, 480), reduction=applied, full_size=(640, 480), reduce_context=True)
    # the same by hand: the decoded image box-reduced by 4 / decoded_at, resized to 96x96
    source = image.reduce(4 // decoded_at)
    assert source.size == (160, 120) and min(source.size) >= 96
    expected = np.asarray(source.resize((96, 96), Image.Resampling.BILINEAR)).transpose(2, 0, 1) / 255.0
    expected = (expected - MEAN[:, None, None]) / STD[:, None, None]
    np.testing.assert_allclose(got["context"].numpy(), expected, atol=1e-5)
    # and within the tolerance of the full-resolution resize
    full = Image.open(tmp_path / "a.jpg").convert("RGB").resize((96, 96), Image.Resampling.BILINEAR)
    mad = np.abs(grey_levels(got["context"]) - np.asarray(full).transpose(2, 0, 1)).mean()
    assert mad <= MAD_TOLERANCE
