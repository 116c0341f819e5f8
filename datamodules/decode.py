"""Image decoding: checked files, every PIL mode to 8-bit RGB or an error, EXIF orientation, reduced JPEG decoding.

Files and modes: only regular files are opened (a named pipe would block the reader forever; a folder or a device
is an error naming the path), and an image whose mode is not in :data:`SUPPORTED_MODES` is refused from its header,
naming the file and the mode. Orientation: an image carrying an EXIF orientation is turned as viewers display it
(``ImageOps.exif_transpose``), and its recorded size is the displayed size, so annotation boxes are read in the
displayed image's pixels (what annotation tools show) and boxes and pixels agree.

Reduced decoding:

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
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageOps

REDUCTIONS: tuple[int, ...] = (8, 4, 2, 1)
"""The DCT scalings PIL's JPEG ``draft`` offers (decoded size = full size / r, rounded up)."""
DECODE_RULE = "jpeg-draft+context-reduce-v1"
"""Names the reduction rule above; part of the dictionary signature when reduced decoding is on."""


# --- files, modes and orientation ---------------------------------------------------------------------------------
#: Image modes decoded to 8-bit RGB (README "Image files"). Alpha and palette transparency are ignored (each
#: pixel's stored colour is kept, as torchvision's RGB decoding does); 16-bit greyscale is scaled; ``I`` (32-bit
#: integers) is read as 16-bit greyscale when its values fit 16 bits; the others are PIL's colour conversions.
SUPPORTED_MODES: tuple[str, ...] = (
    "1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
    "I;16", "I;16B", "I;16L", "I;16N", "I",
)  # fmt: skip
#: Orientations (EXIF tag 274) that turn the stored image by 90 degrees: the displayed width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: Path) -> None:
    """Refuses anything but a regular file before it is opened (a named pipe would block the reader forever).

    Symlinks are followed: the file they point to is checked.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: ``path`` is a folder, a named pipe, a device or a socket.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"{path} is {_file_kind(mode)}, not a regular file; an image must be a file")


def check_image_mode(mode: str, path: Path) -> None:
    """Raises ``OSError`` naming the file and mode unless ``mode`` is one of :data:`SUPPORTED_MODES`."""
    if mode in SUPPORTED_MODES:
        return
    if mode == "F":
        raise OSError(
            f"{path}: image mode 'F' (32-bit floating-point pixels) has no standard value range (0..1, 0..255 or "
            "anything); convert the image to 8-bit (L or RGB) or 16-bit (I;16) with the range you mean"
        )
    raise OSError(
        f"{path}: image mode {mode!r} is not supported (supported: {', '.join(SUPPORTED_MODES)}); convert the image "
        "to RGB"
    )


def open_image(path: Path) -> Image.Image:
    """``Image.open`` after :func:`check_regular_file`, refusing unsupported modes from the header (lazy: no decode)."""
    check_regular_file(path)
    image = Image.open(path)
    try:
        check_image_mode(image.mode, path)
    except OSError:
        image.close()
        raise
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of a freshly opened image (1 = as stored, also when there is no tag).

    Read from the header only: a PNG whose ``eXIf`` chunk follows the pixels counts as 1, because Pillow would
    decode the whole image at setup to find it (and setup and decoding must agree on the size).
    """
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as displayed, i.e. after its EXIF orientation (the size boxes refer to)."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _QUARTER_TURNS else (width, height)


def load_rgb(path: Path) -> Image.Image:
    """Decodes an image with PIL into 8-bit RGB, turned as its EXIF orientation says (as viewers display it).

    PIL's own ``convert("RGB")`` clips 16-bit values at 255, which turns a 16-bit PNG into a black-and-white
    image; here values are divided by 257 (65535 -> 255). Mode ``I`` (32-bit integers, what older Pillow versions
    give for 16-bit PNGs) is accepted when its values fit 16 bits. Modes outside :data:`SUPPORTED_MODES` (``F``
    among them) and anything but a regular file are refused before decoding.

    Raises:
        OSError: When the file is not a regular file, cannot be decoded, has an unsupported mode, or holds 32-bit
            integer values beyond 16 bits.
    """
    return to_rgb(open_image(path), path)


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """Decodes an opened image (``Image.open``, possibly ``draft``-ed) into 8-bit RGB as :func:`load_rgb` does."""
    check_image_mode(image.mode, path)
    orientation = exif_orientation(image)  # before load(), from the header as at setup
    image.load()
    if orientation != 1:  # boxes are in the displayed image's pixels (README "Image files")
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA"):  # via RGBA: PIL warns when it drops a palette's transparency directly
        return image.convert("RGBA").convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise OSError(
                f"{path}: 32-bit integer image with values {pixels.min()}..{pixels.max()}, beyond 16 bits; convert "
                "it to an 8-bit or 16-bit image"
            )
        grey = ((pixels * 255 + 32767) // 65535).astype(np.uint8)  # rounded 65535 -> 255 scaling
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


# --- reduced decoding -----------------------------------------------------------------------------------------------


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
    image = open_image(path)
    width, height = image.size  # as stored; expected_size is the displayed (oriented) size
    applied = 1
    if (
        reduction > 1
        and image.format == "JPEG"
        and (expected_size is None or tuple(expected_size) == oriented_size(image))
    ):
        image.draft("RGB", (width // reduction, height // reduction))
        if image.size == (math.ceil(width / reduction), math.ceil(height / reduction)):
            applied = reduction
        elif image.size != (width, height):  # draft picked another scale: never expected; decode whole to be safe
            image = open_image(path)
    return to_rgb(image, path), applied
