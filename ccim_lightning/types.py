"""The contracts every layer relies on: the task, the batch schema, and the Protocols of datasets, datamodules, models.

This is the bottom layer: it imports nothing of the project, so any module may import it.

Batch schema, a dict of tensors (``B`` samples; one sample is the same without the leading ``B``):

- :data:`SUBJECT` float32 (B, 3, Hs, Ws): the person's box (face or body), resized.
- :data:`CONTEXT` float32 (B, 3, Hc, Wc): the whole image, normalised, with the subject box filled with zeros.
- :data:`TARGET`: int64 (B,) class indices (``task == "multiclass"``) or float32 (B, C) multi-hot (``"multilabel"``).
- :data:`INDEX` int64 (B,): position of each sample in its split (ties predictions and dictionary clusters to rows).
- :data:`BOX` float32 (B, 4): x1, y1, x2, y2 in original image pixels (after clipping and any flip).
- extras, dataset-specific: :data:`VAD` float32 (B, 3) for EMOTIC, :data:`SCENE` int64 (B,) for the synthetic data.

Code that makes batches and code that reads them both spell a key through these constants, so renaming one fails at
import time (or as a ``KeyError`` naming the constant's value) instead of silently reading a stale key. The
:class:`Sample` and :class:`Batch` ``TypedDict`` s document shapes and dtypes for readers and type checkers; their keys
are the constants' values (a test keeps the two in step).

The Protocols are ``runtime_checkable``: ``isinstance(obj, DictionaryDataModule)`` checks that the members exist (not
their signatures), so a caller can raise a clear error naming what is missing (:func:`missing_members`).
"""

from typing import Any, Final, Generic, Literal, Protocol, TypedDict, get_args, runtime_checkable

import pandas as pd
import torch
from torch.utils.data import Dataset
from typing_extensions import NotRequired

Task = Literal["multiclass", "multilabel"]
"""``"multiclass"``: one label per sample (cross-entropy, top-1 accuracy); ``"multilabel"``: multi-hot targets."""
TASKS: tuple[str, ...] = get_args(Task)


def check_task(task: object, *, where: str) -> Task:
    """Returns ``task`` when it is a :data:`Task`, else raises naming the value and the place it came from.

    Args:
        task: The value to check.
        where: Who received it, for the message (e.g. ``"CCIMLightningModule(task=...)"``).

    Raises:
        ValueError: When ``task`` is not one of :data:`TASKS`.
    """
    if task not in TASKS:
        raise ValueError(f"{where}: task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
    return task  # type: ignore[return-value]


SUBJECT: Final = "subject"
CONTEXT: Final = "context"
TARGET: Final = "target"
INDEX: Final = "index"
BOX: Final = "box"
VAD: Final = "vad"
SCENE: Final = "scene"
BATCH_KEYS: tuple[str, ...] = (SUBJECT, CONTEXT, TARGET, INDEX, BOX)
"""Keys every sample and batch has; datasets may add extras (:data:`EXTRA_KEYS`)."""
EXTRA_KEYS: tuple[str, ...] = (VAD, SCENE)
"""Extras of the shipped datamodules: ``vad`` (EMOTIC valence/arousal/dominance), ``scene`` (synthetic)."""
MASK_BOX: Final = "mask_box"
"""Extra of an ``output="uint8"`` sample: int64 (4,) context-pixel box to fill, removed by the device hook that
normalises the batch (so it never reaches a model)."""
PROBABILITIES: Final = "probabilities"
"""Key of ``predict_step``'s (B, C) class probabilities; its other key is :data:`INDEX`, the samples' positions."""


class Sample(TypedDict):
    """One sample as a dataset returns it (the batch's entries without the leading ``B``)."""

    subject: torch.Tensor  # float32 (3, Hs, Ws)
    context: torch.Tensor  # float32 (3, Hc, Wc), subject box zeroed
    target: torch.Tensor  # int64 () class index, or float32 (C,) multi-hot
    index: torch.Tensor  # int64 (): position in the split
    box: torch.Tensor  # float32 (4,): x1, y1, x2, y2 in original pixels
    vad: NotRequired[torch.Tensor]  # float32 (3,), EMOTIC only
    scene: NotRequired[torch.Tensor]  # int64 (), synthetic data only


class Batch(TypedDict):
    """A collated batch of ``B`` samples, what every loader yields and the model, methods and writers read."""

    subject: torch.Tensor  # float32 (B, 3, Hs, Ws)
    context: torch.Tensor  # float32 (B, 3, Hc, Wc), subject box zeroed
    target: torch.Tensor  # int64 (B,) class indices, or float32 (B, C) multi-hot
    index: torch.Tensor  # int64 (B,)
    box: torch.Tensor  # float32 (B, 4)
    vad: NotRequired[torch.Tensor]  # float32 (B, 3), EMOTIC only
    scene: NotRequired[torch.Tensor]  # int64 (B,), synthetic data only


@runtime_checkable
class TabulatedDataset(Protocol):
    """A dataset that can list its samples as a table (the identity columns of prediction files)."""

    def sample_table(self) -> pd.DataFrame:
        """One row per sample in index order: the columns that identify it (e.g. image path and box)."""
        ...


@runtime_checkable
class IdentifiedDataset(TabulatedDataset, Protocol):
    """A dataset whose samples can be named: for the dictionary cache fingerprint and for prediction files."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any] | None: ...

    def sample_identities(self) -> list[str]:
        """One stable string per sample, in index order; changes when the sample's content may have changed."""
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


@runtime_checkable
class DictionaryModel(Protocol):
    """What the confounder dictionary callback (and ``ccim build-dictionary``) needs of a model.

    Attributes:
        needs_dictionary: Whether anything in the model reads the dictionary (CCIM attention or a cluster method).
        has_dictionary: Whether the dictionary is already filled (restored from a checkpoint or set by hand).
        dictionary_shape: ``(num_prototypes, dim)`` the dictionary must have.
    """

    needs_dictionary: bool
    has_dictionary: bool
    dictionary_shape: tuple[int, int]

    def set_dictionary(self, dictionary: Any) -> None:
        """Fills the model's prototypes, priors and per-sample clusters from a ``ConfounderDictionary``."""
        ...


@runtime_checkable
class ClassifierModel(Protocol):
    """A model that says what it classifies (the prediction writer names its columns from it).

    Attributes:
        task: ``"multiclass"`` or ``"multilabel"``.
        num_classes: Number of classes.
        class_names: Class names in target order.
    """

    task: Task
    num_classes: int
    class_names: list[str]


@runtime_checkable
class FeatureBackbone(Protocol):
    """A host backbone that states the width ``d_h`` of the feature its ``forward(batch)`` returns."""

    feature_dim: int


@runtime_checkable
class ReducibleLoss(Protocol):
    """A loss module with a ``reduction`` setting (``"none"`` gives per-element losses, as the debias methods need)."""

    reduction: str


@runtime_checkable
class NamedTestSets(Protocol):
    """A datamodule whose test dataloaders have names (``test_<name>/...`` metrics instead of ``test_<i>/...``)."""

    test_set_names: list[str]


@runtime_checkable
class DescribedTransform(Protocol):
    """A transform that describes itself for the dictionary cache key (``ContextTransform.signature``)."""

    def signature(self) -> dict[str, Any]:
        """A JSON-able dict of every setting that changes the pixels it produces."""
        ...


@runtime_checkable
class NormalizingTransform(Protocol):
    """A transform that normalises pixels as ``(x / 255 - mean) / std`` per channel (on the [0, 1] scale)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@runtime_checkable
class ReducingTransform(NormalizingTransform, Protocol):
    """A ``ContextTransform``-style transform: it can work from a reduced JPEG decode and give uint8 pixels.

    Its ``__call__`` takes ``reduction=``, ``full_size=``, ``uint8=`` and ``reduce_context=`` besides the image and
    box; :meth:`decode_reductions` says how far each person's image may be reduced.

    Attributes:
        subject_size: (height, width) of the subject crop (with the context size it sets the reductions).
    """

    subject_size: tuple[int, int]

    def decode_reductions(self, sizes: Any, boxes: Any, localised: Any) -> Any:
        """Per person, the largest DCT reduction (1, 2, 4 or 8) that keeps both outputs at full detail."""
        ...


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` (and of the Protocols it extends) that ``obj`` lacks, sorted.

    Empty exactly when ``isinstance(obj, protocol)`` holds for a ``runtime_checkable`` protocol.
    """
    members: list[str] = []
    for cls in protocol.__mro__:
        if cls in (Protocol, Generic, object):
            continue
        body = vars(cls)
        members += [*body.get("__annotations__", {})]
        members += [name for name, value in body.items() if callable(value) and (name in _DUNDERS or name[0] != "_")]
    return sorted({name for name in members if not hasattr(obj, name)})


_DUNDERS = ("__len__", "__getitem__")
