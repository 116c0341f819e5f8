"""Backdoor adjustment by inverse propensity over the confounder dictionary's clusters."""

from __future__ import annotations

import logging

import torch

from ccim_lightning.arguments import check_float, check_optional_float
from ccim_lightning.debias._inputs import (
    check_clusters,
    check_targets,
    cluster_label_counts,
    require_bound,
    require_fitted,
)
from ccim_lightning.debias.base import DebiasMethod, LossOf, Tensor, Terms
from ccim_lightning.types import Batch, Task

log = logging.getLogger(__name__)


class ClusterReweighting(DebiasMethod):
    """Weights each training sample's loss by ``w = P(y) / P(y | z)`` over the dictionary's clusters ``z``.

    In the reweighted training split the context cluster and the label are independent, which is what backdoor
    adjustment asks of the training distribution (docs/concepts/debiasing.md).

    From the training counts ``n[z, y]`` (``n_z`` samples in cluster ``z``, ``n_y`` with label ``y``, ``n`` in all):

    * ``P(y) = n_y / n`` (unsmoothed: the marginal is well estimated);
    * ``P(y | z) = (n[z, y] + s) / (n_z + C s)`` with ``s = smoothing`` (additive smoothing keeps rare cells finite);
      with ``s = 0``, cells without a training sample (whose weight no training sample reads) get the ratio 1;
    * ``w[z, y] = min(P(y) / P(y | z), max_weight)``: the bound applies to the ratio, where 1 means "this
      cluster-label pair is as frequent as it would be without confounding";
    * the table is divided by the mean of ``w[z_i, y_i]`` over the training samples, so the weights have mean 1
      over the training split (the loss keeps the scale of the unweighted one).

    The training loss is ``mean_i w[z_i, y_i] * loss_i``.

    Multilabel: every category ``c`` is its own binary task. With ``v = y_ic`` the sample's value of category ``c``
    (0 or 1), ``w[z, c, v] = P(y_c = v) / P(y_c = v | z)`` with ``P(y_c = v | z) = (n[z, c, v] + s) / (n_z + 2 s)``,
    clipped likewise and normalised to mean 1 per category; the weight multiplies the (sample, category) element of
    the BCE loss.

    Weighted-sampler variant (group-balanced resampling, Idrissi et al. 2022): instead of weighting the loss, draw
    training samples with probability proportional to ``w``: ``torch.utils.data.WeightedRandomSampler(
    method.sample_weights(clusters, targets), num_samples=n)`` in the training dataloader, and train without a
    ``debias`` method. :meth:`sample_weights` gives the per-sample weights (multiclass only: a multilabel sample has
    one weight per category, which a sampler cannot honour).

    Args:
        smoothing: Additive smoothing ``s`` of the cluster-label counts (> 0 keeps every weight finite).
        max_weight: Upper bound of the ratio ``P(y) / P(y | z)`` before normalisation; None for no bound.

    Buffers (in checkpoints): ``weights`` (N, C), or (N, C, 2) for multilabel; ``fitted``.
    """

    def __init__(self, smoothing: float = 1.0, max_weight: float | None = 10.0) -> None:
        super().__init__()
        where = type(self).__name__
        self.smoothing = check_float(where, "smoothing", smoothing, 0.0)
        self.max_weight = check_optional_float(where, "max_weight", max_weight, 0.0, low_open=True)

    def bind(self, *, num_classes: int, task: Task, num_clusters: int) -> None:
        super().bind(num_classes=num_classes, task=task, num_clusters=num_clusters)
        shape = (num_clusters, num_classes) if task == "multiclass" else (num_clusters, num_classes, 2)
        self.register_buffer("weights", torch.ones(shape))
        self.register_buffer("fitted", torch.tensor(False))

    def fit_clusters(self, clusters: torch.Tensor, targets: torch.Tensor) -> None:
        require_bound(self)
        clusters = check_clusters(clusters, self.num_clusters)
        targets = check_targets(targets, self.task, self.num_classes, len(clusters))
        counts = cluster_label_counts(clusters, targets, self.task, self.num_clusters, self.num_classes)
        s = self.smoothing
        # counts: (N, C) multiclass or (N, C, 2) multilabel; the label axis of P(. | z) is the last one.
        label_axis = 1 if self.task == "multiclass" else 2
        conditional = (counts + s) / (counts + s).sum(dim=label_axis, keepdim=True)
        marginal = counts.sum(dim=0, keepdim=True) / len(clusters)
        # With s = 0 a cell without training samples has P(y | z) = 0; no training sample reads its weight, so it
        # gets the neutral ratio 1 instead of inf or nan.
        ratio = torch.where(conditional > 0, marginal / conditional.clamp_min(1e-300), torch.ones_like(conditional))
        if self.max_weight is not None:
            ratio = ratio.clamp(max=self.max_weight)
        ratio = ratio / self._sample_mean(ratio, clusters, targets)
        self.weights.copy_(ratio.to(self.weights.dtype))
        self.fitted.fill_(True)
        w = self._gather(self.weights, clusters.to(self.weights.device), targets.to(self.weights.device))
        log.info(
            "ClusterReweighting: weights over %d training samples range %.3g to %.3g (mean 1).",
            len(clusters),
            float(w.min()),
            float(w.max()),
        )

    def _sample_mean(self, table: torch.Tensor, clusters: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean of each sample's weight over the split: a scalar (multiclass) or (1, C, 1) per category."""
        w = self._gather(table, clusters, targets)
        return w.mean() if self.task == "multiclass" else w.mean(dim=0).view(1, -1, 1)

    def _gather(self, table: torch.Tensor, clusters: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each sample's weight: (B,) ``table[z_i, y_i]``, or (B, C) ``table[z_i, c, y_ic]`` for multilabel."""
        if self.task == "multiclass":
            return table[clusters, targets]
        categories = torch.arange(self.num_classes, device=table.device)
        return table[clusters[:, None], categories[None, :], targets.long()]

    def sample_weights(self, clusters: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``w[z_i, y_i]`` for a ``WeightedRandomSampler`` (multiclass; after ``fit_clusters``).

        Args:
            clusters: (n,) cluster of each sample.
            targets: (n,) class of each sample.

        Returns:
            (n,) float weights, on the buffers' device.
        """
        require_fitted(self)
        if self.task != "multiclass":
            raise ValueError(
                "sample_weights is for task='multiclass' only: a multilabel sample has one weight per category, "
                "which a sampler cannot apply; use the loss weighting (debias=ClusterReweighting()) instead."
            )
        clusters = check_clusters(clusters, self.num_clusters).to(self.weights.device)
        targets = check_targets(targets, self.task, self.num_classes, len(clusters)).to(self.weights.device)
        return self._gather(self.weights, clusters, targets)

    def objective(
        self, logits: Tensor, target: Tensor, clusters: Tensor | None, batch: Batch, loss_of: LossOf
    ) -> Terms:
        require_fitted(self)
        loss = loss_of(logits)
        weights = self._gather(self.weights, clusters, target)
        total = (weights * loss).mean()
        return total, {"weight_mean": weights.mean().detach(), "weight_max": weights.max().detach()}
