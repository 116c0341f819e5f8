"""``PredictionWriter``: ``ccim predict`` results as one CSV file, one row per sample, in sample order.

Columns, left to right:

- ``index`` and the identity columns. If the prediction dataset has a method ``sample_table()`` returning a
  ``pandas.DataFrame`` with one row per sample, in index order (e.g. ``image, x1, y1, x2, y2``), its columns are
  copied; an ``index`` column, if it has one, must be ``0 .. len - 1``. Otherwise ``index`` alone (the batch's
  ``index``, the sample's position in its split).
- One probability column per class, under the class's name.
- ``prediction``: the most probable class (multiclass), or every class at or above ``threshold`` joined by ``"|"``
  (multilabel; empty when none is).
- The ground truth, when the split's batches carry a ``target``: ``target`` (the class name) and
  ``target_index`` (its index) for a multiclass model; ``target`` (the true labels joined by ``"|"``, like
  ``prediction``) and one 0/1 column ``true_<class>`` per class for a multilabel one. Batches without a
  ``target`` give a table without these columns.

Where: by default ``<run folder>/predictions/<dataset>.csv`` (:func:`default_predictions_path`), the run folder
being ``trainer.log_dir`` (the logger's version folder, or ``default_root_dir`` without a logger). An existing
file is never overwritten silently: the run stops before predicting, with an error that names the file, unless
the writer has ``overwrite=True``.

Under DDP every rank predicts its own shard; the shards are gathered to rank 0 (tensor collectives on every rank,
no shared filesystem needed), the sampler's padding repeats are dropped by ``index``, and rank 0 writes the file
and logs its path once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from ccim_lightning.arguments import check_optional_float
from ccim_lightning.checkpoints import atomic_write
from ccim_lightning.sample_index import first_of_each_index
from ccim_lightning.thresholds import DEFAULT_THRESHOLD
from ccim_lightning.types import (
    INDEX,
    PROBABILITIES,
    TARGET,
    ClassifierModel,
    TabulatedDataset,
    check_task,
    missing_members,
)

__all__ = ["PredictionWriter", "dataset_file_stem", "default_predictions_path", "predictions_frame"]

log = logging.getLogger(__name__)

#: Name of the CSV column with the predicted label(s).
PREDICTION_COLUMN = "prediction"
#: Name of the CSV column with the true label(s).
TARGET_COLUMN = TARGET
#: Name of the CSV column with a multiclass sample's true class index.
TARGET_INDEX_COLUMN = "target_index"
#: Prefix of a multilabel model's per-class 0/1 ground-truth columns.
TRUE_PREFIX = "true_"
#: Separator of the labels of a multilabel prediction or target.
LABEL_SEPARATOR = "|"

# What a rank's batches carry as `target` (exchanged between ranks so all agree on the columns).
_NO_ROWS, _NO_TARGET, _CLASS_INDEX, _MULTI_HOT, _MIXED = -1, 0, 1, 2, 3


def predictions_frame(
    index: np.ndarray | torch.Tensor,
    probabilities: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    task: str = "multiclass",
    threshold: float | Sequence[float] | np.ndarray = 0.5,
    sample_table: pd.DataFrame | None = None,
    target: np.ndarray | torch.Tensor | None = None,
) -> pd.DataFrame:
    """Builds the predictions table: one row per distinct ``index``, sorted by it.

    Args:
        index: (M,) sample indices; repeats (a distributed sampler's padding) are dropped, keeping the first.
        probabilities: (M, C) class probabilities, row ``i`` for sample ``index[i]``.
        class_names: The C class names: the probability columns' names.
        task: ``"multiclass"`` (the prediction is the arg-max class) or ``"multilabel"`` (every class with a
            probability of at least ``threshold``, joined by ``"|"``).
        threshold: Decision threshold of multilabel predictions: one for every class, or one per class (C,).
        sample_table: Identity columns, one row per sample of the dataset in index order (see the module
            docstring); None for ``index`` alone.
        target: The ground truth, row ``i`` for sample ``index[i]``: (M,) class indices (multiclass) or (M, C)
            0/1 multi-hot (multilabel); None when the split has no labels.

    Returns:
        Columns ``index``, the sample table's other columns, one per class, ``prediction``, and with a ``target``
        the ground-truth columns of the module docstring.

    Raises:
        ValueError: On inconsistent shapes, an index outside the sample table, a target that is not a class index
            / 0-1 value, or a column name used twice.
    """
    index = torch.as_tensor(index).long().cpu().numpy().reshape(-1)
    probabilities = torch.as_tensor(probabilities).float().cpu().numpy()
    if probabilities.ndim != 2 or probabilities.shape[0] != index.shape[0]:
        raise ValueError(f"probabilities must be (M, C) for M={index.shape[0]} indices, got {probabilities.shape}")
    class_names = [str(name) for name in class_names]
    if len(class_names) != probabilities.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {probabilities.shape[1]} probability columns")
    check_task(task, where="predictions_frame")
    threshold = np.asarray(threshold, dtype=np.float64)
    if threshold.ndim > 1 or (threshold.ndim == 1 and threshold.shape != (len(class_names),)):
        raise ValueError(f"threshold must be one number or one per class ({len(class_names)}), got {threshold.shape}")

    if target is not None:
        target = torch.as_tensor(target).cpu().numpy()
        if target.ndim == 0 or target.shape[0] != index.shape[0]:
            raise ValueError(f"target must have one row per index (M={index.shape[0]}), got {target.shape}")

    first = first_of_each_index(index)  # sorted distinct indices, first occurrence of each
    index, probabilities = index[first], probabilities[first]
    names = np.asarray(class_names, dtype=object)
    truth = None if target is None else _truth_columns(target[first], index, names, task)

    frame = _identity_columns(index, sample_table)
    generated = [*class_names, PREDICTION_COLUMN, *([] if truth is None else truth.columns)]
    clashes = sorted(set(frame.columns) & set(generated))
    if clashes or len(set(generated)) != len(generated):
        raise ValueError(
            f"Cannot name the CSV columns: class names {class_names} repeat each other or clash with the identity "
            f"columns {list(frame.columns)} or the generated columns {PREDICTION_COLUMN!r}, {TARGET_COLUMN!r}, "
            f"{TARGET_INDEX_COLUMN!r}, '{TRUE_PREFIX}<class>' ({clashes}). Rename the classes (class_names) or the "
            "sample_table() columns."
        )
    frame = pd.concat([frame, pd.DataFrame(probabilities, columns=class_names)], axis=1)
    if task == "multiclass":
        labels = names[probabilities.argmax(axis=1)] if len(index) else []
    else:
        labels = [LABEL_SEPARATOR.join(names[row >= threshold]) for row in probabilities]
    frame[PREDICTION_COLUMN] = pd.Series(labels, dtype=object)
    return frame if truth is None else pd.concat([frame, truth], axis=1)


def _truth_columns(target: np.ndarray, index: np.ndarray, names: np.ndarray, task: str) -> pd.DataFrame:
    """The ground-truth columns of the samples ``index`` (``target`` row ``i`` for sample ``index[i]``)."""
    num_classes = len(names)
    if task == "multiclass":
        if target.ndim != 1 or not np.issubdtype(target.dtype, np.integer):
            raise ValueError(
                f"A multiclass target must be (M,) integer class indices, got {target.dtype} {tuple(target.shape)}; "
                "is the model's task right (multilabel targets are (M, C) multi-hot)?"
            )
    elif target.ndim != 2 or target.shape[1] != num_classes:
        raise ValueError(
            f"A multilabel target must be (M, {num_classes}) multi-hot, got {target.dtype} {tuple(target.shape)}"
        )
    if task == "multiclass":
        bad = np.flatnonzero((target < 0) | (target >= num_classes))
        if len(bad):
            raise ValueError(
                f"Sample {index[bad[0]]} has target {target[bad[0]]}, not a class index in 0 .. {num_classes - 1} "
                f"({len(bad)} such samples); check the dataset's labels and the model's num_classes"
            )
        return pd.DataFrame(
            {TARGET_COLUMN: pd.Series(names[target], dtype=object), TARGET_INDEX_COLUMN: target.astype(np.int64)}
        )
    bad = np.flatnonzero(((target != 0) & (target != 1)).any(axis=1))
    if len(bad):
        raise ValueError(
            f"Sample {index[bad[0]]} has multilabel target {target[bad[0]].tolist()}: values must be 0 or 1 "
            f"({len(bad)} such samples); soft labels cannot be written as ground truth"
        )
    hot = target.astype(bool)
    columns = {TARGET_COLUMN: pd.Series([LABEL_SEPARATOR.join(names[row]) for row in hot], dtype=object)}
    columns.update({f"{TRUE_PREFIX}{name}": hot[:, c].astype(np.int64) for c, name in enumerate(names)})
    return pd.DataFrame(columns)


def _identity_columns(index: np.ndarray, sample_table: pd.DataFrame | None) -> pd.DataFrame:
    """``index`` plus the sample table's rows at those indices."""
    ids = pd.DataFrame({INDEX: index})
    if sample_table is None:
        return ids
    table = sample_table.reset_index(drop=True)
    if INDEX in table.columns:
        if not np.array_equal(table[INDEX].to_numpy(), np.arange(len(table))):
            raise ValueError(
                "sample_table() must list the samples in index order: its `index` column is not 0 .. len - 1"
            )
        table = table.drop(columns=INDEX)
    if len(index) and (index.min() < 0 or index.max() >= len(table)):
        raise ValueError(
            f"Predicted sample indices span {index.min()} .. {index.max()} but sample_table() has {len(table)} rows: "
            "it must have one row per sample of the prediction dataset"
        )
    return pd.concat([ids, table.iloc[index].reset_index(drop=True)], axis=1)


def dataset_file_stem(datamodule: L.LightningDataModule | None) -> str:
    """The file name of a datamodule's predictions: its class name in snake case, less ``DataModule``.

    ``EmoticDataModule`` -> ``emotic``, ``SyntheticContextDataModule`` -> ``synthetic_context``; ``predictions``
    without a datamodule (dataloaders given to ``trainer.predict`` directly).
    """
    if datamodule is None:
        return "predictions"
    name = re.sub(r"DataModule$", "", type(datamodule).__name__) or type(datamodule).__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def default_predictions_path(trainer: L.Trainer, dataset: str | None = None) -> Path:
    """Where :class:`PredictionWriter` writes without a ``path``: ``<run folder>/predictions/<dataset>.csv``.

    The run folder is ``trainer.log_dir`` (the logger's version folder; ``default_root_dir`` without a logger).
    ``trainer.log_dir`` is a collective under DDP: call this on every rank.

    Args:
        trainer: The trainer of the prediction run.
        dataset: The file's stem; default :func:`dataset_file_stem` of ``trainer.datamodule``.

    Returns:
        The CSV path (a prediction run with several dataloaders numbers it: ``<dataset>_<i>.csv``).
    """
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / "predictions" / f"{dataset or dataset_file_stem(trainer.datamodule)}.csv"


def _as_list(loaders: Any) -> list:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, Sequence) else [loaders]


def _numbered(path: Path, loader_idx: int, num_loaders: int) -> Path:
    return path.with_name(f"{path.stem}_{loader_idx}{path.suffix}") if num_loaders > 1 else path


def _target_kind(target: torch.Tensor | None) -> int:
    if target is None:
        return _NO_TARGET
    return _CLASS_INDEX if target.ndim == 1 else _MULTI_HOT


class PredictionWriter(BasePredictionWriter):
    """Writes ``trainer.predict`` results to a CSV file (see the module docstring for the columns and the path).

    Expects ``predict_step`` to return ``{"index": (B,), "probabilities": (B, C)}`` (as
    :class:`~ccim_lightning.CCIMLightningModule` does); the ground truth is the batch's ``target``. The class
    names and the task come from the module's ``task``, ``num_classes`` and ``class_names`` attributes (a
    :class:`~ccim_lightning.types.ClassifierModel`); a module without them gets ``class_0`` ... and multiclass, with
    a warning naming what it lacks.

    With several prediction dataloaders, loader ``i`` goes to ``<stem>_<i><suffix>``.

    Args:
        path: The CSV file; default :func:`default_predictions_path` (inside the run's folder). Parent folders
            are created.
        threshold: Decision threshold of multilabel predictions (a class is predicted when its probability is at
            least this). Default: the model's per-class ``decision_thresholds`` (chosen on the validation split
            during fitting, ``ccim_lightning.thresholds``), and 0.5 for a class (or a model) without one.
        overwrite: Replace an existing file. Without it, a prediction run whose file exists stops before
            predicting, with an error naming the file.

    Attributes:
        written: The files written by the last prediction run (filled on rank 0 only).
    """

    def __init__(self, path: str | None = None, threshold: float | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch_and_epoch")
        check_optional_float(type(self).__name__, "threshold", threshold, 0.0, 1.0)
        self.path = Path(path) if path else None
        self.threshold = threshold
        self.overwrite = overwrite
        self.written: list[Path] = []
        self._paths: list[Path] = []
        self._parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, ClassifierModel):
            rank_zero_warn(
                f"PredictionWriter: {type(pl_module).__name__} lacks {missing_members(pl_module, ClassifierModel)}; "
                "the CSV uses the defaults (task 'multiclass', columns class_0, class_1, ...). Give the module "
                "task, num_classes and class_names (as CCIMLightningModule has) to name them."
            )
        # Decided before predicting, so a refused file costs nothing; every rank takes part (log_dir, broadcast).
        base = self.path if self.path is not None else default_predictions_path(trainer)
        num_loaders = len(_as_list(trainer.predict_dataloaders))
        self._paths = [_numbered(base, i, num_loaders) for i in range(num_loaders)]
        existing = [str(p) for p in self._paths if p.exists()] if trainer.is_global_zero else None
        existing = trainer.strategy.broadcast(existing)  # rank 0 answers the file-system question for all
        if existing and not self.overwrite:
            raise FileExistsError(
                f"PredictionWriter: {', '.join(existing)} already exists and is not overwritten. Give the writer "
                "another `path`, or set its `overwrite: true` to replace the file."
            )

    @override
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = {}
        self.written = []

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, Mapping) or PROBABILITIES not in prediction:
            raise TypeError(
                f"PredictionWriter needs predict_step to return a dict with 'probabilities' (B, C) and 'index' (B,), "
                f"got {type(prediction).__name__}"
            )
        index = prediction[INDEX] if INDEX in prediction else batch[INDEX]
        if index.numel() == 0:  # a batch whose every sample failed to decode (skip mode): no rows, no target kind
            return
        target = batch.get(TARGET) if isinstance(batch, Mapping) else None
        if target is not None:  # class indices stay integers, multi-hot rows float (checked when the table is made)
            target = target.detach().cpu()
            target = target.long() if target.ndim == 1 and not target.is_floating_point() else target.float()
        self._parts.setdefault(dataloader_idx, []).append(
            (index.detach().long().reshape(-1).cpu(), prediction[PROBABILITIES].detach().float().cpu(), target)
        )

    @override
    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Any
    ) -> None:
        loaders = _as_list(trainer.predict_dataloaders)
        for loader_idx, loader in enumerate(loaders):  # every rank runs the same collectives, in the same order
            index, probabilities, target = self._merged(trainer, pl_module, loader_idx)
            if not trainer.is_global_zero:
                continue
            table = self._sample_table(loader)
            frame = predictions_frame(
                index,
                probabilities,
                self._class_names(pl_module, probabilities.shape[1]),
                task=pl_module.task if isinstance(pl_module, ClassifierModel) else "multiclass",
                threshold=self._threshold(pl_module, probabilities.shape[1]),
                sample_table=table,
                target=target,
            )
            path = self._paths[loader_idx]
            with atomic_write(path, "w", newline="") as f:  # a failed write keeps the old file, leaves no partial
                frame.to_csv(f, index=False)
            self.written.append(path)
            log.info("Predictions for %d samples written to %s", len(frame), path)
            if table is not None and len(frame) < len(table):
                log.warning(
                    "%s: %d of the dataset's %d samples have no prediction (left out by the dataset, e.g. "
                    "on_bad_sample='skip', or by limit_predict_batches)",
                    path,
                    len(table) - len(frame),
                    len(table),
                )
        self._parts = {}
        trainer.strategy.barrier("PredictionWriter")

    def _threshold(self, pl_module: L.LightningModule, num_classes: int) -> float | np.ndarray:
        """The writer's threshold, else the model's per-class ``decision_thresholds`` (0.5 until chosen), else 0.5."""
        if self.threshold is not None:
            return self.threshold
        chosen = getattr(pl_module, "decision_thresholds", None)
        if not isinstance(chosen, torch.Tensor) or chosen.shape != (num_classes,):
            return DEFAULT_THRESHOLD
        return chosen.detach().double().cpu().numpy()

    def _merged(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loader_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every rank's ``(index, probabilities, target or None)`` of one loader (a collective under DDP)."""
        parts = self._parts.get(loader_idx, [])
        kinds = {_target_kind(t) for _, _, t in parts}
        kind = _NO_ROWS if not parts else (kinds.pop() if len(kinds) == 1 else _MIXED)
        if parts:
            num_classes = parts[0][1].shape[1]
        else:  # this rank predicted nothing: the module's width, agreed with the other ranks below
            num_classes = pl_module.num_classes if isinstance(pl_module, ClassifierModel) else 0
        index = torch.cat([i for i, _, _ in parts]) if parts else torch.zeros(0, dtype=torch.long)
        probabilities = torch.cat([p for _, p, _ in parts]) if parts else torch.zeros(0, num_classes)
        target = torch.cat([t for _, _, t in parts]) if kind in (_CLASS_INDEX, _MULTI_HOT) else None
        width = target.shape[1] if kind == _MULTI_HOT else 0

        strategy = trainer.strategy
        if trainer.world_size > 1:  # ranks may hold different numbers of rows: exchange the shapes first
            sizes = strategy.all_gather(
                torch.tensor([index.shape[0], num_classes, kind, width], device=strategy.root_device)
            ).view(-1, 4)
            kinds = set(sizes[:, 2].tolist()) - {_NO_ROWS}
            rows, num_classes, width = int(sizes[:, 0].max()), int(sizes[:, 1].max()), int(sizes[:, 3].max())
        else:
            kinds, rows = {kind} - {_NO_ROWS}, index.shape[0]
        if len(kinds) > 1 or _MIXED in kinds:  # the same answer on every rank: all raise together
            raise ValueError(
                f"PredictionWriter: the batches of prediction dataloader {loader_idx} disagree on `target` (some have "
                "none, some (B,) class indices, some (B, C) multi-hot); a split's samples must all have a label or "
                "none"
            )
        kind = kinds.pop() if kinds else _NO_TARGET
        if trainer.world_size == 1:
            return index, probabilities, target

        if not parts:  # this rank predicted nothing: empty pieces of the agreed shapes
            probabilities = torch.zeros(0, num_classes)
            if kind == _CLASS_INDEX:
                target = torch.zeros(0, dtype=torch.long)
            elif kind == _MULTI_HOT:
                target = torch.zeros(0, width)
        all_index = self._gather_rows(strategy, index, rows, fill=-1)
        keep = all_index >= 0  # the padding rows
        all_probabilities = self._gather_rows(strategy, probabilities, rows)[keep]
        all_target = None if target is None else self._gather_rows(strategy, target, rows)[keep]
        return all_index[keep], all_probabilities, all_target

    @staticmethod
    def _gather_rows(strategy: Any, tensor: torch.Tensor, rows: int, fill: float = 0) -> torch.Tensor:
        """Every rank's ``tensor`` (rows first), each padded with ``fill`` to ``rows``, concatenated in rank order."""
        padded = torch.full((rows, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=strategy.root_device)
        padded[: tensor.shape[0]] = tensor.to(padded.device)
        return strategy.all_gather(padded).reshape(-1, *tensor.shape[1:]).cpu()

    @staticmethod
    def _class_names(pl_module: L.LightningModule, num_classes: int) -> list[str]:
        if isinstance(pl_module, ClassifierModel) and len(pl_module.class_names) == num_classes:
            return list(pl_module.class_names)
        return [f"class_{i}" for i in range(num_classes)]

    @staticmethod
    def _sample_table(loader: Any) -> pd.DataFrame | None:
        dataset = loader.dataset if isinstance(loader, DataLoader) else None
        if not isinstance(dataset, TabulatedDataset):  # the table is optional: without it the CSV has `index` alone
            return None
        table = dataset.sample_table()
        if not isinstance(table, pd.DataFrame):
            raise TypeError(
                f"{type(dataset).__name__}.sample_table() returned {type(table).__name__}, not a pandas DataFrame"
            )
        return table
