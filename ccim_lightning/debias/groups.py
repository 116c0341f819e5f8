"""Pseudo-groups ``(class, context cluster)`` from the confounder dictionary: fine, coarse or aligned.

The dictionary's N prototypes (32-1024) split every class into many small groups whose loss or accuracy estimates
are noise. GEORGE-style coarse groups instead cluster, per class, the prototypes its training samples fall in into
a few clusters, with their number k in ``[2, 8]`` chosen by the silhouette (paper.md, "What makes pseudo-group
methods work"). :class:`PseudoGroups` holds the resulting ``(N, C)`` table of group ids in a buffer, so a checkpoint
restores it, and every rank computes it from the dictionary it holds (deterministic, seeded, on the CPU).
Aligned groups split each class into the clusters that favour it and the others, from counts alone.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
from torch import nn

from ccim_lightning.dictionary.collectives import Collectives
from ccim_lightning.dictionary.kmeans import kmeans

log = logging.getLogger(__name__)

GroupMode = Literal["prototypes", "coarse", "aligned"]
#: The range of coarse clusters per class the silhouette chooses from.
MIN_COARSE, MAX_COARSE = 2, 8


def silhouette_score(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette coefficient with Euclidean distances (Rousseeuw 1987), as ``sklearn.metrics`` defines it.

    For point i with ``a_i`` its mean distance to the other members of its cluster and ``b_i`` the smallest mean
    distance to the members of another cluster: ``s_i = (b_i - a_i) / max(a_i, b_i)``, and ``s_i = 0`` for a point
    alone in its cluster. scikit-learn is a dev dependency only, hence this O(n^2) float64 version (n is a class's
    prototypes, at most N).

    Args:
        points: (n, d) points.
        labels: (n,) cluster ids; between 2 and n - 1 distinct values.

    Returns:
        The mean of ``s_i`` over the points, in ``[-1, 1]``.
    """
    x = torch.as_tensor(points, dtype=torch.float64)
    _, labels = torch.unique(torch.as_tensor(labels), return_inverse=True)
    k = int(labels.max()) + 1 if labels.numel() else 0
    if not 2 <= k <= len(x) - 1:
        raise ValueError(f"the silhouette needs 2 <= clusters <= points - 1, got {k} clusters of {len(x)} points")
    distances = torch.cdist(x, x)
    members = torch.nn.functional.one_hot(labels, k).double()  # (n, k)
    sizes = members.sum(dim=0)  # (k,)
    sums = distances @ members  # (n, k): summed distance from each point to each cluster
    own_size = sizes[labels]
    a = sums.gather(1, labels[:, None]).squeeze(1) / (own_size - 1).clamp_min(1)
    mean_to_other = sums / sizes
    mean_to_other.scatter_(1, labels[:, None], float("inf"))
    b = mean_to_other.min(dim=1).values
    s = (b - a) / torch.maximum(a, b)
    s = torch.where(own_size > 1, torch.nan_to_num(s, nan=0.0), torch.zeros_like(s))
    return float(s.mean())


def _single_process_kmeans(points: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Centroids of ``kmeans`` over ``points``, identical on every rank, whatever the world size.

    Every rank holds the same points. Under DDP, :func:`kmeans` reduces the rows of all ranks, so rank 0 passes the
    points and the others none; the centroids it returns are global, and every rank then assigns the points itself.
    """
    collectives = Collectives.current(torch.device("cpu"))
    rows = points if collectives.is_global_zero else points[:0]
    ids = torch.arange(len(rows))
    with warnings.catch_warnings():  # a few dozen prototypes per class are far below FAISS's points-per-cluster hint
        warnings.simplefilter("ignore")
        result = kmeans(rows, k, seed=seed, sample_ids=ids, collectives=collectives, device="cpu", backend="torch")
    return result.centroids


def coarse_clusters(
    points: torch.Tensor, *, seed: int = 0, max_clusters: int = MAX_COARSE
) -> tuple[torch.Tensor, float]:
    """Clusters points with the k in ``[2, max_clusters]`` of the best silhouette.

    Points (distinct rows) fewer than 4 get one cluster each (the silhouette needs k <= n - 1, so it cannot
    choose between 1 and 2 clusters of 3 or fewer points); ties go to the smaller k.

    Args:
        points: (n, d) the points, the same on every rank.
        seed: Seed of the k-means seeding.
        max_clusters: Largest k tried.

    Returns:
        ``(centroids (k, d), silhouette)``; silhouette ``nan`` when it was not computed (n < 4).
    """
    x = torch.as_tensor(points, dtype=torch.float32).cpu()
    if len(x) < 4:
        return x.clone(), float("nan")
    best, best_score = None, -float("inf")
    for k in range(MIN_COARSE, min(max_clusters, len(x) - 1) + 1):
        centroids = _single_process_kmeans(x, k, seed)
        labels = torch.cdist(x, centroids).argmin(dim=1)
        if len(labels.unique()) < 2:
            continue
        score = silhouette_score(x, labels)
        if score > best_score + 1e-12:
            best, best_score = centroids, score
    if best is None:  # every candidate collapsed to one cluster (identical points)
        return x[:1].clone(), float("nan")
    return best, best_score


def aligned_table(clusters: torch.Tensor, targets: torch.Tensor, num_clusters: int, num_classes: int) -> torch.Tensor:
    """The ``(N, C)`` group table of ``mode="aligned"`` from the training split's (cluster, class) counts.

    ``2 y`` where ``n[z, y] n >= n_y n_z`` and ``n_z > 0``, else ``2 y + 1`` (integer arithmetic, no rounding).
    """
    clusters, targets = clusters.cpu().long(), targets.cpu().long()
    joint = torch.bincount(clusters * num_classes + targets, minlength=num_clusters * num_classes)
    joint = joint.view(num_clusters, num_classes)
    per_cluster, per_class, total = joint.sum(dim=1, keepdim=True), joint.sum(dim=0, keepdim=True), len(clusters)
    aligned = (joint * total >= per_class * per_cluster) & (per_cluster > 0)
    return 2 * torch.arange(num_classes)[None, :] + (~aligned).long()


class PseudoGroups(nn.Module):
    """Group id of a training sample from its dictionary cluster ``z`` and class ``y`` (multiclass).

    * ``mode="prototypes"``: ``g = z * C + y``, ``N * C`` groups (every dictionary cluster splits every class).
    * ``mode="coarse"``: for each class ``y``, the prototypes of the clusters its training samples fall in are
      clustered by :func:`coarse_clusters` (k chosen by the silhouette in ``[2, max_clusters]``); every prototype,
      used by the class or not, joins its nearest coarse centroid ``c(y, z)``; ``g = y * max_clusters + c(y, z)``,
      ``C * max_clusters`` group ids, of which the classes' chosen k are used.
    * ``mode="aligned"``: two groups per class, split by whether the cluster's context favours the class in the
      training split: ``g = 2 y`` (bias-aligned) where ``P(y | z) >= P(y)``, i.e. ``n[z, y] n >= n_y n_z``, and
      ``g = 2 y + 1`` (bias-conflicting) elsewhere, including clusters without training samples; ``2 C`` groups.
      Coarse groups cluster the prototypes by appearance, which merges a class's rare-context clusters with its
      common ones when scenes are many (``benchmarks/debias/clusters.py`` measures it); this split keeps them apart
      and its groups stay large enough for stable statistics.

    Args:
        mode: ``"prototypes"``, ``"coarse"`` or ``"aligned"``.
        max_clusters: Largest number of coarse clusters per class (``mode="coarse"``).
        seed: Seed of the coarse k-means.

    Buffers (in checkpoints): ``table`` (N, C) int64, the group of each (cluster, class); ``fitted``.
    """

    def __init__(self, mode: GroupMode = "prototypes", max_clusters: int = MAX_COARSE, seed: int = 0) -> None:
        super().__init__()
        if mode not in ("prototypes", "coarse", "aligned"):
            raise ValueError(f"groups must be 'prototypes', 'coarse' or 'aligned', got {mode!r}")
        if not MIN_COARSE <= max_clusters:
            raise ValueError(f"max_clusters must be >= {MIN_COARSE}, got {max_clusters}")
        self.mode = mode
        self.max_clusters = int(max_clusters)
        self.seed = int(seed)

    @property
    def needs_prototypes(self) -> bool:
        """Whether :meth:`fit` reads the prototypes (coarse groups)."""
        return self.mode == "coarse"

    def bind(self, *, num_clusters: int, num_classes: int) -> None:
        """Creates the ``(N, C)`` table (the fine rule until :meth:`fit`)."""
        self.num_clusters, self.num_classes = num_clusters, num_classes
        per_class = {"prototypes": num_clusters, "coarse": self.max_clusters, "aligned": 2}[self.mode]
        self.num_groups = num_classes * per_class
        fine = torch.arange(num_clusters)[:, None] * num_classes + torch.arange(num_classes)[None, :]
        self.register_buffer("table", fine)
        self.register_buffer("fitted", torch.tensor(self.mode == "prototypes"))

    def fit(self, prototypes: torch.Tensor | None, clusters: torch.Tensor, targets: torch.Tensor) -> list[int]:
        """Fills the table from the training split (coarse and aligned modes; the fine table needs nothing).

        Args:
            prototypes: (N, d) the dictionary's prototypes (coarse mode; the other modes ignore them).
            clusters: (n,) int64 cluster of each training sample, checked by the caller.
            targets: (n,) int64 class of each training sample, checked by the caller.

        Returns:
            The number of groups of each class (``N`` for ``"prototypes"``, 2 for ``"aligned"``).
        """
        if self.mode == "prototypes":
            return [self.num_clusters] * self.num_classes
        if self.mode == "aligned":
            table = aligned_table(clusters, targets, self.num_clusters, self.num_classes)
            self.table.copy_(table.to(self.table.device))
            self.fitted.fill_(True)
            return [2] * self.num_classes
        if prototypes is None or prototypes.shape[0] != self.num_clusters:
            shape = None if prototypes is None else tuple(prototypes.shape)
            raise ValueError(
                f"coarse groups need the dictionary's ({self.num_clusters}, d) prototypes, got {shape}: pass "
                "fit_dictionary(prototypes) from a dictionary of that size before fit_clusters."
            )
        z = prototypes.detach().float().cpu()
        clusters, targets = clusters.cpu(), targets.cpu()
        table = torch.empty(self.num_clusters, self.num_classes, dtype=torch.long)
        sizes = []
        for y in range(self.num_classes):
            used = torch.unique(clusters[targets == y])
            if used.numel() == 0:  # no training sample of the class: one group (only read at evaluation)
                table[:, y] = y * self.max_clusters
                sizes.append(1)
                continue
            centroids, score = coarse_clusters(z[used], seed=self.seed, max_clusters=self.max_clusters)
            table[:, y] = y * self.max_clusters + torch.cdist(z, centroids).argmin(dim=1)
            sizes.append(len(centroids))
            log.info("Coarse groups: class %d, %d prototypes -> %d groups (silhouette %.3f).", y, len(used),
                     len(centroids), score)  # fmt: skip
        self.table.copy_(table.to(self.table.device))
        self.fitted.fill_(True)
        return sizes

    def forward(self, clusters: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) group id of each sample from its (checked) cluster and class."""
        if not bool(self.fitted):
            raise RuntimeError(
                f"{self.mode} pseudo-groups were never fitted and no checkpoint restored them: build the confounder "
                "dictionary before training (ConfounderDictionaryCallback hands its prototypes to the method)."
            )
        return self.table[clusters, targets]
