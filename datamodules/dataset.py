"""The dataset of the image datamodules: persons decoded from image files into the batch schema.

``PersonImageDataset`` decodes with PIL (:func:`~ccim_lightning.datamodules.common.load_rgb`) and applies a
``ContextTransform``-style transform; :func:`sample_dict` assembles a sample of the schema
(``ccim_lightning.datamodules.schema``) and masks the subject box in ``context``.

Decode-time skips: an image that passed the setup check but fails to decode in ``__getitem__`` (``"skip"`` mode)
is flagged in a shared-memory tensor, one byte per sample, that the datamodule created before any worker started;
the worker processes write into the same memory, so the main process sees every skip, counted once per sample
however many epochs meet it (``PersonDataModule.dropped``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from ccim_lightning.datamodules.common import (
    SKIP_HINT,
    OnBadSample,
    PersonTable,
    check_on_bad_sample,
    clip_boxes,
    load_rgb,
)

log = logging.getLogger(__name__)

MASK_FILL = 0.0
"""Value written into the subject box of ``context``, after normalisation (so the box holds the mean colour)."""
DECODER = "pil-rgb-v2"
"""Names how image files become pixels (v2: 16-bit greyscale scaled, not clipped); part of the dictionary signature."""


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
        context.numpy()[:, y1:y2, x1:x2] = MASK_FILL  # numpy: see ContextTransform._to_tensor
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
    ) -> None:
        check_on_bad_sample(on_bad_sample)
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
        try:
            image = load_rgb(path)
        except Exception as error:
            message = f"{self.name}: cannot decode image {path} ({table.sources[index]}, sample {index}): {error}"
            if self.on_bad_sample == "error":
                raise OSError(f"{message}; {SKIP_HINT}") from error
            self.failures[index] = 1
            if table.paths[index] not in self._warned:
                self._warned.add(table.paths[index])
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
