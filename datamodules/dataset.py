"""The dataset of the image datamodules: persons decoded from image files into the batch schema.

``PersonImageDataset`` decodes with PIL (:func:`~ccim_lightning.datamodules.decode.load_rgb`; JPEGs at reduced
size where the outputs allow it, ``ccim_lightning.datamodules.decode``) and applies a ``ContextTransform``-style
transform; :func:`sample_dict` assembles a sample of the schema (``ccim_lightning.types``) and masks
the subject box in ``context``.

Two output paths, equal within float rounding (tested):

- ``output="float"`` (the default, what iterating a dataset directly gives, and the dictionary's path): the worker
  normalises ``subject`` and ``context`` to float32 (3, H, W) and masks the subject box in ``context``.
- ``output="uint8"`` (what the datamodules' loaders use inside a Lightning run): the worker hands over the resized
  (H, W, 3) uint8 pixels and the ``mask_box`` (x1, y1, x2, y2 in context pixels; empty when nothing is masked), a
  quarter of the bytes, and :func:`normalize_batch` normalises, masks and drops ``mask_box`` on the device
  (``PersonDataModule.on_after_batch_transfer``), giving the float batch schema.

One decode serves several persons of one image: each worker keeps its last decoded image (and the transform its
last context resize), keyed by path and reduction; :class:`ImageGroupedSampler` puts the persons of an image next
to each other in the shuffled training order so that they meet it.

Decode-time skips: an image that passed the setup check but fails to decode in ``__getitem__`` (``"skip"`` mode)
is flagged in a shared-memory tensor, one byte per sample, that the datamodule created before any worker started;
the worker processes write into the same memory, so the main process sees every skip, counted once per sample
however many epochs meet it (``PersonDataModule.dropped``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, default_collate

from ccim_lightning.datamodules.common import (
    SKIP_HINT,
    OnBadSample,
    PersonTable,
    check_on_bad_sample,
    clip_boxes,
)
from ccim_lightning.datamodules.decode import decode_reduced, image_reductions, load_rgb
from ccim_lightning.types import BOX, CONTEXT, INDEX, MASK_BOX, SUBJECT, TARGET, ReducingTransform

log = logging.getLogger(__name__)

MASK_FILL = 0.0
"""Value written into the subject box of ``context``, after normalisation (so the box holds the mean colour)."""
DECODER = "pil-rgb-v3"
"""Names how image files become pixels (v2: 16-bit greyscale scaled, not clipped; v3: EXIF orientation applied);
part of the dictionary signature."""


def empty_batch() -> dict[str, torch.Tensor]:
    """The batch of a loader step whose every sample failed to decode: only an empty ``index`` (0,).

    ``CCIMLightningModule``'s steps skip it in a DDP-safe way (every rank still runs the step's collectives), so one
    undecodable image at batch size 1 does not end the run; the files are named in the datamodule's summary.
    """
    return {INDEX: torch.zeros(0, dtype=torch.int64)}


def is_empty_batch(batch: Any) -> bool:
    """Whether ``batch`` has no samples (:func:`empty_batch`, or any batch dict with an empty ``index``)."""
    return isinstance(batch, Mapping) and isinstance(batch.get(INDEX), torch.Tensor) and batch[INDEX].numel() == 0


def collate_skipping_none(samples: list[dict | None]) -> dict[str, torch.Tensor]:
    """``default_collate`` without the samples a ``skip``-mode dataset could not decode (returned as ``None``).

    When none is left, the :func:`empty_batch` (skipped by the module's steps) rather than an error: the skips are
    counted and their files reported at the end of the run.
    """
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return empty_batch()
    return default_collate(kept)


def sample_dict(output: dict[str, Any], table: PersonTable, index: int, mask_subject: bool) -> dict[str, torch.Tensor]:
    """Assembles one sample of the batch schema from a transform output (masking the context if asked)."""
    context = output[CONTEXT]
    mask_box = output[MASK_BOX]
    if mask_subject and mask_box is not None:
        x1, y1, x2, y2 = mask_box
        context.numpy()[:, y1:y2, x1:x2] = MASK_FILL  # numpy: see ContextTransform._to_tensor
    target = table.targets[index]
    sample = {
        SUBJECT: output[SUBJECT],
        CONTEXT: context,
        TARGET: torch.tensor(target, dtype=torch.float32 if target.ndim else torch.int64),
        INDEX: torch.tensor(index, dtype=torch.int64),
        BOX: torch.tensor(output[BOX], dtype=torch.float32),
    }
    for key, values in table.extras.items():
        sample[key] = torch.from_numpy(values[index].copy())
    return sample


def uint8_sample_dict(
    output: dict[str, Any], table: PersonTable, index: int, mask_subject: bool
) -> dict[str, torch.Tensor]:
    """The ``output="uint8"`` sample: uint8 (H, W, 3) pixels and ``mask_box`` for :func:`normalize_batch`."""
    mask_box = output[MASK_BOX] if mask_subject and output[MASK_BOX] is not None else (0, 0, 0, 0)
    sample = sample_dict(output, table, index, mask_subject=False)
    sample[MASK_BOX] = torch.tensor(mask_box, dtype=torch.int64)
    return sample


def normalize_batch(batch: Any, mean: Sequence[float], std: Sequence[float], fill: float = MASK_FILL) -> Any:
    """Turns a batch of ``output="uint8"`` samples into the float batch schema, on whatever device it is on.

    ``subject`` and ``context`` (B, H, W, 3) uint8 become (B, 3, H, W) float32 ``(x / 255 - mean) / std`` (the
    same float32 multiply-add as ``ContextTransform``), the ``mask_box`` region of each ``context`` is filled with
    ``fill``, and ``mask_box`` is removed. Anything else (a float batch, a batch that is not a dict) is returned
    unchanged, so calling it twice, or on a float batch, is harmless.

    Args:
        batch: A collated batch.
        mean: Per-channel mean on the [0, 1] scale (the transform's).
        std: Per-channel standard deviation on the [0, 1] scale.
        fill: Masking value, after normalisation.
    """
    if not isinstance(batch, dict) or not isinstance(batch.get(CONTEXT), torch.Tensor):
        return batch
    if batch[CONTEXT].dtype != torch.uint8:
        return batch
    out = dict(batch)
    device = out[CONTEXT].device
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)[:, None, None]
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device)[:, None, None]
    for key in (SUBJECT, CONTEXT):
        pixels = out.get(key)
        if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8:
            if pixels.ndim != 4 or pixels.shape[-1] != 3:
                raise ValueError(f"normalize_batch: {key} is {tuple(pixels.shape)} uint8, expected (B, H, W, 3)")
            out[key] = pixels.permute(0, 3, 1, 2).contiguous().float().mul_(scale).add_(bias)
    mask_box = out.pop(MASK_BOX, None)
    if mask_box is not None:
        mask_boxes(out[CONTEXT], mask_box, fill)
    return out


def mask_boxes(context: torch.Tensor, boxes: torch.Tensor, fill: float, vectorised: bool | None = None) -> None:
    """Fills ``boxes`` (B, 4) x1, y1, x2, y2 (end-exclusive) of ``context`` (B, C, H, W) with ``fill``, in place.

    Args:
        context: The images.
        boxes: Integer boxes; an empty box masks nothing.
        fill: The value.
        vectorised: One masked fill over the batch (default on accelerators, where one kernel beats B small
            ones) or one slice per sample (default on the CPU, where only the boxes are touched).
    """
    device = context.device
    if vectorised is None:
        vectorised = device.type != "cpu"
    if not vectorised:
        for sample, (x1, y1, x2, y2) in zip(context, boxes.tolist()):
            sample[:, max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = fill
        return
    height, width = context.shape[-2:]
    box = boxes.to(device=device, dtype=torch.int64)
    cols = torch.arange(width, device=device)
    rows = torch.arange(height, device=device)
    inside_x = (cols >= box[:, 0:1]) & (cols < box[:, 2:3])
    inside_y = (rows >= box[:, 1:2]) & (rows < box[:, 3:4])
    context.masked_fill_((inside_y[:, :, None] & inside_x[:, None, :])[:, None], fill)


class ImageGroupedSampler(Sampler[int]):
    """A random order of the images, each image's persons next to each other (in table order).

    The training order of a ``shuffle=True`` loader, except that persons sharing an image come one after another,
    so one decode (and one context resize) serves them all. A new order each pass; without a ``generator`` it
    draws its seed from torch's global generator (``seed_everything`` seeds it), as ``RandomSampler`` does. The
    datamodules use it in one process only (under DDP ranks could draw different orders; Lightning's distributed
    sampler takes over there).

    Args:
        paths: One image path per sample.
        generator: Optional torch generator.
    """

    def __init__(self, paths: Sequence[str], generator: torch.Generator | None = None) -> None:
        groups: dict[str, list[int]] = {}
        for i, path in enumerate(paths):
            groups.setdefault(path, []).append(i)
        self.groups = list(groups.values())
        self.size = len(paths)
        self.generator = generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = self.generator
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        for group in torch.randperm(len(self.groups), generator=generator).tolist():
            yield from self.groups[group]


def file_stamp(path: Path) -> str:
    """``"<size>:<mtime_ns>"`` of a file (``"missing"`` when it does not exist): a cheap content signal."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def new_failure_flags(size: int) -> torch.Tensor:
    """One shared-memory byte per sample, set to 1 when the sample fails to decode (see the module docstring)."""
    return torch.zeros(size, dtype=torch.uint8).share_memory_()


def merge_failures_across_ranks(flags: torch.Tensor, device: torch.device | str = "cpu") -> int:
    """Sets in ``flags`` (in place) every sample that failed to decode on any rank; returns how many were new here.

    A collective under ``torch.distributed`` (every rank must call it, with the same split; a no-op without a process
    group): each rank decodes its own shard, so without it rank 0's count and summary miss the other ranks' skips.
    The flags are summed as int32 on ``device`` (the process group's: CUDA for NCCL), so any world size fits.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return 0
    merged = flags.to(device=device, dtype=torch.int32)
    dist.all_reduce(merged)
    merged = (merged > 0).to(device="cpu", dtype=torch.uint8)
    new = int((merged > flags).sum())
    flags.copy_(torch.maximum(flags, merged))
    return new


class PersonImageDataset(Dataset):
    """A split of persons in images, decoded with PIL, in the suite's batch schema.

    Args:
        root: Folder the table's image paths are relative to.
        table: The split, after :func:`~ccim_lightning.datamodules.common.scan_images`.
        transform: ``transform(image, box) -> dict`` (``ContextTransform`` contract).
        mask_subject: Fill the subject box of ``context`` with :data:`MASK_FILL`.
        on_bad_sample: What to do when an image that passed the setup check fails to decode: ``"error"`` raises,
            ``"skip"`` warns once per file, flags the sample in ``failures`` and returns ``None``, which
            :attr:`collate_fn` drops from the batch.
        name: ``"<dataset> <split>"``, for messages.
        failures: The split's shared decode-failure flags (:func:`new_failure_flags`); default: the dataset's own.
        reduced_decode: Decode JPEGs at the smallest size that still gives both outputs their size, and make the
            context from the image box-reduced to the smallest size that still gives the context its size
            (``decode`` module); needs a transform with ``decode_reductions`` (``ContextTransform``), else images
            are decoded whole. ``False`` gives exactly the full-resolution outputs.
        output: ``"float"`` (normalised, masked) or ``"uint8"`` (for :func:`normalize_batch`); see the module
            docstring. ``"uint8"`` needs a ``ContextTransform``-style transform (``uint8=True`` keyword).
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
        failures: torch.Tensor | None = None,
        reduced_decode: bool = True,
        output: str = "float",
    ) -> None:
        check_on_bad_sample(on_bad_sample)
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if table.localised is None:
            raise ValueError("PersonImageDataset needs a table checked by scan_images (sizes and clipped boxes)")
        if failures is not None and len(failures) != len(table):
            raise ValueError(f"failures has {len(failures)} flags for {len(table)} samples")
        self.root = Path(root)
        self.table = table
        self.transform = transform
        self.mask_subject = mask_subject
        self.on_bad_sample = on_bad_sample
        self.name = name
        self.failures = new_failure_flags(len(table)) if failures is None else failures
        self._warned: set[str] = set()
        self.output = output
        self.reduced_decode = reduced_decode
        self.reductions = np.ones(len(table), dtype=np.int64)
        self._extended = isinstance(transform, ReducingTransform)  # takes reduction=, full_size=, uint8=, ...
        if output == "uint8" and not self._extended:
            raise ValueError(f"output='uint8' needs a ContextTransform-style transform, got {transform!r}")
        if reduced_decode and self._extended:
            reductions = transform.decode_reductions(table.sizes, table.boxes, table.localised)
            self.reductions = image_reductions(table.paths, reductions)
        self._last: tuple[tuple[str, int], Any, int] | None = None  # (path, reduction), image, applied reduction

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_last": None}  # decoded images stay in their process

    def with_output(self, output: str) -> PersonImageDataset:
        """A copy of this dataset that gives ``output`` samples (same table, transform and failure flags)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__getstate__())
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if output == "uint8" and not self._extended:
            raise ValueError(f"output='uint8' needs a ContextTransform-style transform, got {self.transform!r}")
        copy.output = output
        copy._warned = set()
        return copy

    def __len__(self) -> int:
        return len(self.table)

    def sample_identities(self) -> list[str]:
        """One string per sample: image path (relative to the root), box, and the image file's size and mtime.

        Size and modification time (ns) are a cheap content signal: replacing or re-encoding an image changes
        them, so a dictionary cache built from the old pixels is not reused. What they cannot see: an edit that
        keeps both size and mtime (e.g. a tool that restores the mtime). A copy that does not keep mtimes
        (``cp`` without ``-p``) looks changed and only costs a rebuild.
        """
        stamps = {path: file_stamp(self.root / path) for path in dict.fromkeys(self.table.paths)}
        return [f"{identity}|{stamps[path]}" for identity, path in zip(self.table.identities(), self.table.paths)]

    def sample_table(self) -> pd.DataFrame:
        """One row per sample in index order: image path (relative to the root) and box, for prediction files."""
        boxes = np.asarray(self.table.boxes, dtype=np.float64).reshape(-1, 4)
        return pd.DataFrame(
            {"image": self.table.paths, "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3]}
        )

    def decode_failures(self) -> list[int]:
        """Indices of the samples that failed to decode so far (in any process)."""
        return torch.nonzero(self.failures).flatten().tolist()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        table = self.table
        path = self.root / table.paths[index]
        key = (table.paths[index], int(self.reductions[index]))
        try:
            if self._last is not None and self._last[0] == key:
                image, applied = self._last[1:]
            elif key[1] > 1:
                image, applied = decode_reduced(path, key[1], table.sizes[index])
            else:
                image, applied = load_rgb(path), 1
        except Exception as error:
            message = f"{self.name}: cannot decode image {path} ({table.sources[index]}, sample {index}): {error}"
            if self.on_bad_sample == "error":
                raise OSError(f"{message}; {SKIP_HINT}") from error
            self.failures[index] = 1
            if table.paths[index] not in self._warned:
                self._warned.add(table.paths[index])
                log.warning("%s; skipped (on_bad_sample='skip')", message)
            return None
        self._last = (key, image, applied)
        box = table.boxes[index]
        # decode_reduced only reduces a file of the recorded size, so a reduced image has the recorded full size
        full_size = tuple(int(v) for v in table.sizes[index]) if applied > 1 else image.size
        if table.localised[index]:
            width, height = full_size
            if (width, height) != tuple(table.sizes[index]):  # the file changed since setup: clip again
                clipped, ok = clip_boxes(box[None], np.array([[width, height]]))
                box = clipped[0] if ok[0] else None
        else:
            box = None
        if not self._extended:  # the plain transform contract
            return sample_dict(self.transform(image, box), table, index, self.mask_subject)
        uint8 = self.output == "uint8"
        output = self.transform(
            image, box, reduction=applied, full_size=full_size, uint8=uint8, reduce_context=self.reduced_decode
        )
        return (uint8_sample_dict if uint8 else sample_dict)(output, table, index, self.mask_subject)
