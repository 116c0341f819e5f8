"""Reduced-size JPEG decoding: PIL's ``Image.draft`` (libjpeg DCT scaling) down to what the outputs still need.

A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size for less than the full decode and, above all, a much cheaper
resize afterwards. The reduction ``r`` of a person's image is the largest of 1, 2, 4, 8 for which the decoded image
still gives both outputs at least their size, never less (so the final resize only ever shrinks, as it does at full
resolution, or keeps the size):

- the context (the whole image, resized to ``(Hc, Wc)``): ``width / r >= Wc`` and ``height / r >= Hc``;
- the subject (the box, resized to ``(Hs, Ws)``): ``box_width / r >= Ws`` and ``box_height / r >= Hs``; a
  subject that is not localised is the whole image.

The context needs only the first condition, so where the subject keeps the decode above the context's own
reduction ``r_c`` (:func:`context_reduction`), the context is made from the decoded image box-reduced the rest of
the way (PIL ``Image.reduce`` by ``r_c / r``, 2x2 means per factor of two, as DCT scaling roughly is): the context
always comes from the image at ``1 / r_c`` of its size, never below the context size.

Where several persons share an image, the image is decoded at the smallest of their reductions (the per-image
minimum), so every person of the image can be cut from one decode and the result of a person does not depend on
which of them was decoded first. Reduced pixels are ``full / r``: a box ``(x1, y1, x2, y2)`` in full-resolution
pixels is ``(x1 / r, ..., y2 / r)`` in the reduced image, and the full image is the region ``(0, 0, W / r, H / r)``
(libjpeg rounds the reduced size up, so that region may end inside the last pixel).

Only JPEG files are decoded reduced (``draft`` does nothing to other formats; a PNG's context is still
box-reduced); an image whose size on disk no longer matches the size recorded at setup is decoded at full size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ccim_lightning.datamodules.common import to_rgb

REDUCTIONS: tuple[int, ...] = (8, 4, 2, 1)
"""The DCT scalings PIL's JPEG ``draft`` offers (decoded size = full size / r, rounded up)."""
DECODE_RULE = "jpeg-draft+context-reduce-v1"
"""Names the reduction rule above; part of the dictionary signature when reduced decoding is on."""


def person_reductions(
    sizes: np.ndarray,
    boxes: np.ndarray,
    localised: np.ndarray,
    context_size: tuple[int, int],
    subject_size: tuple[int, int],
) -> np.ndarray:
    """The largest reduction (1, 2, 4 or 8) each person's outputs allow (module docstring).

    Args:
        sizes: (N, 2) full image width and height.
        boxes: (N, 4) clipped x1, y1, x2, y2 in full-resolution pixels.
        localised: (N,) bool; a subject that is not localised is the whole image.
        context_size: Context output (height, width).
        subject_size: Subject output (height, width).

    Returns:
        (N,) int64 reductions.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    localised = np.asarray(localised, dtype=bool).reshape(-1)
    box_w = np.where(localised, boxes[:, 2] - boxes[:, 0], sizes[:, 0])
    box_h = np.where(localised, boxes[:, 3] - boxes[:, 1], sizes[:, 1])
    (context_h, context_w), (subject_h, subject_w) = context_size, subject_size
    # the largest real factor each output allows; the reduction is the largest power of two not above it
    allowed = np.minimum.reduce(
        [sizes[:, 0] / context_w, sizes[:, 1] / context_h, box_w / subject_w, box_h / subject_h]
    )
    out = np.ones(len(sizes), dtype=np.int64)
    for reduction in REDUCTIONS[::-1][1:]:
        out[allowed >= reduction] = reduction
    return out


def context_reduction(size: Sequence[int], context_size: tuple[int, int]) -> int:
    """The largest of 1, 2, 4, 8 that leaves the whole image (``size`` = width, height) at least the context size."""
    allowed = min(size[0] / context_size[1], size[1] / context_size[0])
    return next(r for r in REDUCTIONS if allowed >= r or r == 1)


def image_reductions(paths: Sequence[str], reductions: np.ndarray) -> np.ndarray:
    """Per person, the smallest reduction among the persons of its image (one decode serves them all)."""
    if len(paths) == 0:
        return np.zeros(0, dtype=np.int64)
    return pd.Series(np.asarray(reductions, dtype=np.int64)).groupby(list(paths)).transform("min").to_numpy()


def decode_reduced(path: Path, reduction: int, expected_size: Sequence[int] | None) -> tuple[Image.Image, int]:
    """Decodes ``path`` into 8-bit RGB at ``1 / reduction`` of its size where it is a JPEG of the expected size.

    Args:
        path: The image file.
        reduction: 1, 2, 4 or 8 (from :func:`person_reductions`).
        expected_size: The (width, height) the reduction was computed for; a file of another size is decoded whole.

    Returns:
        The image and the reduction actually applied (1 for non-JPEG files, changed files and ``reduction=1``).
    """
    image = Image.open(path)
    width, height = image.size
    applied = 1
    if reduction > 1 and image.format == "JPEG" and (expected_size is None or tuple(expected_size) == image.size):
        image.draft("RGB", (width // reduction, height // reduction))
        if image.size == (math.ceil(width / reduction), math.ceil(height / reduction)):
            applied = reduction
        elif image.size != (width, height):  # draft picked another scale: never expected; decode whole to be safe
            image = Image.open(path)
    return to_rgb(image, path), applied
