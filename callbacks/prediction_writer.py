"""``PredictionWriter``: ``ccim predict`` results as one CSV file, one row per sample, in sample order.

Each row holds the sample's identity columns, the probability of every class under the class's name, and the
predicted label(s) in the ``prediction`` column: the most probable class for a multiclass model, every class at or
above ``threshold`` joined by ``"|"`` for a multilabel one (empty when none is).

Identity columns (the sample-table protocol): if the prediction dataset has a method ``sample_table()`` returning a
``pandas.DataFrame`` with one row per sample, in index order (e.g. columns ``image, x1, y1, x2, y2``), its columns
are copied into the CSV; an ``index`` column, if it has one, must be ``0 .. len - 1``. Otherwise the CSV identifies
samples by ``index`` alone (the batch's ``index``, the sample's position in its split).

Under DDP every rank predicts its own shard; the shards are gathered to rank 0 (a tensor collective on every rank,
no shared filesystem needed), the sampler's padding repeats are dropped by ``index``, and rank 0 writes the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter", "predictions_frame"]

log = logging.getLogger(__name__)

#: Name of the CSV column with the predicted label(s).
PREDICTION_COLUMN = "prediction"
#: Separator of the labels of a multilabel prediction.
LABEL_SEPARATOR = "|"


def predictions_frame(
    index: np.ndarray | torch.Tensor,
    probabilities: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    task: str = "multiclass",
    threshold: float = 0.5,
    sample_table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Builds the predictions table: one row per distinct ``index``, sorted by it.

    Args:
        index: (M,) sample indices; repeats (a distributed sampler's padding) are dropped, keeping the first.
        probabilities: (M, C) class probabilities, row ``i`` for sample ``index[i]``.
        class_names: The C class names: the probability columns' names.
        task: ``"multiclass"`` (the prediction is the arg-max class) or ``"multilabel"`` (every class with a
            probability of at least ``threshold``, joined by ``"|"``).
        threshold: Decision threshold of multilabel predictions.
        sample_table: Identity columns, one row per sample of the dataset in index order (see the module
            docstring); None for ``index`` alone.

    Returns:
        Columns ``index``, the sample table's other columns, one per class, ``prediction``.

    Raises:
        ValueError: On inconsistent shapes, an index outside the sample table, or a column name used twice.
    """
    index = torch.as_tensor(index).long().cpu().numpy().reshape(-1)
    probabilities = torch.as_tensor(probabilities).float().cpu().numpy()
    if probabilities.ndim != 2 or probabilities.shape[0] != index.shape[0]:
        raise ValueError(f"probabilities must be (M, C) for M={index.shape[0]} indices, got {probabilities.shape}")
    class_names = [str(name) for name in class_names]
    if len(class_names) != probabilities.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {probabilities.shape[1]} probability columns")
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")

    _, first = np.unique(index, return_index=True)  # sorted distinct indices, first occurrence of each
    index, probabilities = index[first], probabilities[first]

    frame = _identity_columns(index, sample_table)
    clashes = sorted(set(frame.columns) & {*class_names, PREDICTION_COLUMN})
    if clashes or len(set(class_names)) != len(class_names) or PREDICTION_COLUMN in class_names:
        raise ValueError(
            f"Cannot name the CSV columns: class names {class_names} repeat each other or clash with the identity "
            f"columns {list(frame.columns)} / {PREDICTION_COLUMN!r} ({clashes}). Rename the classes (class_names) "
            "or the sample_table() columns."
        )
    frame = pd.concat([frame, pd.DataFrame(probabilities, columns=class_names)], axis=1)
    names = np.asarray(class_names, dtype=object)
    if task == "multiclass":
        labels = names[probabilities.argmax(axis=1)] if len(index) else []
    else:
        labels = [LABEL_SEPARATOR.join(names[row >= threshold]) for row in probabilities]
    frame[PREDICTION_COLUMN] = pd.Series(labels, dtype=object)
    return frame


def _identity_columns(index: np.ndarray, sample_table: pd.DataFrame | None) -> pd.DataFrame:
    """``index`` plus the sample table's rows at those indices."""
    ids = pd.DataFrame({"index": index})
    if sample_table is None:
        return ids
    table = sample_table.reset_index(drop=True)
    if "index" in table.columns:
        if not np.array_equal(table["index"].to_numpy(), np.arange(len(table))):
            raise ValueError(
                "sample_table() must list the samples in index order: its `index` column is not 0 .. len - 1"
            )
        table = table.drop(columns="index")
    if len(index) and (index.min() < 0 or index.max() >= len(table)):
        raise ValueError(
            f"Predicted sample indices span {index.min()} .. {index.max()} but sample_table() has {len(table)} rows: "
            "it must have one row per sample of the prediction dataset"
        )
    return pd.concat([ids, table.iloc[index].reset_index(drop=True)], axis=1)


def _as_list(loaders: Any) -> list:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, Sequence) else [loaders]


class PredictionWriter(BasePredictionWriter):
    """Writes ``trainer.predict`` results to a CSV file (see the module docstring for the columns).

    Expects ``predict_step`` to return ``{"index": (B,), "probabilities": (B, C)}`` (as
    :class:`~ccim_lightning.CCIMLightningModule` does); the class names and the task come from the module's
    ``class_names`` and ``task`` attributes (default ``class_0`` ... and multiclass).

    With several prediction dataloaders, loader ``i`` goes to ``<stem>_<i><suffix>``.

    Args:
        path: The CSV file; default ``<trainer.default_root_dir>/predictions.csv``. Parent folders are created.
        threshold: Decision threshold of multilabel predictions (a class is predicted when its probability is at
            least this).

    Attributes:
        written: The files written by the last prediction run (filled on rank 0 only).
    """

    def __init__(self, path: str | None = None, threshold: float = 0.5) -> None:
        super().__init__(write_interval="batch_and_epoch")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.path = Path(path) if path else None
        self.threshold = threshold
        self.written: list[Path] = []
        self._parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = {}
        self.written = []

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
        if not isinstance(prediction, Mapping) or "probabilities" not in prediction:
            raise TypeError(
                f"PredictionWriter needs predict_step to return a dict with 'probabilities' (B, C) and 'index' (B,), "
                f"got {type(prediction).__name__}"
            )
        index = prediction["index"] if "index" in prediction else batch["index"]
        self._parts.setdefault(dataloader_idx, []).append(
            (index.detach().long().reshape(-1).cpu(), prediction["probabilities"].detach().float().cpu())
        )

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Any
    ) -> None:
        loaders = _as_list(trainer.predict_dataloaders)
        for loader_idx, loader in enumerate(loaders):  # every rank runs the same collectives, in the same order
            index, probabilities = self._gather(trainer, *self._local(loader_idx, pl_module))
            if not trainer.is_global_zero:
                continue
            frame = predictions_frame(
                index,
                probabilities,
                self._class_names(pl_module, probabilities.shape[1]),
                task=getattr(pl_module, "task", "multiclass"),
                threshold=self.threshold,
                sample_table=self._sample_table(loader),
            )
            path = self._path(trainer, loader_idx, len(loaders))
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(path, index=False)
            self.written.append(path)
            log.info("Predictions for %d samples written to %s", len(frame), path)
        self._parts = {}
        trainer.strategy.barrier("PredictionWriter")

    def _local(self, loader_idx: int, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self._parts.get(loader_idx, [])
        if not parts:  # this rank predicted nothing
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, int(getattr(pl_module, "num_classes", 0)))
        return torch.cat([i for i, _ in parts]), torch.cat([p for _, p in parts])

    @staticmethod
    def _gather(
        trainer: L.Trainer, index: torch.Tensor, probabilities: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' rows (ranks may hold different numbers: padded to the longest, then trimmed)."""
        if trainer.world_size == 1:
            return index, probabilities
        strategy = trainer.strategy
        device = strategy.root_device
        sizes = strategy.all_gather(torch.tensor([index.shape[0], probabilities.shape[1]], device=device)).view(-1, 2)
        rows, num_classes = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        padded_index = torch.full((rows,), -1, dtype=torch.long, device=device)
        padded_index[: index.shape[0]] = index.to(device)
        padded = torch.zeros(rows, num_classes, dtype=torch.float32, device=device)
        if probabilities.numel():
            padded[: probabilities.shape[0]] = probabilities.to(device)
        all_index = strategy.all_gather(padded_index).reshape(-1).cpu()
        all_probabilities = strategy.all_gather(padded).reshape(-1, num_classes).cpu()
        keep = all_index >= 0
        return all_index[keep], all_probabilities[keep]

    @staticmethod
    def _class_names(pl_module: L.LightningModule, num_classes: int) -> list[str]:
        names = getattr(pl_module, "class_names", None)
        if names is not None and len(names) == num_classes:
            return list(names)
        return [f"class_{i}" for i in range(num_classes)]

    @staticmethod
    def _sample_table(loader: Any) -> pd.DataFrame | None:
        dataset = getattr(loader, "dataset", None)
        method = getattr(dataset, "sample_table", None)
        if not callable(method):
            return None
        table = method()
        if not isinstance(table, pd.DataFrame):
            raise TypeError(
                f"{type(dataset).__name__}.sample_table() returned {type(table).__name__}, not a pandas DataFrame"
            )
        return table

    def _path(self, trainer: L.Trainer, loader_idx: int, num_loaders: int) -> Path:
        path = self.path if self.path is not None else Path(trainer.default_root_dir) / "predictions.csv"
        if num_loaders > 1:
            path = path.with_name(f"{path.stem}_{loader_idx}{path.suffix}")
        return path
