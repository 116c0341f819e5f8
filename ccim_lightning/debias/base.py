"""The contract between ``CCIMLightningModule`` and a debiasing method (``debias=`` argument).

A method changes what the host learns; CCIM itself stays as the paper defines it and the two combine freely. The
module calls, in this order:

1. ``bind(num_classes=, task=, num_clusters=)`` once, from its ``__init__``: the method creates its parameters and
   buffers with fixed shapes here, so that a checkpoint restores them.
2. ``fit_clusters(clusters, targets)`` once the confounder dictionary is built or loaded (every rank, before the
   first training step; never after a checkpoint restore, whose buffers already hold the statistics).
3. ``training_loss(logits, batch, clusters, elementwise_loss)`` at every training step.
4. ``inference_logits(logits, batch)`` at validation, test and prediction (and ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import nn

Task = Literal["multiclass", "multilabel"]
#: ``elementwise_loss(logits, target)``: (B,) for multiclass, (B, C) for multilabel; no reduction.
ElementwiseLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DebiasMethod(nn.Module):
    """Base class of the methods in :mod:`ccim_lightning.debias`.

    Attributes:
        needs_clusters: Whether the method reads each training sample's dictionary cluster (then the dictionary is
            built even for the baseline head, ``attention="none"``).
    """

    needs_clusters: ClassVar[bool] = True

    def bind(self, *, num_classes: int, task: Task, num_clusters: int) -> None:
        """Creates the method's parameters and buffers for the module's task (called once, from its ``__init__``).

        Args:
            num_classes: Number of classes (multiclass) or categories (multilabel).
            task: ``"multiclass"`` or ``"multilabel"``.
            num_clusters: ``N``, the number of dictionary clusters.
        """
        self.num_classes = num_classes
        self.task = task
        self.num_clusters = num_clusters

    def fit_clusters(self, clusters: torch.Tensor, targets: torch.Tensor) -> None:
        """Computes the method's statistics from the training split.

        Args:
            clusters: (n,) int64 cluster of every training sample, in sample-index order.
            targets: (n,) int64 labels (multiclass) or (n, C) multi-hot (multilabel), in the same order.
        """

    def training_loss(
        self,
        logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        clusters: torch.Tensor | None,
        elementwise_loss: ElementwiseLoss,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective for a batch.

        Args:
            logits: (B, C) logits of the module's head.
            batch: The batch dict (``target``, ``index``, ``context``, ...).
            clusters: (B,) cluster of each sample (None for a method with ``needs_clusters = False``).
            elementwise_loss: The module's loss without reduction.

        Returns:
            The scalar loss and named terms to log (``train/debias/<name>``).
        """
        raise NotImplementedError

    def inference_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits to evaluate and predict from (identity unless the method changes inference, as CLEF does)."""
        return logits
