"""Product of experts with a bias-only expert from the dictionary clusters' label counts (Clark et al., 2019)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ccim_lightning.arguments import check_float
from ccim_lightning.debias._inputs import (
    check_clusters,
    check_targets,
    cluster_label_counts,
    require_bound,
    require_fitted,
)
from ccim_lightning.debias.base import DebiasMethod, LossOf, Tensor, Terms
from ccim_lightning.types import Batch, Task


class ProductOfExperts(DebiasMethod):
    """Trains the host in a product with a fixed bias-only expert ``p_b(y | z)``; predicts from the host alone.

    The bias expert knows only the sample's context cluster ``z``: ``p_b(y | z) = (n[z, y] + s) / (n_z + C s)``
    from the training split's counts, ``s = smoothing``. Training minimises
    ``CE(log_softmax(f(x)) + log p_b(. | z(x)), y)``: the cross-entropy's own softmax renormalises the sum, which
    makes the product ``p_f * p_b`` a distribution. Where the cluster already predicts the label the product is
    right without ``f``'s help, so ``f`` gets little gradient there and learns what the context does not explain.
    Inference uses ``f``'s logits unchanged.

    Multilabel (each category a binary task): ``p_b(y_c = 1 | z) = (n[z, c, 1] + s) / (n_z + 2 s)`` and the
    training loss is ``BCE(f_c(x) + logit(p_b(y_c = 1 | z)), y_c)``: for two outcomes, adding the log-odds is the
    normalised product of the two Bernoulli experts.

    The two CE/BCE are the module's own loss (``elementwise_loss``), averaged over the batch (and categories).

    Args:
        smoothing: Additive smoothing ``s`` of the cluster-label counts (> 0 keeps every log-probability finite).

    Buffers (in checkpoints): ``bias_log_prob`` (N, C): ``log p_b(y | z)`` (multiclass) or
    ``logit p_b(y_c = 1 | z)`` (multilabel); ``fitted``.
    """

    binary_targets: ClassVar[bool] = False  # soft multi-hot targets are fine here

    def __init__(self, smoothing: float = 1.0) -> None:
        super().__init__()
        smoothing = check_float(type(self).__name__, "smoothing", smoothing)
        if smoothing <= 0:
            raise ValueError(
                f"smoothing must be > 0, got {smoothing}: a cluster-label pair absent from the training split would "
                "otherwise get log p_b = -inf"
            )
        self.smoothing = float(smoothing)

    def bind(self, *, num_classes: int, task: Task, num_clusters: int) -> None:
        super().bind(num_classes=num_classes, task=task, num_clusters=num_clusters)
        self.register_buffer("bias_log_prob", torch.zeros(num_clusters, num_classes))
        self.register_buffer("fitted", torch.tensor(False))

    def fit_clusters(self, clusters: torch.Tensor, targets: torch.Tensor) -> None:
        require_bound(self)
        clusters = check_clusters(clusters, self.num_clusters)
        targets = check_targets(targets, self.task, self.num_classes, len(clusters), binary=False)
        if self.task == "multilabel":
            # Soft multi-hot values count fractionally; only the present count n[z, c, 1] is read.
            targets = targets.clamp(0, 1)
        counts = cluster_label_counts(clusters, targets, self.task, self.num_clusters, self.num_classes)
        counts = counts + self.smoothing
        if self.task == "multiclass":
            table = (counts / counts.sum(dim=1, keepdim=True)).log()
        else:
            table = counts[..., 1].log() - counts[..., 0].log()  # logit of (n1 + s) / (n0 + n1 + 2s)
        self.bias_log_prob.copy_(table.to(self.bias_log_prob.dtype))
        self.fitted.fill_(True)

    def combined_logits(self, logits: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """The product's logits: ``log_softmax(f) + log p_b(. | z)`` (multiclass) or ``f + logit p_b`` (multilabel)."""
        bias = self.bias_log_prob[clusters].to(logits.dtype)
        if self.task == "multiclass":
            return torch.log_softmax(logits, dim=-1) + bias
        return logits + bias

    def objective(
        self, logits: Tensor, target: Tensor, clusters: Tensor | None, batch: Batch, loss_of: LossOf
    ) -> Terms:
        require_fitted(self)
        loss = loss_of(self.combined_logits(logits.float(), clusters)).mean()
        with torch.no_grad():
            host_loss = loss_of(logits.float()).mean()
        return loss, {"host_loss": host_loss}
