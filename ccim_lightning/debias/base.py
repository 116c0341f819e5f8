"""The contract between ``CCIMLightningModule`` and a debiasing method (``debias=`` argument).

A method changes what the host learns; CCIM itself stays as the paper defines it and the two combine freely. The
module calls, in this order:

1. ``bind(num_classes=, task=, num_clusters=)`` once, from its ``__init__``: the method creates its parameters and
   buffers with fixed shapes here, so that a checkpoint restores them.
2. ``fit_dictionary(prototypes)``, then ``fit_clusters(clusters, targets)``, once the confounder dictionary is built
   or loaded (every rank, before the first training step; never after a checkpoint restore, whose buffers already
   hold the statistics).
3. ``training_loss(logits, batch, clusters, elementwise_loss)`` at every training step; it checks the inputs once
   for every method and hands them to the method's :meth:`DebiasMethod.objective`.
4. ``inference_logits(logits, batch)`` at validation, test and prediction (and ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ccim_lightning.debias._inputs import check_clusters, check_elementwise, check_targets, require_bound
from ccim_lightning.types import TARGET, Batch, Task, check_task

Tensor = torch.Tensor
#: ``elementwise_loss(logits, target)``: (B,) for multiclass, (B, C) for multilabel; no reduction.
ElementwiseLoss = Callable[[Tensor, Tensor], Tensor]
#: ``loss_of(logits)``: the module's elementwise loss of some logits against the batch's (checked) targets.
LossOf = Callable[[Tensor], Tensor]
#: A scalar loss and named terms to log.
Terms = tuple[Tensor, dict[str, Tensor]]


class DebiasMethod(nn.Module):
    """Base class of the methods in :mod:`ccim_lightning.debias`.

    Attributes:
        needs_clusters: Whether the method reads each training sample's dictionary cluster (then the dictionary is
            built even for the baseline head, ``attention="none"``).
    """

    needs_clusters: ClassVar[bool] = True
    #: Whether multilabel targets must be exactly 0/1 (counting methods) or may be soft.
    binary_targets: ClassVar[bool] = True
    #: The tasks the method is defined for (``bind`` refuses the others).
    tasks: ClassVar[tuple[Task, ...]] = ("multiclass", "multilabel")

    def bind(self, *, num_classes: int, task: Task, num_clusters: int) -> None:
        """Creates the method's parameters and buffers for the module's task (called once, from its ``__init__``).

        Args:
            num_classes: Number of classes (multiclass) or categories (multilabel).
            task: ``"multiclass"`` or ``"multilabel"``.
            num_clusters: ``N``, the number of dictionary clusters.
        """
        check_task(task, where=f"{type(self).__name__}.bind")
        self.num_classes = num_classes
        self.task = task
        self.num_clusters = num_clusters

    def fit_dictionary(self, prototypes: torch.Tensor) -> None:
        """Keeps the dictionary's (N, d) prototypes, given just before :meth:`fit_clusters` (coarse pseudo-groups)."""
        self._prototypes = prototypes

    def fit_clusters(self, clusters: torch.Tensor, targets: torch.Tensor) -> None:
        """Computes the method's statistics from the training split.

        Args:
            clusters: (n,) int64 cluster of every training sample, in sample-index order.
            targets: (n,) int64 labels (multiclass) or (n, C) multi-hot (multilabel), in the same order.
        """

    def training_loss(
        self, logits: Tensor, batch: Batch, clusters: Tensor | None, elementwise_loss: ElementwiseLoss
    ) -> Terms:
        """The training objective for a batch: checks the inputs, then :meth:`objective`.

        Args:
            logits: (B, C) logits of the module's head.
            batch: The batch dict (``target``, ``index``, ``context``, ...).
            clusters: (B,) cluster of each sample (None for a method with ``needs_clusters = False``).
            elementwise_loss: The module's loss without reduction.

        Returns:
            The scalar loss and named terms to log (``train/debias/<name>``).
        """
        require_bound(self)
        batch_size = logits.shape[0]
        if self.needs_clusters:
            if clusters is None:
                raise ValueError(f"{type(self).__name__} needs each training sample's cluster, got clusters=None")
            clusters = check_clusters(clusters, self.num_clusters, "clusters of the batch")
        target = check_targets(
            batch[TARGET],
            self.task,
            self.num_classes,
            batch_size,
            binary=self.binary_targets,
            name=f"batch[{TARGET!r}]",
        )

        def loss_of(scores: Tensor) -> Tensor:
            return check_elementwise(elementwise_loss(scores, target), self.task, batch_size, self.num_classes)

        return self.objective(logits, target, clusters, batch, loss_of)

    def objective(
        self, logits: Tensor, target: Tensor, clusters: Tensor | None, batch: Batch, loss_of: LossOf
    ) -> Terms:
        """The method's loss, from checked inputs (``target`` as the loss expects it, ``clusters`` int64)."""
        raise NotImplementedError

    def inference_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits to evaluate and predict from (identity unless the method changes inference, as CLEF does)."""
        return logits
