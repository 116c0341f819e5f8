"""EMOTIC (Kosti et al., TPAMI 2019): 26 multi-label emotion categories and V/A/D per person in context.

Reads either annotation form (docs/how-to/datasets.md, "EMOTIC"):

- the original ``<root>/Annotations/Annotations.mat`` (MATLAB v5, via ``scipy.io.loadmat``), one entry per image
  with its persons: train persons carry the single annotator's ``annotations_categories`` / ``annotations_continuous``,
  val/test persons the ``combined_categories`` / ``combined_continuous`` of several annotators. The squeeze quirks
  are handled: a single person, a single label (a bare string), an empty combined label list.
- the preprocessed CSV form (``{train,val,test}.csv``, one row per person, in ``<root>/emotic_pre/`` by default),
  optionally with the ``{split}_context_arr.npy`` / ``{split}_body_arr.npy`` image arrays.

Images are read from ``<root>/emotic/<folder>/<filename>`` (``framesdb/framesdb/images`` copies are found too).
One sample per annotated person: ``subject`` = the body crop, ``context`` = the image with the body box filled with
zeros, ``target`` = float32 (26,) multi-hot in :data:`CATEGORIES` order, ``vad`` = float32 (valence, arousal,
dominance) on the annotation's 1-10 scale, NaN where the annotation has none (the ``.mat`` keeps such persons; the
CSV tool dropped them). Persons without any category are kept with an all-zero target and counted in the split's
report. A V/A/D value that is infinite or off the 1-10 scale, and a box with a NaN or infinite coordinate, make
the person a bad sample (an error naming the file, row and field; counted and left out with
``on_bad_sample="skip"``).
"""

from __future__ import annotations

import ast
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from ccim_lightning.datamodules.base import PersonDataModule
from ccim_lightning.datamodules.common import (
    SPLITS,
    AnnotationError,
    BadSamples,
    PersonTable,
    apply_box_rule,
    check_cells,
    csv_rows,
    finite_box,
    make_table,
    scan_images,
)
from ccim_lightning.datamodules.dataset import collate_skipping_none, file_stamp, sample_dict
from ccim_lightning.types import BOX, VAD

log = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = (
    "Affection", "Anger", "Annoyance", "Anticipation", "Aversion", "Confidence", "Disapproval", "Disconnection",
    "Disquietment", "Doubt/Confusion", "Embarrassment", "Engagement", "Esteem", "Excitement", "Fatigue", "Fear",
    "Happiness", "Pain", "Peace", "Pleasure", "Sadness", "Sensitivity", "Suffering", "Surprise", "Sympathy",
    "Yearning",
)  # fmt: skip
"""The 26 EMOTIC categories in canonical order (target index 0..25)."""

_CATEGORY_INDEX = {name: i for i, name in enumerate(CATEGORIES)}
CSV_COLUMNS: tuple[str, ...] = ("Folder", "Filename", "Image Size", "BBox", "Categorical_Labels", "Continuous_Labels")
"""Columns of the preprocessed CSV form that are read (``Index``, ``Gender``, ``Age`` are ignored)."""
CSV_HEADER = "Index,Folder,Filename,Image Size,BBox,Categorical_Labels,Continuous_Labels,Gender,Age"
_VAD = ("valence", "arousal", "dominance")
VAD_RANGE = (1.0, 10.0)
"""The annotation scale of valence, arousal and dominance."""


# --- shared parsing helpers ----------------------------------------------------------------------------------------
def _multi_hot(names: list[str]) -> list[float]:
    unknown = [name for name in names if name not in _CATEGORY_INDEX]
    if unknown:
        raise AnnotationError(f"unknown categories {unknown}; expected names from {list(CATEGORIES)}")
    target = [0.0] * len(CATEGORIES)
    for name in names:
        target[_CATEGORY_INDEX[name]] = 1.0
    return target


def check_vad(vad: list[float], name: str) -> list[float]:
    """V/A/D on the 1..10 scale; NaN (not annotated) is allowed, infinite or off-scale values are malformed."""
    low, high = VAD_RANGE
    wrong = [f"{key}={value:g}" for key, value in zip(_VAD, vad) if not math.isnan(value) and not low <= value <= high]
    if wrong:
        raise AnnotationError(
            f"{name} {[float(v) for v in vad]}: {', '.join(wrong)} is off the {low:g}..{high:g} scale of EMOTIC's "
            "valence/arousal/dominance (NaN marks a missing value)"
        )
    return vad


def _note_person(bad: BadSamples, where: str, labels: list[str], vad: list[float]) -> None:
    if not labels:
        bad.note("persons without categories (all-zero target)", where)
    if any(v != v for v in vad):
        bad.note("persons without V/A/D (vad = NaN)", where)


# --- CSV form ------------------------------------------------------------------------------------------------------
def _numbers(cell: str, count: int, column: str) -> list[float]:
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise AnnotationError(f"{column} {cell!r} is not a list like [1, 2, ...]")
    try:
        values = [float(part) for part in text[1:-1].split(",")]
    except ValueError:
        raise AnnotationError(f"{column} {cell!r} is not a list of {count} numbers") from None
    if len(values) != count:
        raise AnnotationError(f"{column} {cell!r} has {len(values)} numbers, expected {count}")
    return values


def _labels(cell: str) -> list[str]:
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError):
        raise AnnotationError(f"Categorical_Labels {cell!r} is not a Python list of names like ['Anger']") from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise AnnotationError(f"Categorical_Labels {cell!r} is not a list of category names")
    return list(value)


def read_emotic_csv(path: str | os.PathLike, bad: BadSamples | None = None) -> PersonTable:
    """Reads one split of the preprocessed CSV form (one row per person).

    Args:
        path: ``train.csv``, ``val.csv`` or ``test.csv``.
        bad: Accounting for malformed rows; default: raise on the first one.

    Returns:
        The persons: paths ``<Folder>/<Filename>`` (relative to ``<root>/emotic``), ``BBox`` boxes, multi-hot
        targets, ``vad`` extras, ``rows`` (data-row positions, to index the ``*_arr.npy`` arrays) and ``sizes``
        (the stored ``Image Size``; replaced by decoded sizes when images are checked).
    """
    path = Path(path)
    bad = bad or BadSamples("EMOTIC", path.stem)
    if not path.is_file():
        raise FileNotFoundError(f"EMOTIC annotation file {path} does not exist")
    persons, sizes = _PersonRows(), []
    for row_number, where, row in csv_rows(path, CSV_COLUMNS, f"the preprocessed EMOTIC header {CSV_HEADER}"):
        try:
            check_cells(row)
            folder, filename = row["Folder"].strip(), row["Filename"].strip()
            if not folder or not filename:
                raise AnnotationError("Folder or Filename is empty")
            size = _numbers(row["Image Size"], 2, "Image Size")
            if not all(math.isfinite(v) and v >= 1 for v in size):
                raise AnnotationError(f"Image Size {row['Image Size']!r} must be two positive numbers")
            box = finite_box(_numbers(row["BBox"], 4, "BBox"), "BBox")
            labels = _labels(row["Categorical_Labels"])
            target = _multi_hot(labels)
            vad = check_vad(_numbers(row["Continuous_Labels"], 3, "Continuous_Labels"), "Continuous_Labels")
        except AnnotationError as error:
            bad.bad("malformed rows", f"{where}: {error}")
            continue
        persons.add(bad, where, f"{folder}/{filename}", box, labels, target, vad, row_number)
        sizes.append(size)
    table = persons.table()
    table.sizes = np.asarray(sizes, dtype=np.int64).reshape(len(sizes), 2)
    return table


class _PersonRows:
    """The columns of one EMOTIC split, filled one person at a time by the CSV and the MATLAB readers."""

    def __init__(self) -> None:
        self.paths, self.boxes, self.targets, self.vads, self.rows, self.sources = [], [], [], [], [], []

    def add(self, bad: BadSamples, where: str, path: str, box, labels, target, vad, row: int) -> None:
        _note_person(bad, where, labels, vad)
        for column, value in zip(
            (self.paths, self.boxes, self.targets, self.vads, self.rows, self.sources),
            (path, box, target, vad, row, where),
        ):
            column.append(value)

    def table(self) -> PersonTable:
        return make_table(
            self.paths, self.boxes, self.targets, self.sources, {VAD: self.vads}, self.rows, multilabel=True,
            num_classes=len(CATEGORIES), path_field="Folder/Filename",
        )  # fmt: skip


# --- MATLAB form ---------------------------------------------------------------------------------------------------
def _as_list(value: Any) -> list:
    """A struct array as a list; ``squeeze_me`` turns a one-element array into the bare element."""
    if isinstance(value, np.ndarray):
        return list(value.ravel())
    return [value]


def _string(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.size == 1 and isinstance(value.item(), str):
        return value.item()
    raise AnnotationError(f"{name} is {value!r}, expected a string")


def _strings(value: Any, name: str) -> list[str]:
    if isinstance(value, str):  # a one-element cell array, squeezed
        return [value]
    if isinstance(value, np.ndarray) and all(isinstance(v, str) for v in value.ravel()):
        return [str(v) for v in value.ravel()]
    raise AnnotationError(f"{name} is {value!r}, expected category names")


def _category_list(value: Any, name: str) -> list[str]:
    """A cell array of names: empty, a bare string (one name, squeezed) or an array of strings."""
    if isinstance(value, np.ndarray) and value.size == 0:
        return []
    return _strings(value, name)


def _scalar(value: Any, name: str) -> float:
    array = np.asarray(value, dtype=np.float64).ravel() if not isinstance(value, str) else None
    if array is None or array.size > 1:
        raise AnnotationError(f"{name} is {value!r}, expected a number")
    return float(array[0]) if array.size else float("nan")


def _vad(struct: Any, name: str) -> list[float]:
    if isinstance(struct, np.ndarray) and struct.size == 0:
        return [float("nan")] * 3
    try:
        return [_scalar(getattr(struct, key), f"{name}.{key}") for key in _VAD]
    except AttributeError:
        raise AnnotationError(f"{name} is {struct!r}, expected a struct with valence, arousal, dominance") from None


def _person_labels(person: Any, split: str) -> tuple[list[str], list[float]]:
    if split == "train":
        annotation = person.annotations_categories
        annotators = _as_list(annotation)
        if len(annotators) != 1:
            raise AnnotationError(f"annotations_categories has {len(annotators)} annotators, expected one in train")
        labels = _category_list(annotators[0].categories, "categories")
        continuous = _as_list(person.annotations_continuous)
        vad = _vad(continuous[0] if len(continuous) == 1 else np.empty(0), "annotations_continuous")
        return labels, check_vad(vad, "annotations_continuous")
    labels = _category_list(person.combined_categories, "combined_categories")
    return labels, check_vad(_vad(person.combined_continuous, "combined_continuous"), "combined_continuous")


def read_emotic_mat(
    path: str | os.PathLike, bad: dict[str, BadSamples] | None = None, splits: tuple[str, ...] = SPLITS
) -> dict[str, PersonTable]:
    """Reads the original ``Annotations.mat`` (all splits at once: the file is loaded once).

    Args:
        path: ``<root>/Annotations/Annotations.mat``.
        bad: Accounting per split for malformed entries; default: raise on the first one.
        splits: Splits to read.

    Returns:
        Per split, the persons: paths ``<folder>/<filename>`` (relative to ``<root>/emotic``), ``body_bbox`` boxes,
        multi-hot targets (train: the annotator's categories; val/test: the combined ones) and ``vad`` extras
        (NaN where missing). ``image_size`` is not read: it is unreliable (``emodb_small`` stores it transposed).
    """
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EMOTIC annotation file {path} does not exist")
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as error:
        raise AnnotationError(
            f"cannot read {path} as a MATLAB v5 file: {error}; expected EMOTIC's Annotations.mat"
        ) from error
    bad = bad or {}
    tables = {}
    for split in splits:
        if split not in mat:
            keys = sorted(key for key in mat if not key.startswith("__"))
            raise AnnotationError(
                f"{path} has no {split!r} struct array (found {keys}); is it EMOTIC's Annotations.mat?"
            )
        split_bad = bad.get(split) or BadSamples("EMOTIC", split)
        collected = _PersonRows()
        for i, image in enumerate(_as_list(mat[split])):
            where = f"{path.name} {split}[{i}]"
            try:
                filename = _string(image.filename, "filename")
                folder = _string(image.folder, "folder")
                persons = _as_list(image.person)
            except (AttributeError, AnnotationError) as error:
                split_bad.bad("malformed entries", f"{where}: {error}")
                continue
            for j, person in enumerate(persons):
                person_where = f"{where} ({folder}/{filename}) person {j}"
                try:
                    box = np.asarray(person.body_bbox, dtype=np.float64).ravel()
                    if box.size != 4:
                        raise AnnotationError(f"body_bbox is {person.body_bbox!r}, expected [x1 y1 x2 y2]")
                    box = finite_box(box.tolist(), "body_bbox")
                    labels, vad = _person_labels(person, split)
                    target = _multi_hot(labels)
                except (AttributeError, TypeError, ValueError) as error:
                    split_bad.bad("malformed entries", f"{person_where}: {error}")
                    continue
                row = len(collected.rows)
                collected.add(split_bad, person_where, f"{folder}/{filename}", box, labels, target, vad, row)
        tables[split] = collected.table()
    return tables


# --- the *_arr.npy form --------------------------------------------------------------------------------------------
def open_array(file: Path) -> np.ndarray:
    """Memory-maps a ``.npy`` file; a file that cannot be mapped is an error naming it and the likely cause."""
    try:
        return np.load(file, mmap_mode="r")
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as error:
        raise AnnotationError(
            f"EMOTIC array {file} cannot be memory-mapped ({error}); it is truncated (an interrupted copy or "
            "write), pickled object data, or not a .npy file: regenerate it with the preprocessing tool"
        ) from error


class EmoticArrayDataset(Dataset):
    """EMOTIC persons from the preprocessing tool's ``{split}_context_arr.npy`` / ``{split}_body_arr.npy``.

    The context array holds each person's whole image resized (no decoding, no masking); the body array its body
    crop. Boxes are mapped into the context array with the CSV's stored ``Image Size`` (the decoded size is not
    available here) and masked there; ``box`` is reported in original image pixels. Arrays are memory-mapped in each
    worker.

    Args:
        table: The split from :func:`read_emotic_csv`, boxes clipped to the stored sizes.
        context_file: ``{split}_context_arr.npy`` (N, H, W, 3) uint8.
        body_file: ``{split}_body_arr.npy`` (N, h, w, 3) uint8.
        transform: ``transform(image, box, subject=...)`` (``ContextTransform`` contract).
        mask_subject: Fill the subject box of ``context`` with zeros.
    """

    collate_fn = staticmethod(collate_skipping_none)

    def __init__(
        self, table: PersonTable, context_file: Path, body_file: Path, transform: Callable, mask_subject: bool = True
    ) -> None:
        self.table = table
        self.context_file = Path(context_file)
        self.body_file = Path(body_file)
        self.transform = transform
        self.mask_subject = mask_subject
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # memory maps are reopened in each worker, never pickled

    def __len__(self) -> int:
        return len(self.table)

    def sample_identities(self) -> list[str]:
        """One string per sample: array source, image path, box, and the arrays' file sizes and mtimes (ns).

        Size and modification time are a cheap content signal (see ``PersonImageDataset.sample_identities``): a
        regenerated array changes them; an edit that keeps both does not show.
        """
        stamp = f"{file_stamp(self.context_file)}/{file_stamp(self.body_file)}"
        return [
            f"arrays:{identity}|row {row}|{stamp}" for identity, row in zip(self.table.identities(), self.table.rows)
        ]

    def sample_table(self) -> pd.DataFrame:
        """One row per sample in index order: image path (relative to ``emotic/``), box and array row."""
        boxes = np.asarray(self.table.boxes, dtype=np.float64).reshape(-1, 4)
        columns = {"image": self.table.paths, "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2]}
        return pd.DataFrame({**columns, "y2": boxes[:, 3], "array_row": self.table.rows})

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = (open_array(self.context_file), open_array(self.body_file))
        contexts, bodies = self._arrays
        table = self.table
        row = int(table.rows[index])
        image = Image.fromarray(np.ascontiguousarray(contexts[row]))
        body = Image.fromarray(np.ascontiguousarray(bodies[row]))
        width, height = table.sizes[index]
        sx, sy = image.width / width, image.height / height
        box = None
        if table.localised[index]:
            x1, y1, x2, y2 = table.boxes[index]
            box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
        output = self.transform(image, box, subject=body)
        x1, y1, x2, y2 = output[BOX]
        output[BOX] = (x1 / sx, y1 / sy, x2 / sx, y2 / sy)
        return sample_dict(output, table, index, self.mask_subject)


def check_arrays(context_file: Path, body_file: Path, total_rows: int) -> None:
    """Checks that both arrays exist and hold one (H, W, 3) uint8 image per CSV row."""
    for file in (context_file, body_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"EMOTIC array {file} does not exist; use_arrays=True needs the preprocessing tool's "
                "{split}_context_arr.npy and {split}_body_arr.npy next to the CSV files (or use_arrays=False)"
            )
        array = open_array(file)
        if array.ndim != 4 or array.shape[3] != 3 or array.dtype != np.uint8 or array.shape[0] != total_rows:
            raise AnnotationError(
                f"EMOTIC array {file} has shape {array.shape} and dtype {array.dtype}; expected "
                f"({total_rows}, H, W, 3) uint8, one image per row of the CSV"
            )


# --- datamodule ----------------------------------------------------------------------------------------------------
class EmoticDataModule(PersonDataModule):
    """EMOTIC: body crop + masked context, 26-category multi-hot target and V/A/D, per annotated person.

    Nothing is read until ``setup``. The annotation source: ``annotations`` if given (an ``Annotations.mat`` or a
    folder of / path to the CSV files), else ``<root>/Annotations/Annotations.mat`` if present, else the CSV files in
    ``<root>/emotic_pre/``; ``annotation_format`` forces one form. Images are checked once per split at setup
    (exists, header readable, decoded size) and boxes are clipped to the decoded size (see
    ``ccim_lightning.datamodules.common`` for the box rules).

    Args:
        root: EMOTIC folder holding ``emotic/<folder>/<filename>`` images and ``Annotations/`` or ``emotic_pre/``.
        annotations: Annotation file or CSV folder; relative paths are tried under ``root`` when not found as given.
        annotation_format: ``"auto"``, ``"mat"`` or ``"csv"``.
        use_arrays: Read pixels from the CSV folder's ``{split}_context_arr.npy`` / ``{split}_body_arr.npy``
            instead of decoding images (CSV form only).
        **kwargs: The shared arguments, documented once in
            :class:`~ccim_lightning.datamodules.base.PersonDataModule`; here ``context_size`` defaults to 224 and
            ``subject_size`` to 128, as in the EMOTIC baseline.
    """

    dataset_name = "EMOTIC"
    task = "multilabel"
    num_classes = len(CATEGORIES)

    def __init__(
        self,
        root: str,
        annotations: str | None = None,
        annotation_format: Literal["auto", "mat", "csv"] = "auto",
        use_arrays: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if annotation_format not in ("auto", "mat", "csv"):
            raise ValueError(f"annotation_format must be 'auto', 'mat' or 'csv', got {annotation_format!r}")
        self.class_names = list(CATEGORIES)
        self.annotations = annotations
        self.annotation_format = annotation_format
        self.use_arrays = use_arrays
        if use_arrays and self.prepared_dir is not None:
            raise ValueError("use_arrays=True reads already-prepared arrays; drop prepared_dir or use_arrays")
        self._mat_tables: dict[str, tuple[PersonTable, BadSamples]] | None = None
        self._source: tuple[str, Path] | None = None

    @property
    def image_root(self) -> Path:
        return self.root / "emotic"

    def annotation_source(self) -> tuple[str, Path]:
        """Resolves ``("mat", file)`` or ``("csv", folder)`` (see the class docstring); raises if neither exists."""
        if self._source is not None:
            return self._source
        fmt = self.annotation_format
        if self.annotations is not None:
            given = Path(self.annotations).expanduser()
            path = given if given.exists() or given.is_absolute() else self.root / given
            if not path.exists():
                raise FileNotFoundError(f"EMOTIC annotations {self.annotations} not found (also tried {path})")
            if fmt == "auto":
                fmt = "mat" if path.suffix.lower() == ".mat" else "csv"
            if fmt == "csv" and path.is_file():
                path = path.parent
        else:
            mat, csv_dir = self.root / "Annotations" / "Annotations.mat", self.root / "emotic_pre"
            if fmt == "auto":
                fmt = "mat" if mat.is_file() else "csv" if (csv_dir / "train.csv").is_file() else None
            path = mat if fmt == "mat" else csv_dir
            if fmt is None or not path.exists():
                raise FileNotFoundError(
                    f"No EMOTIC annotations under {self.root}: expected {mat} or {csv_dir}/{{train,val,test}}.csv; "
                    "pass annotations= to point elsewhere"
                )
        if self.use_arrays and fmt != "csv":
            raise ValueError(f"use_arrays=True needs the CSV form (with its *_arr.npy files), but {path} is {fmt}")
        self._source = (fmt, path)
        return self._source

    def _read_split(self, split: str, bad: BadSamples) -> PersonTable:
        fmt, path = self.annotation_source()
        if fmt == "csv":
            return read_emotic_csv(path / f"{split}.csv", bad)
        if self._mat_tables is None:
            bads = {name: BadSamples(self.dataset_name, name, self.on_bad_sample) for name in SPLITS}
            tables = read_emotic_mat(path, bads)
            self._mat_tables = {name: (tables[name], bads[name]) for name in SPLITS}
        table, parse_bad = self._mat_tables[split]
        bad.merge(parse_bad)
        return table

    def _resolve_folders(self, table: PersonTable) -> PersonTable:
        """Maps each annotation folder to the folder on disk (``framesdb/images`` or ``framesdb/framesdb/images``)."""
        resolved: dict[str, str] = {}
        for folder in {path.rsplit("/", 1)[0] for path in table.paths}:
            candidates = [folder, f"{folder.split('/', 1)[0]}/{folder}"]
            resolved[folder] = next((c for c in candidates if (self.image_root / c).is_dir()), folder)
        table.paths = [f"{resolved[path.rsplit('/', 1)[0]]}/{path.rsplit('/', 1)[1]}" for path in table.paths]
        return table

    def build_split(self, split: str, bad: BadSamples) -> PersonTable:
        table = self._read_split(split, bad)
        if self.use_arrays:
            _, folder = self.annotation_source()
            total_rows = sum(1 for _ in csv_rows(folder / f"{split}.csv", CSV_COLUMNS, CSV_HEADER))
            check_arrays(*self._array_files(split), total_rows)
            return apply_box_rule(table, bad)
        if not self.image_root.is_dir():
            raise FileNotFoundError(
                f"EMOTIC images folder {self.image_root} does not exist; expected <root>/emotic/<folder>/<filename> "
                "(or use_arrays=True with the preprocessed arrays)"
            )
        return scan_images(
            self.image_root, self._resolve_folders(table), bad, allow_absolute_paths=self.allow_absolute_paths
        )

    def split_source(self, split: str) -> str:
        fmt, path = self.annotation_source()
        return f"{path / f'{split}.csv'}" if fmt == "csv" else f"the {split!r} struct array of {path}"

    def pixel_source(self) -> str:
        if not self.use_arrays:
            return super().pixel_source()
        return "emotic-arrays: {split}_context_arr.npy (the preprocessing tool's resize), PIL resize"

    def _array_files(self, split: str) -> tuple[Path, Path]:
        _, folder = self.annotation_source()
        return folder / f"{split}_context_arr.npy", folder / f"{split}_body_arr.npy"

    def make_dataset(self, split: str, transform: Callable, mask_subject: bool) -> Dataset:
        if not self.use_arrays:
            return super().make_dataset(split, transform, mask_subject)
        return EmoticArrayDataset(self.table(split), *self._array_files(split), transform, mask_subject)
