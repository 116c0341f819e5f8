"""Group-balanced loss weights over pseudo-groups (class, context cluster)."""

from __future__ import annotations

import logging

import torch

from ccim_lightning.arguments import check_optional_float
from ccim_lightning.debias._inputs import check_clusters, check_targets, require_bound, require_fitted
from ccim_lightning.debias.base import DebiasMethod, LossOf, Tensor, Terms
from ccim_lightning.debias.groups import GroupMode, PseudoGroups
from ccim_lightning.types import Batch, Task

log = logging.getLogger(__name__)


class GroupBalancedReweighting(DebiasMethod):
    """Weights each sample's loss so that every pseudo-group carries the same total weight (multiclass).

    The loss form of group-balanced resampling (Idrissi et al. 2022, "Simple data balancing"): with ``n_g`` training
    samples in group ``g``, ``G`` groups holding at least one sample and ``n`` samples, a sample of group ``g`` weighs
    ``w_g = n / (G * n_g)``. Every filled group then sums to ``n / G`` and the weights have mean 1 over the training
    split. Groups (:class:`~ccim_lightning.debias.groups.PseudoGroups`): ``"coarse"`` (default; per class, the
    dictionary's prototypes clustered into 2-8 groups chosen by the silhouette), ``"aligned"`` (per class, the
    clusters whose context favours it and the others: ``P(y | z) >= P(y)`` or not) or ``"prototypes"`` (one group
    per dictionary cluster and class, where many tiny groups get huge weights: ``max_weight`` bounds them).

    Unlike :class:`~ccim_lightning.debias.ClusterReweighting` (``P(y) / P(y | z)``, which equalises clusters across
    classes), this also balances the classes; with coarse groups nested in the classes that ratio would be 1.

    DDP: the weights come from the dictionary's assignments, which every rank holds whole.

    Args:
        groups: ``"coarse"``, ``"aligned"`` or ``"prototypes"``.
        max_weight: Upper bound of ``w_g`` before the weights are renormalised to mean 1; None for no bound.

    Buffers (in checkpoints): ``weights`` (G,), ``fitted``, ``pseudo_groups.table``.
    """

    binary_targets = True
    tasks = ("multiclass",)

    def __init__(self, groups: GroupMode = "coarse", max_weight: float | None = None) -> None:
        super().__init__()
        self.max_weight = check_optional_float(type(self).__name__, "max_weight", max_weight, 0.0, low_open=True)
        self.pseudo_groups = PseudoGroups(groups)
        self._prototypes: torch.Tensor | None = None

    def bind(self, *, num_classes: int, task: Task, num_clusters: int) -> None:
        super().bind(num_classes=num_classes, task=task, num_clusters=num_clusters)
        if task not in self.tasks:
            raise ValueError(
                "GroupBalancedReweighting is for task='multiclass' (a multilabel sample is in one group per "
                "category); use ClusterReweighting for multilabel data."
            )
        self.pseudo_groups.bind(num_clusters=num_clusters, num_classes=num_classes)
        self.register_buffer("weights", torch.ones(self.pseudo_groups.num_groups))
        self.register_buffer("fitted", torch.tensor(False))

    def fit_clusters(self, clusters: torch.Tensor, targets: torch.Tensor) -> None:
        require_bound(self)
        clusters = check_clusters(clusters, self.num_clusters)
        targets = check_targets(targets, self.task, self.num_classes, len(clusters))
        self.pseudo_groups.fit(self._prototypes, clusters, targets)
        groups = self.pseudo_groups(clusters.to(self.weights.device), targets.to(self.weights.device))
        counts = torch.bincount(groups, minlength=len(self.weights)).double()
        filled = counts > 0
        weights = torch.where(filled, len(groups) / (int(filled.sum()) * counts.clamp_min(1)), torch.ones_like(counts))
        if self.max_weight is not None:
            weights = weights.clamp(max=self.max_weight)
        weights = weights / weights[groups].mean()
        self.weights.copy_(weights.to(self.weights.dtype))
        self.fitted.fill_(True)
        log.info(
            "GroupBalancedReweighting: %d filled groups of %d samples; weights %.3g to %.3g.",
            int(filled.sum()),
            len(groups),
            float(weights[filled].min()),
            float(weights[filled].max()),
        )

    def objective(
        self, logits: Tensor, target: Tensor, clusters: Tensor | None, batch: Batch, loss_of: LossOf
    ) -> Terms:
        require_fitted(self)
        weights = self.weights[self.pseudo_groups(clusters, target)]
        total = (weights * loss_of(logits)).mean()
        return total, {"weight_mean": weights.mean().detach(), "weight_max": weights.max().detach()}
