"""The datamodule contracts: the batch keys and what callers (the dictionary callback, the CLI) need.

Batch schema, a dict of tensors (``B`` samples):

- ``subject`` float32 (B, 3, Hs, Ws): the person's box (face or body), resized.
- ``context`` float32 (B, 3, Hc, Wc): the whole image, normalised, with the subject box filled with zeros.
- ``target``: int64 (B,) class indices (``task == "multiclass"``) or float32 (B, C) multi-hot (``"multilabel"``).
- ``index`` int64 (B,): position of each sample in its split (ties predictions and dictionary clusters to rows).
- ``box`` float32 (B, 4): x1, y1, x2, y2 in original image pixels (after clipping and any flip).
- extras, dataset-specific: ``vad`` float32 (B, 3) for EMOTIC, ``scene`` int64 (B,) for the synthetic data.

The protocols are ``runtime_checkable``: ``isinstance(datamodule, DictionaryDataModule)`` checks that the members
exist (not their signatures), so a caller can raise a clear error naming what is missing (:func:`missing_members`).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import pandas as pd
from torch.utils.data import Dataset

SUBJECT, CONTEXT, TARGET, INDEX, BOX = "subject", "context", "target", "index", "box"
BATCH_KEYS: tuple[str, ...] = (SUBJECT, CONTEXT, TARGET, INDEX, BOX)
"""Keys every batch has; datasets may add extras (:data:`EXTRA_KEYS`)."""
EXTRA_KEYS: tuple[str, ...] = ("vad", "scene")
"""Extras of the shipped datamodules: ``vad`` (EMOTIC valence/arousal/dominance), ``scene`` (synthetic)."""
Task = Literal["multiclass", "multilabel"]


@runtime_checkable
class IdentifiedDataset(Protocol):
    """A dataset whose samples can be named: for the dictionary cache fingerprint and for prediction files."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any] | None: ...

    def sample_identities(self) -> list[str]:
        """One stable string per sample, in index order; changes when the sample's content may have changed."""
        ...

    def sample_table(self) -> pd.DataFrame:
        """One row per sample in index order: the columns that identify it (e.g. image path and box)."""
        ...


@runtime_checkable
class DictionaryDataModule(Protocol):
    """What the confounder dictionary callback and the CLI need from a datamodule.

    Attributes:
        num_classes: Number of classes.
        task: ``"multiclass"`` or ``"multilabel"``.
        class_names: Class names in target order.
        batch_size: Batch size of its loaders (the default of the dictionary loader).
        num_workers: Loader worker processes (the default of the dictionary loader).
    """

    num_classes: int
    task: Task
    class_names: list[str]
    batch_size: int
    num_workers: int

    def dictionary_dataset(self, mask_subject: bool = True) -> Dataset:
        """The training split in a fixed order with evaluation transforms (an :class:`IdentifiedDataset`)."""
        ...

    def dictionary_signature(self) -> dict[str, Any]:
        """A JSON-able dict of everything that changes the dictionary's input pixels (size, normalisation, ...)."""
        ...


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (empty when ``isinstance(obj, protocol)``)."""
    body = vars(protocol)
    members = [*body.get("__annotations__", {})]
    members += [name for name, value in body.items() if callable(value) and (name in _DUNDERS or name[0] != "_")]
    return sorted(name for name in members if not hasattr(obj, name))


_DUNDERS = ("__len__", "__getitem__")
