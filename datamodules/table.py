"""Any context-emotion dataset described by a table with one row per (image, person).

The table is a CSV file with a header and (at least) these columns; others are ignored:

- ``image``: image path relative to the root (``/`` separators);
- ``x1``, ``y1``, ``x2``, ``y2``: the person's box in image pixels (clipped to the decoded image);
- ``label``: a class name; several joined by ``|`` for multi-label data (names match case-insensitively);
- ``split``: ``train``, ``val`` or ``test``. A table without ``val`` rows gets a stratified, deterministic hold-out
  of ``val_fraction`` of train (by label set and ``seed``) that keeps every image, and every group of the
  ``group_column`` (default ``video``) when the table has that column, on one side: persons of one frame, or
  frames of one video, are near-duplicates, and splitting them would make validation measure memorisation.

Example::

    image,x1,y1,x2,y2,label,split
    frames/video01/000120.jpg,412,80,520,388,Happy,train
    frames/video01/000120.jpg,600,92,700,400,Happy|Neutral,train
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ccim_lightning.arguments import check_float, check_int
from ccim_lightning.datamodules.base import PersonDataModule
from ccim_lightning.datamodules.common import (
    SPLITS,
    AnnotationError,
    BadSamples,
    PersonTable,
    check_cells,
    csv_rows,
    finite_box,
    make_table,
    scan_images,
    stratified_holdout,
)
from ccim_lightning.types import Task, check_task

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("image", "x1", "y1", "x2", "y2", "label", "split")
"""Required columns of a person table."""


def _parse_row(row: dict, class_names: Sequence[str], lookup: dict[str, int], task: Task) -> tuple:
    image = (row["image"] or "").strip().replace("\\", "/")
    if not image:
        raise AnnotationError("image is empty")
    try:
        numbers = [float(row[key]) for key in ("x1", "y1", "x2", "y2")]
    except (TypeError, ValueError):
        raise AnnotationError(f"box {[row[k] for k in ('x1', 'y1', 'x2', 'y2')]} must be four numbers") from None
    box = finite_box(numbers, "box (x1, y1, x2, y2)")
    names = [name.strip() for name in (row["label"] or "").split("|")]
    if not all(names):
        raise AnnotationError(f"label {row['label']!r} is empty or has an empty name between '|'")
    unknown = [name for name in names if name.casefold() not in lookup]
    if unknown:
        raise AnnotationError(f"label {unknown} is not one of the classes {list(class_names)}")
    if task == "multiclass":
        if len(names) > 1:
            raise AnnotationError(f"label {row['label']!r} has several classes but task is 'multiclass'")
        target = lookup[names[0].casefold()]
    else:
        target = [0.0] * len(class_names)
        for name in names:
            target[lookup[name.casefold()]] = 1.0
    split = (row["split"] or "").strip().lower()
    if split not in SPLITS:
        raise AnnotationError(f"split {row['split']!r} is not one of {list(SPLITS)}")
    return image, box, target, split


def read_person_table(
    path: str | os.PathLike,
    class_names: Sequence[str],
    task: Task = "multiclass",
    bad: BadSamples | None = None,
    group_column: str | None = None,
) -> dict[str, PersonTable]:
    """Reads a person table (module docstring) into one :class:`PersonTable` per split present.

    Args:
        path: The CSV file.
        class_names: Class names in target order.
        task: ``"multiclass"`` (one name per row; int64 targets) or ``"multilabel"`` (``|``-joined; multi-hot).
        bad: Accounting for malformed rows; default: raise on the first one.
        group_column: A column whose values the hold-out keeps together (``PersonTable.groups``); ignored when the
            table has no such column.

    Returns:
        Per split name, its rows in file order.

    Raises:
        AnnotationError: Missing columns, text that is not UTF-8, broken quoting (naming the file and line), or
            a malformed row in ``"error"`` mode.
    """
    path = Path(path)
    bad = bad or BadSamples(path.name, "table")
    if not path.is_file():
        raise FileNotFoundError(f"person table {path} does not exist")
    lookup = {name.casefold(): i for i, name in enumerate(class_names)}
    rows: dict[str, tuple[list, list, list, list, list]] = {split: ([], [], [], [], []) for split in SPLITS}
    for _, where, row in csv_rows(path, COLUMNS, ",".join(COLUMNS)):
        try:
            check_cells(row)
            image, box, target, split = _parse_row(row, class_names, lookup, task)
        except AnnotationError as error:
            bad.bad("malformed rows", f"{where}: {error}")
            continue
        group = (row.get(group_column) or "").strip() if group_column else ""
        for column, value in zip(rows[split], (image, box, target, where, f"{group_column}={group}" if group else "")):
            column.append(value)
    multilabel = task == "multilabel"
    tables = {}
    for split, (paths, boxes, targets, sources, groups) in rows.items():
        if paths:
            tables[split] = make_table(
                paths,
                boxes,
                targets,
                sources,
                multilabel=multilabel,
                num_classes=len(class_names),
                groups=groups,
                path_field="column 'image'",
            )
    return tables


class TableDataModule(PersonDataModule):
    """Persons in images from a table (module docstring): subject crop + masked context, single- or multi-label.

    Nothing is read until ``setup``.

    Args:
        root: Folder the table's image paths are relative to.
        table: The CSV table; a relative path is taken relative to ``root``.
        class_names: Class names in target order.
        task: ``"multiclass"`` (one label per row, top-1 accuracy) or ``"multilabel"`` (``|``-joined labels, mAP).
        val_fraction: Share of train held out for validation when the table has no ``val`` rows, in (0, 1).
        seed: Seed of that hold-out.
        group_column: Column whose values the hold-out keeps on one side (default ``video``; a table without
            that column is held out by image, as always; an empty cell falls back to the image).
        **kwargs: The shared arguments, documented once in :class:`~ccim_lightning.datamodules.base.PersonDataModule`.
    """

    dataset_name = "table"

    def __init__(
        self,
        root: str,
        table: str,
        class_names: list[str],
        task: Task = "multiclass",
        val_fraction: float = 0.1,
        seed: int = 0,
        group_column: str | None = "video",
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        task = check_task(task, where=f"{type(self).__name__}(task=...)")
        if len(class_names) < 2 or len({name.casefold() for name in class_names}) != len(class_names):
            raise ValueError(f"class_names must hold at least two distinct names, got {class_names}")
        where = type(self).__name__
        val_fraction = check_float(where, "val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        seed = check_int(where, "seed", seed, 0)
        self.table_path = table
        self.group_column = group_column
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.task = task
        self.val_fraction = val_fraction
        self.seed = seed
        self._splits: dict[str, PersonTable] | None = None

    def _read(self) -> dict[str, PersonTable]:
        """All rows of the table by split (read once; malformed rows are reported under ``dropped["table"]``)."""
        if self._splits is None:
            path = Path(self.table_path).expanduser()
            path = path if path.is_absolute() else self.root / path
            bad = BadSamples(self.dataset_name, "table", self.on_bad_sample)
            self._splits = read_person_table(path, self.class_names, self.task, bad, self.group_column)
            self._dropped["table"] = bad.report(sum(len(table) for table in self._splits.values()))
        return self._splits

    def split_source(self, split: str) -> str:
        return f"the rows with split {split!r} of {self.table_path}"

    def build_split(self, split: str, bad: BadSamples) -> PersonTable:
        splits = self._read()
        if split in ("train", "val") and "val" not in splits and "train" in splits:
            train = splits["train"]
            strata = [tuple(t) if t.ndim else int(t) for t in train.targets]
            groups = train.holdout_groups()
            keep, held = stratified_holdout(train.identities(), strata, self.val_fraction, self.seed, groups)
            by = f"image and {self.group_column!r}" if train.groups and any(train.groups) else "image"
            log.info(
                "%s: no 'val' rows in %s; %d of %d train rows (%d of %d groups by %s) held out for validation "
                "(val_fraction=%s, seed=%s)",
                *(self.dataset_name, self.table_path, len(held), len(train), len({groups[i] for i in held})),
                *(len(set(groups)), by, self.val_fraction, self.seed),
            )
            splits["train"], splits["val"] = train.subset(keep), train.subset(held)
        if split not in splits:
            raise AnnotationError(
                f"{self.dataset_name}: the table {self.table_path} has no usable rows with split {split!r}; give "
                f"that split rows (column 'split')"
            )
        return scan_images(self.root, splits[split], bad, allow_absolute_paths=self.allow_absolute_paths)
