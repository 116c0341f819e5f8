"""Group DRO (Sagawa et al., ICLR 2020) over groups made of the label and the dictionary cluster."""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.distributed as dist

from ccim_lightning.arguments import check_float
from ccim_lightning.debias._inputs import (
    check_clusters,
    check_targets,
    cluster_label_counts,
    require_bound,
)
from ccim_lightning.debias.base import DebiasMethod, LossOf, Tensor, Terms
from ccim_lightning.debias.groups import GroupMode, PseudoGroups
from ccim_lightning.types import Batch, Task

log = logging.getLogger(__name__)

MultilabelGroups = Literal["category_cluster", "cluster"]


class GroupDRO(DebiasMethod):
    """Minimises the loss of the worst groups, with online group weights ``q`` (Sagawa et al. 2020, Algorithm 1).

    Groups, with the cluster ``z`` of the confounder dictionary standing in for the unknown context group:

    * multiclass: ``g = (y, z)``, ``N * C`` groups, indexed ``g = z * C + y`` (``q.view(N, C)[z, y]``);
      with ``groups="coarse"``, ``g = (y, c)`` with ``c`` the class's coarse cluster of ``z``
      (:class:`~ccim_lightning.debias.groups.PseudoGroups`: 2-8 per class, chosen by the silhouette); with
      ``groups="aligned"``, ``g = (y, a)`` with ``a`` whether ``z`` favours ``y`` (``P(y | z) >= P(y)``), 2 per class;
    * multilabel, ``multilabel_groups="category_cluster"`` (default): each (sample, category) element of the BCE
      loss belongs to ``g = (c, y_c, z)``: category, its value (0/1) and cluster, ``N * C * 2`` groups, indexed
      ``g = (z * C + c) * 2 + y_c`` (``q.view(N, C, 2)``). This is the per-category form of ``(y, z)``: it can
      up-weight "category present in a cluster where it is rare" as the multiclass groups do;
    * multilabel, ``multilabel_groups="cluster"``: ``g = z`` alone, ``N`` groups; a sample's loss is its BCE
      averaged over the categories.

    At every training batch, with ``L_g`` the mean loss of the batch's elements in group ``g`` (0 for groups
    absent from the batch):

    1. ``q_g <- q_g * exp(eta * L_g)``, then ``q <- q / sum(q)`` (no gradient; ``q`` starts uniform);
    2. loss ``= sum_g q_g L_g`` with the updated ``q``, i.e. the sum over the groups present in the batch.

    The weights are kept as ``log q`` (step 1 is ``log q <- log_softmax(log q + eta L)``): over a long run a
    group that keeps a lower loss falls below float32's smallest number (``log q < -104``), and stored as ``q`` it
    would become exactly 0, stay 0 for good, and make the normalised loss below 0 / 0 = NaN. ``log q`` is floored
    at a finite value far below anything that matters (so a sum over floored groups stays defined).

    With ``N * C`` groups most groups are absent from a batch, so this sum is smaller than the mean loss by about
    the ``q`` mass of the absent groups. ``normalize=True`` divides it by the ``q`` mass of the groups present
    (a ``q``-weighted mean of the present groups' losses, on the scale of the ordinary loss); the default keeps
    Sagawa et al.'s sum. Sagawa et al. stress strong regularisation (weight decay) or early stopping.

    DDP: when ``torch.distributed`` is initialised, the per-group loss sums and counts are all-reduced before step 1,
    so every rank updates ``q`` with the same group losses of the global batch and ``q`` stays identical across
    ranks; the gradient comes from each rank's own groups, which DDP then averages.

    Args:
        eta: Step size of the group-weight update.
        multilabel_groups: Grouping for multilabel data (see above); ignored for multiclass.
        normalize: Divide the loss by the ``q`` mass of the groups in the batch (see above).
        groups: ``"prototypes"`` (one group per dictionary cluster and class), ``"coarse"`` (per class, the
            prototypes clustered into 2-8 groups) or ``"aligned"`` (per class, bias-aligned and bias-conflicting
            clusters); the last two multiclass only.

    Buffers (in checkpoints): ``log_q`` (G,), the log group weights (``q`` is their softmax, a property). A
    checkpoint from before this change, holding ``q``, loads as ``log q``; with
    ``groups="coarse"`` or ``"aligned"`` also ``pseudo_groups.table``.
    """

    def __init__(
        self,
        eta: float = 0.01,
        multilabel_groups: MultilabelGroups = "category_cluster",
        normalize: bool = False,
        groups: GroupMode = "prototypes",
    ) -> None:
        super().__init__()
        eta = check_float(type(self).__name__, "eta", eta, 0.0)
        if multilabel_groups not in ("category_cluster", "cluster"):
            raise ValueError(f"multilabel_groups must be 'category_cluster' or 'cluster', got {multilabel_groups!r}")
        self.eta = float(eta)
        self.multilabel_groups = multilabel_groups
        self.normalize = normalize
        # Only for pseudo-groups: a submodule would add state-dict keys that older checkpoints lack.
        self.pseudo_groups = None if groups == "prototypes" else PseudoGroups(groups)
        self._prototypes: torch.Tensor | None = None

    def bind(self, *, num_classes: int, task: Task, num_clusters: int) -> None:
        super().bind(num_classes=num_classes, task=task, num_clusters=num_clusters)
        if self.pseudo_groups is not None:
            if task != "multiclass":
                raise ValueError(
                    f"GroupDRO(groups={self.pseudo_groups.mode!r}) is for task='multiclass'; use groups='prototypes'"
                )
            self.pseudo_groups.bind(num_clusters=num_clusters, num_classes=num_classes)
            self.num_groups = self.pseudo_groups.num_groups
        elif task == "multiclass":
            self.num_groups = num_clusters * num_classes
        elif self.multilabel_groups == "category_cluster":
            self.num_groups = num_clusters * num_classes * 2
        else:
            self.num_groups = num_clusters
        self.register_buffer("log_q", torch.full((self.num_groups,), -math.log(self.num_groups)))
        self.register_load_state_dict_pre_hook(_q_as_log_q)

    @property
    def q(self) -> torch.Tensor:
        """The group weights ``q`` (G,), summing to 1: the softmax of the ``log_q`` buffer (tiny groups read 0)."""
        return torch.softmax(self.log_q, dim=0)

    def fit_clusters(self, clusters: torch.Tensor, targets: torch.Tensor) -> None:
        """Checks the training split's clusters and labels and logs how many groups it fills (``q`` needs none)."""
        require_bound(self)
        clusters = check_clusters(clusters, self.num_clusters)
        targets = check_targets(targets, self.task, self.num_classes, len(clusters))
        if self.pseudo_groups is not None:
            self.pseudo_groups.fit(self._prototypes, clusters, targets)
            filled = int(len(torch.unique(self.pseudo_groups(clusters.to(self.q.device), targets.to(self.q.device)))))
        elif self.task == "multilabel" and self.multilabel_groups == "cluster":
            filled = int((torch.bincount(clusters, minlength=self.num_clusters) > 0).sum())
        else:
            counts = cluster_label_counts(clusters, targets, self.task, self.num_clusters, self.num_classes)
            filled = int((counts > 0).sum())
        log.info("GroupDRO: the training split fills %d of %d groups.", filled, self.num_groups)

    def group_losses(
        self, loss: torch.Tensor, clusters: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group loss sums (G,) (differentiable) and element counts (G,) of a batch."""
        if self.pseudo_groups is not None:
            groups, values = self.pseudo_groups(clusters, target), loss
        elif self.task == "multiclass":
            groups, values = clusters * self.num_classes + target, loss
        elif self.multilabel_groups == "category_cluster":
            categories = torch.arange(self.num_classes, device=clusters.device)
            groups = ((clusters[:, None] * self.num_classes + categories[None, :]) * 2 + target.long()).reshape(-1)
            values = loss.reshape(-1)
        else:
            groups, values = clusters, loss.mean(dim=1)
        sums = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)
        counts = torch.bincount(groups, minlength=self.num_groups).to(values.dtype)
        return sums, counts

    def objective(
        self, logits: Tensor, target: Tensor, clusters: Tensor | None, batch: Batch, loss_of: LossOf
    ) -> Terms:
        loss = loss_of(logits).float()
        sums, counts = self.group_losses(loss, clusters, target)
        stats = torch.stack([sums.detach(), counts])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # every rank sees the global batch's group losses: q stays in sync
        global_losses = stats[0] / stats[1].clamp_min(1)
        with torch.no_grad():
            # q * exp(eta L) / sum(...) in log space: neither overflows nor underflows to a weight of exactly 0.
            log_q = torch.log_softmax(self.log_q + self.eta * global_losses.to(self.log_q.dtype), dim=0)
            self.log_q.copy_(log_q.clamp_min(torch.finfo(self.log_q.dtype).min / 4))
        log_q = self.log_q.to(loss.dtype)
        group_means = sums / counts.clamp_min(1)
        present = counts > 0
        if self.normalize:
            # q_g / sum_{present} q_h as a softmax over the present groups' log q: defined even where every
            # present q_g underflows float32.
            weights = torch.softmax(log_q.masked_fill(~present, float("-inf")), dim=0)
            total = (weights[present] * group_means[present]).sum()
        else:
            total = (log_q.exp() * group_means).sum()
        present_global = stats[1] > 0
        terms = {
            "q_max": self.log_q.max().exp().detach(),
            "worst_group_loss": global_losses[present_global].max().detach(),
            "groups_in_batch": present_global.sum().to(loss.dtype),
        }
        return total, terms


def _q_as_log_q(module: GroupDRO, state_dict: dict, prefix: str, *args: object) -> None:
    """Load hook: a checkpoint written when the weights were stored as ``q`` loads them as ``log q``.

    A weight that had already underflowed to 0 there is lost; it loads as the floor, so the group can recover.
    """
    if prefix + "q" in state_dict and prefix + "log_q" not in state_dict:
        q = state_dict.pop(prefix + "q")
        state_dict[prefix + "log_q"] = q.log().clamp_min(torch.finfo(q.dtype).min / 4)
