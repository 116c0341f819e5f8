"""The bias report's input, :class:`ContextLabels`, from an annotation table or from labels given as arrays.

- :func:`read_annotation_table`: a context column and a label column of a CSV/TSV table (e.g. EMOTIC's ``Folder``
  and ``Categorical_Labels``); no images are read.
- :func:`label_matrix`: class ids or multi-hot rows as the report's 0/1 matrix. ``ccim bias-report`` uses it for
  each training sample's confounder-dictionary cluster (:mod:`ccim_lightning.commands.dictionary_contexts`, where
  the torch side lives).

Both feed :func:`~ccim_lightning.analysis.statistics.compute_bias_report`.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["ContextLabels", "label_matrix", "read_annotation_table"]

log = logging.getLogger(__name__)


@dataclass
class ContextLabels:
    """Context values and labels of a dataset's samples, the input of ``compute_bias_report``.

    Attributes:
        contexts: (n,) context value per sample.
        labels: (n, C) 0/1 matrix.
        emotion_names: C names.
        multi_label: Whether a sample can show several emotions.
        context_name: What the context is.
    """

    contexts: np.ndarray
    labels: np.ndarray
    emotion_names: list[str]
    multi_label: bool
    context_name: str


def read_annotation_table(
    path: str | os.PathLike, context_column: str, label_column: str, *, emotion_names: Sequence[str] | None = None
) -> ContextLabels:
    """Reads context values and labels from an annotation table (CSV, or TSV by its ``.tsv`` suffix); no images.

    A label cell is either a Python list literal of names (``"['Engagement', 'Happiness']"``, EMOTIC's CSV form:
    multi-label) or a single name or class id (single-label). Every cell of the column must be of the same kind.

    Args:
        path: The table.
        context_column: Column holding the context value (e.g. ``Folder``).
        label_column: Column holding the label(s) (e.g. ``Categorical_Labels``).
        emotion_names: Order (and completeness) of the emotions; default: the sorted distinct labels. For EMOTIC
            the sorted order is the canonical one.

    Returns:
        The samples' contexts and labels.

    Raises:
        FileNotFoundError: No such file.
        KeyError: A column is missing (the message lists the columns that exist).
        ValueError: A label cell cannot be read, or a label is not among ``emotion_names``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Annotation table {str(path)!r} does not exist.")
    table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    for column in (context_column, label_column):
        if column not in table.columns:
            raise KeyError(
                f"Annotation table {str(path)!r} has no column {column!r}; its columns: {list(table.columns)}."
            )
    cells = [_parse_label_cell(value, path, label_column, row) for row, value in enumerate(table[label_column])]
    kinds = {isinstance(cell, list) for cell in cells}
    if len(kinds) > 1:
        raise ValueError(
            f"Column {label_column!r} of {str(path)!r} mixes list cells (multi-label) with single labels; use one form."
        )
    multi_label = kinds == {True}
    samples = cells if multi_label else [[cell] for cell in cells]
    names = _emotion_names(samples, emotion_names, path, label_column)
    return ContextLabels(
        table[context_column].to_numpy(object), _multi_hot(samples, names), names, multi_label, context_column
    )


def _multi_hot(samples: list[list[str]], names: list[str]) -> np.ndarray:
    """(n, C) 0/1 matrix of the samples' label lists."""
    column = {name: i for i, name in enumerate(names)}
    rows = [i for i, labels in enumerate(samples) for _ in labels]
    columns = [column[label] for labels in samples for label in labels]
    matrix = np.zeros((len(samples), len(names)))
    matrix[rows, columns] = 1.0
    return matrix


def _parse_label_cell(value: str, path: Path, column: str, row: int) -> list[str] | str:
    """A list of names for a list literal, else the stripped string."""
    text = value.strip()
    if not text:
        raise ValueError(f"Row {row} (0-based, after the header) of {str(path)!r} has an empty {column!r} cell.")
    if not text.startswith("["):
        return text
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"Row {row} of {str(path)!r}: cannot read the {column!r} cell {text!r} as a list.") from exc
    if not isinstance(parsed, list):
        raise ValueError(f"Row {row} of {str(path)!r}: the {column!r} cell {text!r} is not a list.")
    return [str(label) for label in parsed]


def _emotion_names(samples: list[list[str]], given: Sequence[str] | None, path: Path, column: str) -> list[str]:
    """The given names (checked to cover every label) or the sorted distinct labels."""
    seen = sorted({label for labels in samples for label in labels}, key=_natural_key)
    if given is None:
        return seen
    unknown = sorted(set(seen) - set(given))
    if unknown:
        raise ValueError(f"Labels {unknown} in column {column!r} of {str(path)!r} are not among the emotion names.")
    return list(given)


def _natural_key(label: str) -> tuple[int, float, str]:
    """Numbers in numeric order before text in alphabetical order."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def label_matrix(targets: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, bool]:
    """(n, C) 0/1 labels from class ids (single-label) or multi-hot rows (multi-label, present where > 0.5).

    Args:
        targets: (n,) integer class ids or (n, C) multi-hot scores.
        num_classes: C for class ids; default: the largest id + 1.

    Returns:
        The matrix and whether the labels are multi-label.

    Raises:
        ValueError: A class id outside ``0..num_classes - 1``.
    """
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return (targets > 0.5).astype(np.float64), True
    classes = targets.astype(np.int64)
    num_classes = num_classes or (int(classes.max()) + 1 if classes.size else 0)
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"Class targets {int(classes.min())}..{int(classes.max())} are outside 0..{num_classes - 1} "
            "(the datamodule's num_classes)."
        )
    return np.eye(num_classes)[classes], False
