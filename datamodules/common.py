"""What the image datamodules share: person tables, image checks, box clipping, the default transform, the dataset.

Every reader (EMOTIC, CAER-S, a user's table) turns its annotations into a :class:`PersonTable` (one row per
annotated person: image path, box, target, extras). :func:`scan_images` checks the images once at setup (exists,
header readable) and clips each box to the image's decoded size; :class:`PersonImageDataset` then decodes with PIL
and applies a :class:`ContextTransform`, producing the suite's batch schema (``docs/design.md``):

- ``subject`` float32 (3, Hs, Ws): the box resized to ``subject_size``.
- ``context`` float32 (3, Hc, Wc): the whole image resized to ``context_size``, normalised, with the box filled
  with zeros (after normalisation, so the box holds the mean colour, as in the synthetic data).
- ``target``: int64 scalar (multiclass) or float32 (C,) multi-hot (multilabel).
- ``index`` int64: position in the split; ``box`` float32 (4,): x1, y1, x2, y2 in original image pixels, after
  clipping (and after a horizontal flip, when the sample was flipped).
- extras, e.g. ``vad`` float32 (3,) for EMOTIC.

Box rules (one place, shared by all datasets): boxes are clipped to ``[0, width] x [0, height]`` of the decoded
image (stored sizes are not trusted). A box that has less than one pixel of width or height after clipping
(reversed, empty or entirely outside the image) is *degenerate*: the subject is then not localised, so the
subject crop is the whole image and nothing is masked in the context (masking the whole image would leave no
context); ``box`` reports the whole image. Degenerate boxes are counted and reported per split.

Bad input: a missing, unreadable or malformed item is an error naming the file and row (``on_bad_sample="error"``,
the default) or, with ``on_bad_sample="skip"``, is left out, counted, and reported once per split in a warning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from ccim_lightning.datamodules.synthetic import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

OnBadSample = Literal["error", "skip"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
SKIP_HINT = "pass on_bad_sample='skip' to leave such samples out (they are counted and reported)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class AnnotationError(ValueError):
    """An annotation file or one of its rows is not in the expected format."""


# --- accounting ----------------------------------------------------------------------------------------------------
class BadSamples:
    """Counts what one split's build skipped, left out or repaired, and reports it once.

    Args:
        dataset: Dataset name for messages (``"EMOTIC"``).
        split: Split name for messages.
        on_bad_sample: ``"error"``: :meth:`bad` raises; ``"skip"``: it counts.
    """

    def __init__(self, dataset: str, split: str, on_bad_sample: OnBadSample = "error") -> None:
        check_on_bad_sample(on_bad_sample)
        self.dataset = dataset
        self.split = split
        self.on_bad_sample = on_bad_sample
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.reported = False

    def bad(self, reason: str, message: str, error: type[Exception] = AnnotationError) -> None:
        """A bad sample: raises ``error(message)`` in ``"error"`` mode, else counts it as skipped."""
        if self.on_bad_sample == "error":
            raise error(f"{self.dataset} {self.split}: {message}; {SKIP_HINT}")
        self.note(f"skipped ({reason})", message)

    def note(self, key: str, message: str) -> None:
        """Counts something that is not an error (an image left out by design, a repaired box)."""
        self.counts[key] += 1
        examples = self.examples.setdefault(key, [])
        if len(examples) < 3:
            examples.append(message)

    def merge(self, other: BadSamples) -> None:
        """Adds the counts and examples of ``other`` (e.g. from a file read once for all splits)."""
        for key, count in other.counts.items():
            self.counts[key] += count
            examples = self.examples.setdefault(key, [])
            examples.extend(other.examples[key][: 3 - len(examples)])

    def report(self, kept: int) -> dict[str, int]:
        """Logs one warning summarising the counts (once), and returns them."""
        if self.counts and not self.reported:
            parts = [f"{n} {key} (e.g. {'; '.join(self.examples[key])})" for key, n in sorted(self.counts.items())]
            log.warning("%s %s: %d samples kept; %s", self.dataset, self.split, kept, "; ".join(parts))
        self.reported = True
        return dict(self.counts)


def check_on_bad_sample(on_bad_sample: str) -> None:
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")


# --- person tables -------------------------------------------------------------------------------------------------
@dataclass
class PersonTable:
    """One row per annotated person.

    Attributes:
        paths: Image paths relative to the image root (``/`` separators).
        boxes: (N, 4) float64 x1, y1, x2, y2 in image pixels; a row of NaN means no box (subject not localised).
        targets: (N,) int64 class indices or (N, C) float32 multi-hot.
        sources: Where each row came from (``"train.csv line 5"``), for messages.
        extras: Per-person float32 arrays (N, k) added to each sample under their key (e.g. ``vad``).
        rows: (N,) int64 position of each row in its annotation source (e.g. to index ``*_arr.npy``).
        sizes: (N, 2) int64 decoded image width and height, set by :func:`scan_images`.
        localised: (N,) bool, False where the subject has no usable box, set by :func:`scan_images`.
    """

    paths: list[str]
    boxes: np.ndarray
    targets: np.ndarray
    sources: list[str]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    rows: np.ndarray | None = None
    sizes: np.ndarray | None = None
    localised: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: Sequence[int] | np.ndarray) -> PersonTable:
        """The rows ``keep`` (indices or a boolean mask), in that order."""
        keep = np.asarray(keep)
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)

        def take(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[keep]

        return replace(
            self,
            paths=[self.paths[i] for i in keep],
            boxes=self.boxes[keep],
            targets=self.targets[keep],
            sources=[self.sources[i] for i in keep],
            extras={key: value[keep] for key, value in self.extras.items()},
            rows=take(self.rows),
            sizes=take(self.sizes),
            localised=take(self.localised),
        )

    def identities(self) -> list[str]:
        """One stable string per row: image path and box (for the dictionary cache fingerprint)."""
        return [f"{path}|{','.join(f'{v:g}' for v in box)}" for path, box in zip(self.paths, self.boxes)]


def make_table(
    paths: list[str],
    boxes: Sequence[Sequence[float]],
    targets: Sequence,
    sources: list[str],
    extras: dict[str, Sequence] | None = None,
    rows: Sequence[int] | None = None,
    multilabel: bool = False,
    num_classes: int | None = None,
) -> PersonTable:
    """Builds a :class:`PersonTable` from Python lists (targets as class indices, or multi-hot rows)."""
    n = len(paths)
    if multilabel:
        target_array = np.asarray(targets, dtype=np.float32).reshape(n, num_classes or -1)
    else:
        target_array = np.asarray(targets, dtype=np.int64).reshape(n)
    return PersonTable(
        paths=paths,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(n, 4),
        targets=target_array,
        sources=sources,
        extras={key: np.asarray(value, dtype=np.float32).reshape(n, -1) for key, value in (extras or {}).items()},
        rows=None if rows is None else np.asarray(rows, dtype=np.int64),
    )


# --- images and boxes ----------------------------------------------------------------------------------------------
def _read_size(path: Path) -> tuple[int, int] | BaseException:
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # noqa: BLE001 - reported per file by the caller
        return error


def clip_boxes(boxes: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clips boxes to their images and applies the degenerate-box rule (module docstring).

    Args:
        boxes: (N, 4) x1, y1, x2, y2; NaN rows mean no box.
        sizes: (N, 2) image width and height.

    Returns:
        ``(boxes, localised)``: clipped boxes, the whole image where the subject is not localised; and the
        (N,) bool mask of localised subjects.
    """
    width, height = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)
    x = np.clip(boxes[:, 0::2], 0.0, width)
    y = np.clip(boxes[:, 1::2], 0.0, height)
    with np.errstate(invalid="ignore"):
        localised = ((x[:, 1] - x[:, 0]) >= 1.0) & ((y[:, 1] - y[:, 0]) >= 1.0)
    clipped = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    whole = np.concatenate([np.zeros_like(width), np.zeros_like(height), width, height], axis=1)
    return np.where(localised[:, None], clipped, whole), localised


def scan_images(root: Path, table: PersonTable, bad: BadSamples, threads: int = 8) -> PersonTable:
    """Checks every image once (exists, header readable), records decoded sizes and clips the boxes.

    Missing or unreadable images are bad samples (error or skipped, see :class:`BadSamples`); degenerate boxes
    fall back to the whole image and are counted (module docstring).

    Args:
        root: Folder the table's paths are relative to.
        table: The split's persons.
        bad: The split's accounting.
        threads: Threads reading image headers.

    Returns:
        The rows whose images are usable, with ``sizes`` and ``localised`` set and boxes clipped.
    """
    unique = list(dict.fromkeys(table.paths))
    with ThreadPoolExecutor(max(1, min(threads, len(unique)))) as pool:
        results = dict(zip(unique, pool.map(lambda p: _read_size(root / p), unique)))
    keep, sizes = [], []
    for i, path in enumerate(table.paths):
        result = results[path]
        if isinstance(result, FileNotFoundError):
            bad.bad("missing image", f"{table.sources[i]}: image {root / path} does not exist", FileNotFoundError)
        elif isinstance(result, BaseException):
            bad.bad("unreadable image", f"{table.sources[i]}: cannot read image {root / path}: {result}", OSError)
        else:
            keep.append(i)
            sizes.append(result)
    kept = table.subset(keep)
    kept.sizes = np.asarray(sizes, dtype=np.int64).reshape(len(keep), 2)
    return apply_box_rule(kept, bad)


def apply_box_rule(table: PersonTable, bad: BadSamples) -> PersonTable:
    """Clips ``table.boxes`` to ``table.sizes`` in place, sets ``localised`` and counts degenerate boxes."""
    has_box = ~np.isnan(table.boxes).any(axis=1)
    original = table.boxes
    table.boxes, table.localised = clip_boxes(table.boxes, table.sizes)
    for i in np.flatnonzero(has_box & ~table.localised):
        width, height = table.sizes[i]
        bad.note(
            "degenerate boxes (subject = whole image, context not masked)",
            f"{table.sources[i]}: box {original[i].tolist()} in a {width}x{height} image",
        )
    return table


def load_rgb(path: Path) -> Image.Image:
    """Decodes an image with PIL into RGB."""
    image = Image.open(path)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


# --- transform -----------------------------------------------------------------------------------------------------
def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be positive (an int or (height, width)), got {size}")
    return int(height), int(width)


class ContextTransform:
    """The default sample transform: resize, normalise and (optionally) flip the subject crop and the context.

    Called as ``transform(image, box, subject=None)`` with a PIL RGB ``image``, the clipped ``box`` (x1, y1, x2, y2)
    in its pixels or ``None`` (subject not localised: the whole image) and optionally a ready-made ``subject``
    image (e.g. a pre-cut body array). Returns a dict with ``subject`` (3, Hs, Ws) and ``context`` (3, Hc, Wc)
    float32 tensors, ``box``: the box in ``image`` pixels after any flip, and ``mask_box``: the integer region of
    ``context`` covering the box (outward-rounded, so the whole subject is covered; ``None`` when not localised).
    Masking is left to the dataset, so one transform serves masked and unmasked loaders. A replacement transform
    must follow the same contract.

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
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        reducing_gap: float | None = None,
    ) -> None:
        self.context_size = _pair(context_size, "context_size")
        self.subject_size = _pair(subject_size, "subject_size")
        self.flip = flip
        self.reducing_gap = reducing_gap
        # (x / 255 - mean) / std as one multiply-add per pixel on the uint8 values
        self._scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32)[:, None, None]
        self._bias = np.array([-m / s for m, s in zip(mean, std)], dtype=np.float32)[:, None, None]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(context_size={self.context_size}, subject_size={self.subject_size}, "
            f"flip={self.flip})"
        )

    def _resize(self, image: Image.Image, size: tuple[int, int], box: Sequence[float] | None = None) -> Image.Image:
        height, width = size
        if box is not None and all(float(v).is_integer() for v in box):
            image, box = image.crop(tuple(int(v) for v in box)), None  # cropping first is faster for pixel boxes
        if box is None and image.size == (width, height):
            return image
        return image.resize((width, height), Image.Resampling.BILINEAR, box=box, reducing_gap=self.reducing_gap)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        # numpy, not torch: torch's intra-op threads make these small per-sample ops many times slower in a busy
        # main process (num_workers=0); numpy runs them single-threaded.
        pixels = np.asarray(image)
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        np.multiply(pixels.transpose(2, 0, 1), self._scale, out=out)
        out += self._bias
        return torch.from_numpy(out)

    def __call__(
        self, image: Image.Image, box: Sequence[float] | None, subject: Image.Image | None = None
    ) -> dict[str, Any]:
        width, height = image.size
        context_h, context_w = self.context_size
        if subject is None:
            subject = self._resize(image, self.subject_size, (0, 0, width, height) if box is None else tuple(box))
        else:
            subject = self._resize(subject, self.subject_size)
        context = self._resize(image, self.context_size)
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
        return {
            "subject": self._to_tensor(subject),
            "context": self._to_tensor(context),
            "box": out_box,
            "mask_box": mask_box,
        }


# --- dataset -------------------------------------------------------------------------------------------------------
def collate_skipping_none(samples: list[dict | None]) -> dict[str, torch.Tensor]:
    """``default_collate`` without the samples a ``skip``-mode dataset could not decode (returned as ``None``)."""
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        raise RuntimeError(
            f"All {len(samples)} samples of a batch failed to decode (see the warnings naming the files); "
            "check the image files or remove them from the annotations."
        )
    return default_collate(kept)


def sample_dict(output: dict[str, Any], table: PersonTable, index: int, mask_subject: bool) -> dict[str, torch.Tensor]:
    """Assembles one sample of the batch schema from a transform output (masking the context if asked)."""
    context = output["context"]
    mask_box = output["mask_box"]
    if mask_subject and mask_box is not None:
        x1, y1, x2, y2 = mask_box
        context.numpy()[:, y1:y2, x1:x2] = 0.0  # in numpy for the reason given in ContextTransform._to_tensor
    target = table.targets[index]
    sample = {
        "subject": output["subject"],
        "context": context,
        "target": torch.tensor(target, dtype=torch.float32 if target.ndim else torch.int64),
        "index": torch.tensor(index, dtype=torch.int64),
        "box": torch.tensor(output["box"], dtype=torch.float32),
    }
    for key, values in table.extras.items():
        sample[key] = torch.from_numpy(values[index].copy())
    return sample


class PersonImageDataset(Dataset):
    """A split of persons in images, decoded with PIL, in the suite's batch schema (module docstring).

    Args:
        root: Folder the table's image paths are relative to.
        table: The split, after :func:`scan_images`.
        transform: ``transform(image, box) -> dict`` (:class:`ContextTransform` contract).
        mask_subject: Fill the subject box of ``context`` with zeros.
        on_bad_sample: What to do when an image that passed the setup check fails to decode: ``"error"`` raises,
            ``"skip"`` warns once per file and returns ``None``, which :attr:`collate_fn` drops from the batch.
        name: ``"<dataset> <split>"``, for messages.
    """

    collate_fn = staticmethod(collate_skipping_none)

    def __init__(
        self,
        root: Path,
        table: PersonTable,
        transform: Callable[..., dict[str, Any]],
        mask_subject: bool = True,
        on_bad_sample: OnBadSample = "error",
        name: str = "",
    ) -> None:
        check_on_bad_sample(on_bad_sample)
        if table.localised is None:
            raise ValueError("PersonImageDataset needs a table checked by scan_images (sizes and clipped boxes)")
        self.root = Path(root)
        self.table = table
        self.transform = transform
        self.mask_subject = mask_subject
        self.on_bad_sample = on_bad_sample
        self.name = name
        self._failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.table)

    def sample_identities(self) -> list[str]:
        """One stable string per sample (image path relative to the root, and box)."""
        return self.table.identities()

    def sample_table(self) -> pd.DataFrame:
        """One row per sample in index order: image path (relative to the root) and box, for prediction files."""
        boxes = np.asarray(self.table.boxes, dtype=np.float64).reshape(-1, 4)
        return pd.DataFrame(
            {"image": self.table.paths, "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3]}
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        table = self.table
        path = self.root / table.paths[index]
        try:
            image = load_rgb(path)
        except Exception as error:
            message = f"{self.name}: cannot decode image {path} ({table.sources[index]}, sample {index}): {error}"
            if self.on_bad_sample == "error":
                raise OSError(f"{message}; {SKIP_HINT}") from error
            if table.paths[index] not in self._failed:
                self._failed.add(table.paths[index])
                log.warning("%s; skipped (on_bad_sample='skip')", message)
            return None
        box = table.boxes[index]
        if table.localised[index]:
            width, height = image.size
            if (width, height) != tuple(table.sizes[index]):  # the file changed since setup: clip again
                clipped, ok = clip_boxes(box[None], np.array([[width, height]]))
                box = clipped[0] if ok[0] else None
        else:
            box = None
        return sample_dict(self.transform(image, box), table, index, self.mask_subject)


# --- hold-out ------------------------------------------------------------------------------------------------------
def stratified_holdout(
    identities: Sequence[str], strata: Sequence[Any], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits rows into (train, val) indices: ``fraction * n`` (rounded half up) of each stratum to val.

    Within a stratum, rows are ranked by a hash of ``(seed, identity)``, so the choice depends on neither the
    order of the rows nor the other strata, and a row keeps its side when files are added or removed elsewhere.
    A stratum keeps at least one row in train.

    Args:
        identities: One stable string per row (e.g. the image path).
        strata: One stratum key per row (e.g. the label).
        fraction: Share of each stratum held out, in (0, 1).
        seed: Changes the choice.

    Returns:
        Sorted train indices and sorted val indices.

    Raises:
        ValueError: When no row is held out (all strata too small for ``fraction``).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    groups: dict[Any, list[int]] = {}
    for i, stratum in enumerate(strata):
        groups.setdefault(stratum, []).append(i)
    val: list[int] = []
    for members in groups.values():
        count = min(math.floor(fraction * len(members) + 0.5), len(members) - 1)
        ranked = sorted(members, key=lambda i: hashlib.blake2b(f"{seed}:{identities[i]}".encode()).digest())
        val.extend(ranked[:count])
    if not val:
        sizes = sorted(len(members) for members in groups.values())
        raise ValueError(
            f"val_fraction={fraction} holds out no row: each class (stratum) is too small (sizes {sizes}); raise "
            "val_fraction or give validation rows"
        )
    val_mask = np.zeros(len(identities), dtype=bool)
    val_mask[val] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


# --- datamodule base -----------------------------------------------------------------------------------------------
class PersonDataModule(L.LightningDataModule):
    """Base of the image datamodules: lazy, checked splits and the loaders; subclasses read the annotations.

    Subclasses set ``dataset_name``, ``num_classes``, ``class_names`` and ``task`` in ``__init__`` (no disk access
    there, so configs instantiate without the data) and implement :meth:`build_split`.

    Args:
        root: Dataset root folder.
        context_size: Context image size, an int or (height, width).
        subject_size: Subject crop size, an int or (height, width).
        flip: Random horizontal flips of training samples.
        batch_size: Batch size of every loader.
        num_workers: Loader worker processes.
        on_bad_sample: ``"error"`` or ``"skip"`` (module docstring).
        train_transform: Replaces the default training transform (:class:`ContextTransform` contract).
        eval_transform: Replaces the default evaluation transform (also used for the dictionary).
    """

    dataset_name = "dataset"

    def __init__(
        self,
        root: str | os.PathLike,
        context_size: int | tuple[int, int] = 224,
        subject_size: int | tuple[int, int] = 128,
        flip: bool = True,
        batch_size: int = 32,
        num_workers: int = 4,
        on_bad_sample: OnBadSample = "error",
        train_transform: Callable[..., dict[str, Any]] | None = None,
        eval_transform: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        check_on_bad_sample(on_bad_sample)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample
        self.train_transform = train_transform or ContextTransform(context_size, subject_size, flip=flip)
        self.eval_transform = eval_transform or ContextTransform(context_size, subject_size, flip=False)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.dropped: dict[str, dict[str, int]] = {}
        """Per split: what was skipped, left out or repaired, by reason (also logged once per split)."""
        self._tables: dict[str, PersonTable] = {}

    # --- subclass points -------------------------------------------------------------------------------------------
    def build_split(self, split: str, bad: BadSamples) -> PersonTable:
        """Reads split ``split`` of the annotations and checks its images (see :func:`scan_images`)."""
        raise NotImplementedError

    def make_dataset(self, split: str, transform: Callable, mask_subject: bool) -> Dataset:
        """The dataset of a split (default: images decoded from ``root``)."""
        return PersonImageDataset(
            self.image_root,
            self.table(split),
            transform,
            mask_subject,
            self.on_bad_sample,
            f"{self.dataset_name} {split}",
        )

    @property
    def image_root(self) -> Path:
        """The folder the tables' image paths are relative to."""
        return self.root

    # --- splits ----------------------------------------------------------------------------------------------------
    def check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.dataset_name} root {self.root} does not exist or is not a folder; pass the dataset folder "
                "as root (--data.init_args.root /path/to/data)"
            )

    def table(self, split: str) -> PersonTable:
        """The checked persons of ``split`` (built on first use, then cached)."""
        if split not in self._tables:
            self.check_root()
            bad = BadSamples(self.dataset_name, split, self.on_bad_sample)
            table = self.build_split(split, bad)
            self.dropped[split] = bad.report(len(table))
            if len(table) == 0:
                raise ValueError(f"{self.dataset_name} {split}: no usable samples under {self.root}")
            self._tables[split] = table
        return self._tables[split]

    def setup(self, stage: str | None = None) -> None:
        """Reads and checks the splits the stage needs (``fit``: train and val; ``test``/``predict``: test)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.make_dataset("train", self.train_transform, True)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self.make_dataset("val", self.eval_transform, True)
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self.make_dataset("test", self.eval_transform, True)

    # --- loaders ---------------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset | None, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_skipping_none,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        """The test split."""
        return self._loader(self.test_dataset)

    def dictionary_dataset(self, mask_subject: bool = True) -> Dataset:
        """The training split in its fixed order, with the evaluation transform, for the confounder dictionary.

        Args:
            mask_subject: Fill the subject box of ``context`` with zeros (the paper's setting); ``False`` gives
                the "without masking" ablation.
        """
        return self.make_dataset("train", self.eval_transform, mask_subject)

    def dictionary_dataloader(self, batch_size: int | None = None, mask_subject: bool = True) -> DataLoader:
        """A non-shuffled loader over ``dictionary_dataset(mask_subject)``.

        Args:
            batch_size: Defaults to the datamodule's batch size.
            mask_subject: See ``dictionary_dataset``.
        """
        return self._loader(self.dictionary_dataset(mask_subject), batch_size=batch_size)
