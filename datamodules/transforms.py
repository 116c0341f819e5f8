"""The default sample transform of the image datamodules (:class:`ContextTransform`)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ccim_lightning.arguments import check_floats, check_int, check_optional_float
from ccim_lightning.datamodules.decode import context_reduction, person_reductions
from ccim_lightning.types import BOX, CONTEXT, MASK_BOX, SUBJECT


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if not isinstance(size, Sequence) or isinstance(size, str):
        side = check_int("ContextTransform", f"{name} (an int or (height, width))", size, 1)
        return side, side
    if len(size) != 2:
        raise ValueError(f"ContextTransform: {name} must be an int or (height, width), got {size!r}")
    height, width = (check_int("ContextTransform", f"{name}[{i}]", side, 1) for i, side in enumerate(size))
    return height, width


def _to_uint8(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8, the PIL pixels as they are (one copy; the channel move happens on the device)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


class ContextTransform:
    """The default sample transform: resize, normalise and (optionally) flip the subject crop and the context.

    Called as ``transform(image, box, subject=None)`` with a PIL RGB ``image``, the clipped ``box`` (x1, y1, x2, y2)
    in its pixels or ``None`` (subject not localised: the whole image) and optionally a ready-made ``subject``
    image (e.g. a pre-cut body array). Returns a dict with ``subject`` (3, Hs, Ws) and ``context`` (3, Hc, Wc)
    float32 tensors, ``box``: the box in ``image`` pixels after any flip, and ``mask_box``: the integer region of
    ``context`` covering the box (outward-rounded, so the whole subject is covered; ``None`` when not localised).

    Two keyword extensions, used by ``PersonImageDataset`` only when a transform has :meth:`decode_reductions`
    (a replacement transform without it keeps the plain contract and gets full decodes and float outputs):
    ``reduction=r, full_size=(W, H)``: ``image`` was decoded at ``1 / r`` of a ``W x H`` file (``box``, the returned
    ``box`` and ``mask_box`` stay in full-resolution terms; see ``ccim_lightning.datamodules.decode``);
    ``reduce_context=True``: the context is made from the image box-reduced to ``1 / decode.context_reduction``
    (never below the context size) where the decode itself was not reduced that far;
    ``uint8=True``: ``subject`` and ``context`` come back as resized, unnormalised (H, W, 3) uint8 tensors, for
    normalisation on the device (``ccim_lightning.datamodules.dataset.normalize_batch``). The resized context of
    the last ``image`` object is kept, so persons of one image decoded once also share its context resize.
    Masking is left to the dataset, so one transform serves masked and unmasked loaders. A replacement transform
    must follow the same contract, and should have a ``signature()`` method like this one's (a JSON-able dict of
    what changes its output), which the confounder dictionary's cache key includes.

    Args:
        context_size: Context output size, an int or (height, width).
        subject_size: Subject output size, an int or (height, width).
        flip: Flip subject, context and box horizontally with probability 0.5 (Python's ``random``, which the
            DataLoader seeds per worker and ``seed_everything`` seeds).
        mean: Per-channel mean on the [0, 1] scale (default ImageNet).
        std: Per-channel standard deviation on the [0, 1] scale (default ImageNet).
        reducing_gap: PIL ``resize`` ``reducing_gap``: a faster, slightly less exact downscale (None = exact).
    """

    def __init__(
        self,
        context_size: int | tuple[int, int] = 224,
        subject_size: int | tuple[int, int] = 128,
        flip: bool = False,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        reducing_gap: float | None = None,
    ) -> None:
        self.context_size = _pair(context_size, "context_size")
        self.subject_size = _pair(subject_size, "subject_size")
        self.flip = flip
        check_optional_float("ContextTransform", "reducing_gap", reducing_gap, 1.0)
        self.reducing_gap = reducing_gap  # as given: it is part of the dictionary signature
        self.mean = check_floats("ContextTransform", "mean", mean)
        self.std = check_floats("ContextTransform", "std", std, 0.0, low_open=True)
        # (x / 255 - mean) / std as one multiply-add per pixel on the uint8 values
        self._scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32)[:, None, None]
        self._bias = np.array([-m / s for m, s in zip(mean, std)], dtype=np.float32)[:, None, None]
        self._context_cache: tuple[Image.Image, Any, Image.Image] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_context_cache": None}  # images are never pickled into workers

    def decode_reductions(self, sizes: np.ndarray, boxes: np.ndarray, localised: np.ndarray) -> np.ndarray:
        """Per person, the largest JPEG reduction both outputs allow (``decode.person_reductions``)."""
        return person_reductions(sizes, boxes, localised, self.context_size, self.subject_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(context_size={self.context_size}, subject_size={self.subject_size}, "
            f"flip={self.flip})"
        )

    def signature(self) -> dict[str, Any]:
        """Everything about this transform that changes the ``context`` pixels (for the dictionary cache key)."""
        return {
            "transform": "ContextTransform",
            "context_size": list(self.context_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": "bilinear",
            "reducing_gap": self.reducing_gap,
            "flip": self.flip,
        }

    def _resize(self, image: Image.Image, size: tuple[int, int], box: Sequence[float] | None = None) -> Image.Image:
        height, width = size
        if box is not None and all(float(v).is_integer() for v in box):
            image, box = image.crop(tuple(int(v) for v in box)), None  # cropping first is faster for pixel boxes
        if box is None and image.size == (width, height):
            return image
        return image.resize((width, height), Image.Resampling.BILINEAR, box=box, reducing_gap=self.reducing_gap)

    def _context(self, image: Image.Image, full_size: tuple[int, int], reduction: int, reduce: bool) -> Image.Image:
        """The resized context of ``image`` (decoded at ``1 / reduction`` of ``full_size``).

        With ``reduce``, the image is first box-reduced (PIL ``reduce``) to ``1 / context_reduction`` of its full
        size, never below the context size: the rest of the way the subject did not let the JPEG decode go.
        """
        extra = max(context_reduction(full_size, self.context_size) // reduction, 1) if reduce else 1
        key = (full_size, reduction, extra)
        cached = self._context_cache
        if cached is not None and cached[0] is image and cached[1] == key:  # the same decode: the same resize
            return cached[2]
        source, total = (image.reduce(extra), reduction * extra) if extra > 1 else (image, reduction)
        # the full image in ``source`` pixels (it may end inside the last pixel); None = all of it as it is
        width, height = full_size
        region = None if total == 1 else (0.0, 0.0, width / total, height / total)
        if region is not None and region[2:] == source.size:
            region = None
        context = self._resize(source, self.context_size, region)
        self._context_cache = (image, key, context)
        return context

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        # numpy, not torch: torch's intra-op threads make these small per-sample ops many times slower in a busy
        # main process (num_workers=0); numpy runs them single-threaded.
        pixels = np.asarray(image)
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        np.multiply(pixels.transpose(2, 0, 1), self._scale, out=out)
        out += self._bias
        return torch.from_numpy(out)

    def __call__(
        self,
        image: Image.Image,
        box: Sequence[float] | None,
        subject: Image.Image | None = None,
        *,
        reduction: int = 1,
        full_size: tuple[int, int] | None = None,
        uint8: bool = False,
        reduce_context: bool = False,
    ) -> dict[str, Any]:
        width, height = image.size if full_size is None else full_size
        context_h, context_w = self.context_size
        if subject is None:
            crop = (0, 0, width, height) if box is None else tuple(box)
            if reduction != 1:
                crop = tuple(float(v) / reduction for v in crop)
            subject = self._resize(image, self.subject_size, crop)
        else:
            subject = self._resize(subject, self.subject_size)
        context = self._context(image, (width, height), reduction, reduce_context)
        flip = self.flip and random.random() < 0.5
        if flip:
            context = context.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            subject = subject.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if box is None:
            out_box, mask_box = (0.0, 0.0, float(width), float(height)), None
        else:
            x1, y1, x2, y2 = (float(v) for v in box)
            out_box = (x1, y1, x2, y2)
            sx, sy = context_w / width, context_h / height
            mask_box = (
                max(math.floor(x1 * sx), 0),
                max(math.floor(y1 * sy), 0),
                min(math.ceil(x2 * sx), context_w),
                min(math.ceil(y2 * sy), context_h),
            )
        if flip:
            x1, y1, x2, y2 = out_box
            out_box = (width - x2, y1, width - x1, y2)
            if mask_box is not None:
                mask_box = (context_w - mask_box[2], mask_box[1], context_w - mask_box[0], mask_box[3])
        convert = _to_uint8 if uint8 else self._to_tensor
        return {
            SUBJECT: convert(subject),
            CONTEXT: convert(context),
            BOX: out_box,
            MASK_BOX: mask_box,
        }
