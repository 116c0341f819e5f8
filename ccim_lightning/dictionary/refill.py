"""Empty clusters after a Lloyd step: the refill rule the one-process and the distributed k-means share.

An empty cluster receives the point farthest from its centroid, taken only from a cluster that keeps at least one
member, so no cluster empties in turn. The torch Lloyd loop and the final assignment use it on every backend (FAISS's
own splitting of large clusters would make the partitions depend on the backend). :func:`empty_cluster_moves` is the
rule on plain (point, cluster) candidates; :func:`fill_empty_clusters` applies it to one process's points and
``distributed._fill_empty_clusters`` to the globally farthest candidates of all ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["empty_cluster_moves", "fill_empty_clusters"]

logger = logging.getLogger(__name__)


def fill_empty_clusters(assignments: torch.Tensor, distances: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Moves the points farthest from their centroid, one per empty cluster, into the empty clusters.

    Only points of clusters with at least two members move, so no cluster empties in turn; there are always enough
    of them when there are at least as many points as clusters.
    """
    counts = torch.bincount(assignments, minlength=num_clusters)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return assignments
    logger.info("k-means: moving the farthest points into %d empty cluster(s)", len(empty))
    original = assignments.cpu().numpy()
    moved = original.copy()
    farthest_first = np.argsort(-distances.cpu().numpy(), kind="stable").tolist()
    for point, cluster in empty_cluster_moves(empty, counts.tolist(), ((p, original[p]) for p in farthest_first)):
        moved[point] = cluster
    return torch.from_numpy(moved).to(assignments.device)


def empty_cluster_moves(
    empty: list[int], sizes: list[int], farthest_first: Iterable[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Which points refill the empty clusters: one ``(point, empty cluster)`` pair per empty cluster.

    The rule shared by the one-process and the distributed k-means: walk the candidates farthest from their
    centroid first and take a point only if its cluster keeps at least one member.

    Args:
        empty: The empty clusters, in the order they are filled.
        sizes: Every cluster's size before the moves (not modified).
        farthest_first: ``(point, its cluster)`` candidates, farthest from their centroid first.

    Raises:
        ValueError: When the candidates run out first (fewer movable points than empty clusters).
    """
    sizes = list(sizes)
    candidates = iter(farthest_first)
    moves = []
    for cluster in empty:
        # the shared iterator resumes after the last point taken
        point, source = next(((p, c) for p, c in candidates if sizes[c] >= 2), (None, None))
        if point is None:
            raise ValueError(f"k-means: no point left to move into empty cluster {cluster} (sizes {sizes})")
        sizes[source] -= 1
        sizes[cluster] = 1
        moves.append((point, cluster))
    return moves
