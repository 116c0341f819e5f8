"""Prepared data: each person decoded once into fixed-size uint8 subject and context crops, read by every epoch.

A prepared split is a folder of memory-mapped ``.npy`` arrays, ``subject`` (N, Hs, Ws, 3) and ``context``
(N, Hc, Wc, 3) uint8: exactly the pixels the evaluation transform gives on the fly (``output="uint8"``, before
normalisation), so a prepared sample equals an on-the-fly evaluation sample. The context is stored *unmasked*
with its ``mask_box`` (the subject box in context pixels), and masking happens on read, where the dataset's
``mask_subject`` says: masked loaders and the dictionary's "without masking" ablation read the same files.
Normalisation happens on read too (on the device in a Lightning run), so the files do not depend on mean/std.

Why memory-mapped numpy and not LitData (``optimize`` + ``StreamingDataset``): ``benchmarks/data.py --litdata``
reads the same crops both ways, in one run on this machine; at 0 workers the memory map gave 1,333 samples/s and
LitData 131 (loaded machine), and 16,283 against 1,082 at load 2 (figures in docs/results/index.md). A
sample is two fixed-size slices of a mapped file: no chunk to deserialise or cache. Sharding over ranks is the
sampler's job (Lightning's ``DistributedSampler``): each rank reads only its own rows' pages.

Keys: a folder is named ``<split>-<key hash>``, the hash of everything that changes its pixels (:func:`pixel_key`:
sizes, resize interpolation and ``reducing_gap``, the decode rule, the decoder, the format version) and of the
data's identity (the sha256 of the source dataset's ``sample_identities()``: paths, boxes, file sizes and
mtimes). Changed settings or data give another folder, built afresh; the log names what differs from the
folders already there. A folder whose ``manifest.json`` does not hold the key its name promises, or whose arrays
are missing or of the wrong shape, is refused with an error naming it.

Writers: one per node (Lightning's ``prepare_data``, ``prepare_data_per_node=True``). Each writes into a private
temporary folder and renames it into place; on a disk shared by several nodes the first rename wins and the
others discard their copy, so shared and node-local disks both work (with node-local disks, every node writes
its own copy). Training-time flips happen on the batch (:func:`flip_batch`), on the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ccim_lightning.datamodules.common import SKIP_HINT
from ccim_lightning.datamodules.dataset import (
    DECODER,
    PersonImageDataset,
    collate_skipping_none,
    sample_dict,
    uint8_sample_dict,
)
from ccim_lightning.datamodules.decode import DECODE_RULE

log = logging.getLogger(__name__)

FORMAT = "ccim-prepared-v1"
"""Names the folder layout and what each array holds; part of every key."""
MANIFEST = "manifest.json"
FLIP_WIDTH = "flip_width"
"""Batch key of a training sample read from prepared data: its image width, asking :func:`flip_batch` to flip it."""
_ARRAYS = ("subject", "context", "box", "mask_box", "width", "ok")


class PreparedDataError(ValueError):
    """A prepared folder that cannot be used: missing, damaged, or built for other settings or data."""


def pixel_key(transform: Any, reduced_decode: bool) -> dict[str, Any]:
    """What changes the stored uint8 pixels of a ``ContextTransform``-style transform (not mean, std or flip).

    Raises:
        PreparedDataError: ``transform`` has no ``signature()``, ``subject_size`` or ``decode_reductions`` (a
            replacement transform cannot be prepared: its output is only known by running it).
    """
    needed = ("signature", "subject_size", "context_size", "decode_reductions")
    missing = [name for name in needed if not hasattr(transform, name)]
    if missing:
        raise PreparedDataError(
            f"prepared_dir needs a ContextTransform-style transform (with {', '.join(needed)}); {transform!r} lacks "
            f"{', '.join(missing)}: drop prepared_dir, or use ContextTransform"
        )
    key = {k: v for k, v in transform.signature().items() if k not in ("mean", "std", "flip")}
    key["subject_size"] = list(transform.subject_size)
    key["decode"] = {"rule": DECODE_RULE} if reduced_decode else "full"
    key["decoder"] = DECODER
    return key


def split_key(source: PersonImageDataset, split: str, datamodule: str) -> dict[str, Any]:
    """The full key of one prepared split: format, datamodule, split, pixels (:func:`pixel_key`) and data identity."""
    identities = "\n".join(source.sample_identities()).encode()
    return {
        "format": FORMAT,
        "datamodule": datamodule,
        "split": split,
        "pixels": pixel_key(source.transform, source.reduced_decode),
        "persons": len(source),
        "identities_sha256": hashlib.sha256(identities).hexdigest(),
    }


def folder_name(key: dict[str, Any]) -> str:
    """``<split>-<first 16 hex digits of the key's sha256>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{key['split']}-{digest}"


def check_prepared_root(root: Path) -> None:
    """A ``prepared_dir`` that exists must be a writable folder (it is created when missing)."""
    if root.exists() and not root.is_dir():
        raise PreparedDataError(f"prepared_dir {root} exists and is not a folder; pass a folder (it is created)")


def _differences(key: dict[str, Any], other: dict[str, Any]) -> list[str]:
    fields = []
    for name in sorted(set(key) | set(other)):
        if name == "pixels" and isinstance(other.get(name), dict):
            mine, theirs = key[name], other[name]
            fields += [f"pixels.{k}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        elif key.get(name) != other.get(name):
            fields.append("data (image files or annotations)" if name == "identities_sha256" else name)
    return fields


def _stale_reasons(root: Path, key: dict[str, Any]) -> list[str]:
    """For each other folder of the same split and datamodule under ``root``: how its key differs."""
    reasons = []
    for manifest in sorted(root.glob(f"{key['split']}-*/{MANIFEST}")):
        try:
            other = json.loads(manifest.read_text())["key"]
        except (OSError, ValueError, KeyError):
            continue
        if other.get("datamodule") == key["datamodule"] and other != key:
            reasons.append(f"{manifest.parent.name} differs in {', '.join(_differences(key, other))}")
    return reasons


class _Indexed(Dataset):
    """``(index, sample)`` pairs, so that a sample that failed to decode (``None``) still names its row."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def write_split(source: PersonImageDataset, root: Path, key: dict[str, Any], num_workers: int = 0) -> Path:
    """Decodes every person of ``source`` once and stores the crops under ``root/folder_name(key)``.

    Nothing is done when that folder exists (another writer finished first). ``source`` must give ``"uint8"``
    samples of the evaluation transform with ``mask_subject=True`` (so that each sample carries its mask box; the
    context itself is left unmasked by the ``uint8`` path). Persons whose image fails to decode in ``"skip"``
    mode are stored as not ``ok``: the prepared dataset skips them as the image dataset would.

    Returns:
        The folder.
    """
    final = root / folder_name(key)
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    for reason in _stale_reasons(root, key):
        log.info("prepared data: %s, so %s is built afresh (the other folder is not used)", reason, final.name)
    start = time.perf_counter()
    temporary = root / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        count = len(source)
        (hs, ws), (hc, wc) = source.transform.subject_size, source.transform.context_size
        arrays = {
            "subject": np.lib.format.open_memmap(temporary / "subject.npy", "w+", np.uint8, (count, hs, ws, 3)),
            "context": np.lib.format.open_memmap(temporary / "context.npy", "w+", np.uint8, (count, hc, wc, 3)),
        }
        boxes = np.zeros((count, 4), dtype=np.float64)
        mask_boxes = np.zeros((count, 4), dtype=np.int64)
        ok = np.zeros(count, dtype=bool)
        # persons of one image next to each other, so one decode serves them all (the dataset keeps its last image)
        order = sorted(range(count), key=lambda i: (source.table.paths[i], i))
        loader = DataLoader(_Indexed(source), batch_size=64, sampler=order, num_workers=num_workers, collate_fn=list)
        for batch in loader:
            for index, sample in batch:
                if sample is None:
                    continue
                arrays["subject"][index] = sample["subject"].numpy()
                arrays["context"][index] = sample["context"].numpy()
                boxes[index] = sample["box"].numpy()
                mask_boxes[index] = sample["mask_box"].numpy()
                ok[index] = True
        for array in arrays.values():
            array.flush()
        del arrays
        np.save(temporary / "box.npy", boxes)
        np.save(temporary / "mask_box.npy", mask_boxes)
        np.save(temporary / "width.npy", np.asarray([size[0] for size in source.table.sizes], dtype=np.float32))
        np.save(temporary / "ok.npy", ok)
        manifest = {"key": key, "skipped": int(count - ok.sum()), "seconds": time.perf_counter() - start}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            temporary.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("prepared data: %s was written by another process first; that copy is used", final)
            shutil.rmtree(temporary, ignore_errors=True)
            return final
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    size_mb = sum(f.stat().st_size for f in final.iterdir()) / 2**20
    log.info(
        "prepared data: %s, %d persons (%d skipped) decoded in %.1f s, %.1f MB",
        *(final, count, manifest["skipped"], manifest["seconds"], size_mb),
    )
    return final


def open_split(root: Path, key: dict[str, Any]) -> Path:
    """The prepared folder of ``key`` under ``root``, checked; a clear error when it is missing or damaged."""
    folder = root / folder_name(key)
    what_to_do = (
        f"delete {folder} and run again: prepare_data() rebuilds it (under DDP with node-local disks keep "
        "prepare_data_per_node=True, so every node writes its own copy)"
    )
    if not folder.is_dir():
        others = _stale_reasons(root, key) if root.is_dir() else []
        raise PreparedDataError(
            f"no prepared data for {key['datamodule']} {key['split']} in {root} (expected {folder.name}"
            f"{'; ' + '; '.join(others) if others else ''}); call datamodule.prepare_data() first (Lightning does "
            "in a run; under DDP with node-local disks keep prepare_data_per_node=True)"
        )
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise PreparedDataError(f"prepared folder {folder}: unreadable {MANIFEST} ({error}); {what_to_do}") from error
    if manifest.get("key") != key:
        differs = _differences(key, manifest.get("key") or {})
        raise PreparedDataError(
            f"prepared folder {folder} was built for other settings or data (differs in {', '.join(differs)}); "
            f"refusing to use it: {what_to_do}"
        )
    count = key["persons"]
    for name in _ARRAYS:
        try:
            array = np.load(folder / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as error:
            message = f"prepared folder {folder}: {name}.npy unreadable ({error}); {what_to_do}"
            raise PreparedDataError(message) from error
        if len(array) != count:
            raise PreparedDataError(
                f"prepared folder {folder}: {name}.npy has {len(array)} rows for {count} persons; {what_to_do}"
            )
    return folder


class PreparedPersonDataset(Dataset):
    """A split read from a prepared folder: the image dataset's samples, without decoding.

    Args:
        folder: The checked folder (:func:`open_split`).
        source: The image dataset it was prepared from (its table, transform, failure flags and identities).
        mask_subject: Fill the subject box of ``context`` (on read; the files hold it unmasked).
        augment: Training samples: each carries :data:`FLIP_WIDTH`, and :func:`flip_batch` flips half of them.
        output: ``"uint8"`` (for ``normalize_batch`` on the device) or ``"float"`` (normalised and masked here,
            exactly as ``PersonImageDataset``'s float path).
    """

    collate_fn = staticmethod(collate_skipping_none)

    def __init__(
        self,
        folder: Path,
        source: PersonImageDataset,
        mask_subject: bool = True,
        augment: bool = False,
        output: str = "float",
    ) -> None:
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        self.folder = Path(folder)
        self.source = source
        self.table = source.table
        self.transform = source.transform
        self.failures = source.failures
        self.mask_subject = mask_subject
        self.augment = augment
        self.output = output
        mean, std = source.transform.mean, source.transform.std
        self._scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32)[:, None, None]
        self._bias = np.array([-m / s for m, s in zip(mean, std)], dtype=np.float32)[:, None, None]
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # memory maps are reopened in each worker, never pickled

    def with_output(self, output: str) -> PreparedPersonDataset:
        """A copy giving ``output`` samples."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__getstate__())
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        copy.output = output
        return copy

    def __len__(self) -> int:
        return len(self.table)

    def sample_identities(self) -> list[str]:
        """The source images' identities: the pixels are equal, so the dictionary cache keys stay the same."""
        return self.source.sample_identities()

    def sample_table(self):
        """As the image dataset's (image path and box per sample)."""
        return self.source.sample_table()

    def decode_failures(self) -> list[int]:
        """Indices of the samples whose image failed to decode when the split was prepared."""
        return torch.nonzero(self.failures).flatten().tolist()

    def _normalize(self, pixels: np.ndarray) -> torch.Tensor:
        # the float32 multiply-add of ContextTransform, so the float path's values are equal
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        np.multiply(pixels.transpose(2, 0, 1), self._scale, out=out)
        out += self._bias
        return torch.from_numpy(out)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        if self._arrays is None:
            self._arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        arrays = self._arrays
        if not arrays["ok"][index]:
            self.failures[index] = 1  # counted as the image dataset counts its decode failures
            if self.source.on_bad_sample == "error":
                raise OSError(
                    f"{self.source.name}: sample {index} ({self.table.paths[index]}) failed to decode when "
                    f"{self.folder} was prepared; {SKIP_HINT}"
                )
            return None
        mask_box = tuple(int(v) for v in arrays["mask_box"][index])
        output = {"box": tuple(float(v) for v in arrays["box"][index]), "mask_box": mask_box if any(mask_box) else None}
        if self.output == "uint8":
            output["subject"] = torch.from_numpy(np.array(arrays["subject"][index]))
            output["context"] = torch.from_numpy(np.array(arrays["context"][index]))
            sample = uint8_sample_dict(output, self.table, index, self.mask_subject)
        else:
            output["subject"] = self._normalize(arrays["subject"][index])
            output["context"] = self._normalize(arrays["context"][index])
            sample = sample_dict(output, self.table, index, self.mask_subject)
        if self.augment:
            sample[FLIP_WIDTH] = torch.tensor(float(arrays["width"][index]), dtype=torch.float32)
        return sample


def flip_batch(batch: Any, generator: torch.Generator | None = None, probability: float = 0.5) -> Any:
    """Flips half the samples of a uint8 batch that carries :data:`FLIP_WIDTH`, on its device; removes that key.

    What ``ContextTransform(flip=True)`` does per sample on the fly, done on the batch: ``subject`` and ``context``
    (B, H, W, 3) are mirrored left-right together, ``box`` (x1, y1, x2, y2 in image pixels) becomes
    ``(W - x2, y1, W - x1, y2)`` with the image width W, and a non-empty ``mask_box`` (context pixels) is mirrored
    in the context width. Each sample is flipped with ``probability`` (0.5, as ``ContextTransform``), drawn from
    ``generator`` or torch's default generator of the batch's device (``seed_everything`` seeds it). A batch
    without the key is returned unchanged. The chosen rows are flipped in place (a collated batch is the loop's
    own, used once).
    """
    if not isinstance(batch, dict) or FLIP_WIDTH not in batch:
        return batch
    out = dict(batch)
    width = out.pop(FLIP_WIDTH)
    context = out["context"]
    if context.dtype != torch.uint8 or context.ndim != 4:
        raise ValueError(f"flip_batch: context is {tuple(context.shape)} {context.dtype}, expected (B, H, W, 3) uint8")
    device = context.device
    draws = torch.rand(len(context), generator=generator) if generator is not None else None
    if draws is None:
        draws = torch.rand(len(context), device=device)
    chosen = torch.nonzero(draws.to(device) < probability).flatten()
    # in place, on the chosen rows only: a fraction of the copies a whole-batch select makes
    for key in ("subject", "context"):
        out[key][chosen] = out[key][chosen].flip(2)
    box, row_width = out["box"], width[chosen].to(device=device, dtype=out["box"].dtype)
    x1, x2 = box[chosen, 0].clone(), box[chosen, 2].clone()
    box[chosen, 0], box[chosen, 2] = row_width - x2, row_width - x1
    mask_box = out.get("mask_box")
    if mask_box is not None:
        nonempty = chosen[(mask_box[chosen, 2] > mask_box[chosen, 0]) & (mask_box[chosen, 3] > mask_box[chosen, 1])]
        m1, m2 = mask_box[nonempty, 0].clone(), mask_box[nonempty, 2].clone()
        mask_box[nonempty, 0], mask_box[nonempty, 2] = context.shape[2] - m2, context.shape[2] - m1
    return out


def same_pixels(train_transform: Any, eval_transform: Any, reduced_decode: bool) -> None:
    """Training reads the evaluation transform's prepared pixels: the two transforms may differ only in ``flip``.

    Raises:
        PreparedDataError: naming both keys when they differ.
    """
    train, evaluation = pixel_key(train_transform, reduced_decode), pixel_key(eval_transform, reduced_decode)
    if (
        train != evaluation
        or tuple(train_transform.mean) != tuple(eval_transform.mean)
        or tuple(train_transform.std) != tuple(eval_transform.std)
    ):
        raise PreparedDataError(
            f"prepared_dir: the training transform {train_transform!r} and the evaluation transform "
            f"{eval_transform!r} differ in more than flip, but training reads the evaluation pixels; use transforms "
            "that differ only in flip, or drop prepared_dir"
        )


def prepared_dataset(
    root: Path,
    source: PersonImageDataset,
    split: str,
    datamodule: str,
    *,
    mask_subject: bool,
    augment: bool,
    build: bool,
    num_workers: int = 0,
) -> PreparedPersonDataset:
    """The prepared split of ``source``; built first when ``build`` (one process), else it must exist.

    Args:
        root: ``prepared_dir``.
        source: The image dataset (evaluation transform).
        split: Split name.
        datamodule: The datamodule's class name (part of the key).
        mask_subject: See :class:`PreparedPersonDataset`.
        augment: See :class:`PreparedPersonDataset`.
        build: Write the folder when it is missing (a single process); ``False`` under DDP, where
            ``prepare_data`` wrote it.
        num_workers: Loader workers for the decode.
    """
    check_prepared_root(root)
    key = split_key(source, split, datamodule)
    if build:
        write_split(source.with_output("uint8"), root, key, num_workers)
    folder = open_split(root, key)
    return PreparedPersonDataset(folder, source, mask_subject=mask_subject, augment=augment)
