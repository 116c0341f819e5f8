"""CAER-S (Lee et al., ICCV 2019): 7-class emotion of the face in TV-show frames, in ``<split>/<Class>/<NNNN>.png``.

Layout (docs/how-to/datasets.md): ``<root>/train/<Class>/*.png`` and ``<root>/test/<Class>/*.png``. The anger folder
is ``Angry`` in train and ``Anger`` in test (both class 0); split folders may be capitalised (``Train``, ``Test``).
Labels in alphabetical order: :data:`CLASSES`. There is no validation split: a deterministic, stratified share of
train is held out (:func:`~ccim_lightning.datamodules.common.stratified_holdout`, by image path and seed; one
person per image, so no image is on both sides). Frames of one clip are near-duplicates and CAER-S does not say
which frames share a clip, so this hold-out is an optimistic validation set; the test split is the benchmark.

Faces: with ``face_boxes`` (the public hand-checked face-box file: lines
``<split>/<Class>/<NNNN>.png,<label>,<x1>,<y1>,<x2>,<y2>``, paths relative to the root), ``subject`` is the face
crop and the face box is masked in ``context``; boxes are clipped to the image; images the file leaves out (the
invalid ones) are left out and counted. Without a box file the subject is not localised: ``subject`` is the whole
frame and nothing is masked (a warning says so), which is *not* the paper's setting.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ccim_lightning.arguments import check_float, check_int
from ccim_lightning.datamodules.base import PersonDataModule
from ccim_lightning.datamodules.common import (
    IMAGE_EXTENSIONS,
    AnnotationError,
    BadSamples,
    PersonTable,
    finite_box,
    make_table,
    scan_images,
    stratified_holdout,
)

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
"""The 7 CAER-S classes in label order (alphabetical)."""

CLASS_FOLDERS: dict[str, int] = {name.lower(): i for i, name in enumerate(CLASSES)} | {"angry": 0}
"""Class folder names (lower-cased) to labels: ``Angry`` (train) and ``Anger`` (test) are both class 0."""


@dataclass(frozen=True)
class FaceBox:
    """One line of the face-box file."""

    split: str
    folder: str
    filename: str
    label: int
    box: tuple[float, float, float, float]
    source: str


def find_split_folder(root: Path, split: str) -> Path:
    """``<root>/<split>``, matched case-insensitively (``train`` or ``Train``)."""
    matches = [child for child in root.iterdir() if child.is_dir() and child.name.lower() == split]
    if len(matches) != 1:
        found = sorted(child.name for child in root.iterdir() if child.is_dir())
        problem = "several folders" if matches else "no folder"
        raise FileNotFoundError(
            f"CAER-S: {problem} named {split!r} (any capitalisation) in {root} (found {found}); expected "
            f"<root>/{split}/<Class>/<NNNN>.png"
        )
    return matches[0]


def list_images(root: Path, split: str, bad: BadSamples) -> tuple[list[str], list[int]]:
    """The images of a split: paths relative to ``root`` (sorted) and their labels from the class folder."""
    split_dir = find_split_folder(root, split)
    paths, labels = [], []
    for child in sorted(split_dir.iterdir()):
        if not child.is_dir():
            bad.note("ignored files outside class folders", str(child))
            continue
        label = CLASS_FOLDERS.get(child.name.lower())
        if label is None:
            bad.bad(
                "unknown class folders",
                f"{child} is not a CAER-S class folder; expected Angry or Anger, Disgust, Fear, Happy, Neutral, Sad, "
                "Surprise",
            )
            continue
        for entry in sorted(os.scandir(child), key=lambda e: e.name):
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(f"{split_dir.name}/{child.name}/{entry.name}")
                labels.append(label)
            else:
                bad.note("ignored non-image files", entry.path)
    return paths, labels


def _face_box_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise FileNotFoundError(
                    f"CAER-S face-box folder {path} holds no .txt files (expected train.txt, test.txt)"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"CAER-S face-box file {path} does not exist")
    return files


def read_face_boxes(
    paths: str | os.PathLike | Sequence[str | os.PathLike], bad: BadSamples | None = None
) -> list[FaceBox]:
    """Reads face-box files (``<split>/<Class>/<NNNN>.png,<label>,<x1>,<y1>,<x2>,<y2>`` per line, no header).

    Args:
        paths: One or more files, or folders whose ``*.txt`` files are read.
        bad: Accounting for malformed lines; default: raise on the first one.

    Returns:
        The lines, in file order; a line whose label disagrees with its class folder, or that repeats an image,
        is malformed.
    """
    bad = bad or BadSamples("CAER-S", "face boxes")
    files = _face_box_files([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    boxes: list[FaceBox] = []
    seen: set[tuple[str, int, str]] = set()
    for file in files:
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                where = f"{file.name} line {number}"
                if not line.strip():
                    continue
                try:
                    face = _parse_face_line(line, where)
                except AnnotationError as error:
                    bad.bad("malformed face-box lines", f"{where}: {error}")
                    continue
                key = (face.split, face.label, face.filename)
                if key in seen:
                    bad.bad("malformed face-box lines", f"{where}: a second box for {line.split(',')[0]}")
                    continue
                seen.add(key)
                boxes.append(face)
    return boxes


def _parse_face_line(line: str, where: str) -> FaceBox:
    cells = [cell.strip() for cell in line.strip().split(",")]
    expected = "<split>/<Class>/<NNNN>.png,<label 0-6>,<x1>,<y1>,<x2>,<y2>"
    if len(cells) != 6:
        raise AnnotationError(f"{line.strip()!r} has {len(cells)} fields, expected {expected}")
    parts = cells[0].replace("\\", "/").split("/")
    if len(parts) != 3 or parts[0].lower() not in ("train", "test"):
        raise AnnotationError(f"path {cells[0]!r} is not <train|test>/<Class>/<file>")
    folder_label = CLASS_FOLDERS.get(parts[1].lower())
    try:
        label = int(cells[1])
        numbers = [float(cell) for cell in cells[2:]]
    except ValueError:
        raise AnnotationError(f"{line.strip()!r}: label and box must be numbers ({expected})") from None
    box = tuple(finite_box(numbers, "box"))
    if folder_label is None or label != folder_label:
        raise AnnotationError(f"label {label} does not match class folder {parts[1]!r} (labels: {list(CLASSES)})")
    return FaceBox(parts[0].lower(), parts[1], parts[2], label, box, where)


class CAERSDataModule(PersonDataModule):
    """CAER-S: face crop + masked context, 7 classes (single label), top-1 accuracy (micro).

    Nothing is read until ``setup``. Validation is a stratified, deterministic hold-out of ``val_fraction`` of each
    class of train (by ``seed``); ``test`` is the test folder.

    Args:
        root: CAER-S folder holding ``train/`` and ``test/`` (any capitalisation).
        face_boxes: The face-box file(s) or a folder of them (relative paths are tried under ``root`` when not
            found as given); None: subjects are not localised (module docstring).
        val_fraction: Share of each training class held out for validation, in (0, 1).
        seed: Seed of the hold-out.
        subject_size: Face crop size, an int or (height, width) (default 96, as CAER-Net-S).
        **kwargs: The shared arguments, documented once in :class:`~ccim_lightning.datamodules.base.PersonDataModule`.
    """

    dataset_name = "CAER-S"
    task = "multiclass"
    num_classes = len(CLASSES)

    def __init__(
        self,
        root: str,
        face_boxes: str | list[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        subject_size: int | tuple[int, int] = 96,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, subject_size=subject_size, **kwargs)
        where = type(self).__name__
        val_fraction = check_float(where, "val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        seed = check_int(where, "seed", seed, 0)
        self.class_names = list(CLASSES)
        self.face_boxes = face_boxes
        self.val_fraction = val_fraction
        self.seed = seed
        self._faces: dict[tuple[str, int, str], FaceBox] | None = None
        self._listings: dict[str, tuple[PersonTable, BadSamples]] = {}

    def _face_index(self) -> dict[tuple[str, int, str], FaceBox] | None:
        if self.face_boxes is None:
            return None
        if self._faces is None:
            given = [self.face_boxes] if isinstance(self.face_boxes, str) else list(self.face_boxes)
            paths = [Path(p).expanduser() for p in given]
            paths = [p if p.exists() or p.is_absolute() else self.root / p for p in paths]
            bad = BadSamples(self.dataset_name, "face boxes", self.on_bad_sample)
            faces = read_face_boxes(paths, bad)
            self._dropped["face boxes"] = bad.report(len(faces))
            self._faces = {(face.split, face.label, face.filename): face for face in faces}
        return self._faces

    def _listing(self, split: str) -> tuple[PersonTable, BadSamples]:
        """All images of a split folder with their face boxes (NaN when there is no box file)."""
        if split not in self._listings:
            bad = BadSamples(self.dataset_name, split, self.on_bad_sample)
            paths, labels = list_images(self.root, split, bad)
            faces = self._face_index()
            if faces is None:
                log.warning(
                    "CAER-S %s: no face_boxes given, so subjects are not localised: the subject is the whole frame "
                    "and nothing is masked in the context. Pass face_boxes= (the face-box file) for the paper's "
                    "setting.",
                    split,
                )
                boxes = [[np.nan] * 4 for _ in paths]
                sources = paths
            else:
                keep, boxes, sources, used = [], [], [], set()
                for i, (path, label) in enumerate(zip(paths, labels)):
                    face = faces.get((split, label, path.rsplit("/", 1)[1]))
                    if face is None:
                        bad.note("images left out: not in the face-box file", path)
                        continue
                    keep.append(i)
                    boxes.append(face.box)
                    sources.append(face.source)
                    used.add((split, label, face.filename))
                paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
                for key, face in faces.items():
                    if key[0] == split and key not in used:
                        bad.bad(
                            "missing images",
                            f"{face.source}: image {face.split}/{face.folder}/{face.filename} is not under {self.root}",
                            FileNotFoundError,
                        )
            self._listings[split] = (make_table(paths, boxes, labels, list(sources)), bad)
        return self._listings[split]

    def split_source(self, split: str) -> str:
        folder = "test" if split == "test" else "train"
        boxes = "" if self.face_boxes is None else f" with face boxes {self.face_boxes}"
        return f"{self.root}/{folder}{boxes}"

    def build_split(self, split: str, bad: BadSamples) -> PersonTable:
        listing, listing_bad = self._listing("test" if split == "test" else "train")
        if split != "val":
            bad.merge(listing_bad)
        if split != "test":
            train, val = stratified_holdout(listing.paths, listing.targets.tolist(), self.val_fraction, self.seed)
            listing = listing.subset(train if split == "train" else val)
        return scan_images(self.root, listing, bad, allow_absolute_paths=self.allow_absolute_paths)
