"""Seeding of the one k-means at every world size: k-means|| oversampling reduced by weighted greedy k-means++.

Every random draw of the oversampling is a fixed function of the seed and the row's sample id
(:func:`sample_uniforms`), so any split of the same rows over any number of ranks draws the same candidates; only
O(k·d) rows travel between ranks (:class:`~ccim_lightning.dictionary.collectives.Collectives`).
"""

from __future__ import annotations

import numpy as np
import torch

from ccim_lightning.dictionary.collectives import Collectives

__all__ = ["CHUNK_ENTRIES", "nearest_centres", "sample_uniforms", "seed_centroids"]

CHUNK_ENTRIES = 1 << 24
"""Entries of the largest temporary (distance block, float64 copy of rows) materialised at once."""

_SEEDING_ROUNDS = 5
"""Oversampling rounds of the seeding, each drawing ``num_clusters`` candidates."""

_LOCAL_TRIALS = 20
"""Candidates drawn per greedy k-means++ step (scikit-learn draws 2 + ln k; more gives better seeds here, cheaply)."""

_MAX_PAIRWISE_ENTRIES = 1 << 26
"""Largest candidate-by-candidate distance matrix the greedy step precomputes (256 MiB in float32)."""

_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's mixing function on uint64 values (wrapping arithmetic)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(ids: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """(n,) float64 uniforms in [0, 1), a fixed function of (seed, stream, sample id), on the device of ``ids``.

    Hand-written: numpy's and torch's generators are sequential streams, so a draw would depend on the row's position
    in them (and thus on the rank holding it). A counter-based draw per sample id is what makes any split of the rows
    over ranks draw the same; SplitMix64 (Steele et al., 2014) is the usual small mixer for that.
    """
    keys = _splitmix64(np.array([seed & _MASK64, stream], dtype=np.uint64))
    z = _splitmix64(_splitmix64(ids.cpu().numpy().astype(np.uint64) ^ keys[0]) ^ keys[1])
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53).to(ids.device)


def _squared_distances(a: torch.Tensor, a_norms: torch.Tensor, b: torch.Tensor, b_norms: torch.Tensor) -> torch.Tensor:
    """(p, q) squared Euclidean distances between the rows of a (p, d) and b (q, d), given |a|^2 and |b|^2."""
    return (a_norms.unsqueeze(1) + b_norms - 2.0 * (a @ b.T)).clamp_min_(0.0)


def nearest_centres(x: torch.Tensor, x_norms: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest of ``centres`` for every row of x (row chunks bound memory)."""
    norms = centres.square().sum(1)
    chunk = max(1, CHUNK_ENTRIES // max(1, centres.shape[0]))
    distances = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    indices = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        distances[rows], indices[rows] = _squared_distances(x[rows], x_norms[rows], centres, norms).min(1)
    return distances, indices


def _draw(keys: torch.Tensor, ids: torch.Tensor, count: int, group: Collectives) -> torch.Tensor:
    """The ``count`` rows of all ranks with the smallest keys (ties by sample id), in ascending sample id.

    The global winners are among every rank's ``count`` smallest, so only those travel.

    Returns:
        (count, 4) float64 rows of (key, sample id, local row, rank), the same on every rank.
    """
    local_keys, local_rows = keys.topk(min(count, len(keys)), largest=False)
    table = torch.stack([local_keys.double(), ids[local_rows].double(), local_rows.double()], 1)
    table = torch.cat([table, torch.full_like(table[:, :1], group.rank)], 1)
    gathered = group.gather_unequal(table)
    by_id = torch.argsort(gathered[:, 1], stable=True)
    winners = gathered[by_id[torch.argsort(gathered[by_id, 0], stable=True)[:count]]]
    return winners[torch.argsort(winners[:, 1])]


def _rows_of(points: torch.Tensor, winners: torch.Tensor, group: Collectives) -> torch.Tensor:
    """(m, d) the winners' points on every rank: the holder writes each row, others zeros, and the sum is exact."""
    out = torch.zeros(len(winners), points.shape[1], dtype=points.dtype, device=points.device)
    mine = (winners[:, 3] == group.rank).to(points.device)
    out[mine] = points[winners[:, 2].long().to(points.device)[mine]]
    return group.all_reduce(out)


def seed_centroids(
    points: torch.Tensor, ids: torch.Tensor, num_clusters: int, seed: int, total: int, group: Collectives
) -> torch.Tensor:
    """(k, d) initial centroids, points of the data of greedy k-means++ quality.

    Hand-written rather than left to FAISS: ``faiss.Clustering`` seeds with random points; FAISS 1.12+ also offers
    k-means++, but the plain variant (one candidate per step), on the CPU, and on all rows in one process. On
    clustered 2048-d features with k=256 either start ends Lloyd's iterations several percent above scikit-learn's
    greedy k-means++, whose own cost is a pass over all points per step and candidate.

    So: k-means|| oversampling, from one point drawn uniformly, ``_SEEDING_ROUNDS`` rounds each draw ``num_clusters``
    candidates without replacement proportionally to the squared distance to the candidates so far
    (Efraimidis-Spirakis keys Exp(1) / w from :func:`sample_uniforms`); each candidate is weighted by the number of
    points it is the nearest candidate of, and weighted greedy k-means++ reduces them to k. When there are no more
    points than the pool would hold, the greedy step runs on all points with unit weights: greedy k-means++ itself.
    """
    if total <= _SEEDING_ROUNDS * num_clusters + 1:
        table = group.gather_unequal(torch.cat([ids.unsqueeze(1).double(), points.double()], 1))
        pool = table[torch.argsort(table[:, 0])][:, 1:].float().to(points.device)
        weights = torch.ones(len(pool), dtype=torch.float64, device=points.device)
    else:
        norms = points.square().sum(1)
        first = _draw(sample_uniforms(ids, seed, 0), ids, 1, group)
        pool_parts = [_rows_of(points, first, group)]
        closest = _squared_distances(points, norms, pool_parts[0], pool_parts[0].square().sum(1))[:, 0]
        if int(first[0, 3]) == group.rank:
            closest[int(first[0, 2])] = 0.0
        owner = torch.zeros(len(points), dtype=torch.int64, device=points.device)
        pool_size = 1
        for round_ in range(1, _SEEDING_ROUNDS + 1):
            remaining = int(group.all_reduce((closest > 0).sum()))
            if remaining == 0:  # every point coincides with a candidate
                break
            keys = -torch.log1p(-sample_uniforms(ids, seed, round_)) / closest.double()  # weight 0 -> key inf
            winners = _draw(keys, ids, min(num_clusters, remaining), group)
            rows = _rows_of(points, winners, group)
            distances, nearest = nearest_centres(points, norms, rows)
            mine = (winners[:, 3] == group.rank).nonzero().flatten().to(points.device)
            local = winners[:, 2].long().to(points.device)[mine]
            distances[local], nearest[local] = 0.0, mine  # exactly, rather than float32 cancellation noise
            closer = distances < closest
            closest = torch.where(closer, distances, closest)
            owner = torch.where(closer, nearest + pool_size, owner)
            pool_parts.append(rows)
            pool_size += len(rows)
        pool = torch.cat(pool_parts)
        weights = group.all_reduce(torch.bincount(owner, minlength=pool_size)).double()
    generator = torch.Generator().manual_seed(seed)
    # every rank holds the same pool and weights; rank 0's choice is broadcast so that ranks whose BLAS differs in
    # the last bit (thread counts) still agree
    chosen = group.broadcast(_greedy_kmeans_plusplus(pool, weights, num_clusters, generator).cpu())
    return pool[chosen.to(pool.device)]


def _sample_proportional(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices drawn with replacement with probability proportional to ``weights`` (inverse CDF).

    The uniform numbers come from the CPU generator whatever the device, so a seed means the same draws everywhere.
    """
    cumulative = weights.double().cumsum(0)
    uniform = torch.rand(count, generator=generator, dtype=torch.float64).to(weights.device)
    index = torch.searchsorted(cumulative, uniform * cumulative[-1], right=True)
    return index.clamp_(max=weights.numel() - 1)


def _greedy_kmeans_plusplus(
    points: torch.Tensor, weights: torch.Tensor, num_clusters: int, generator: torch.Generator
) -> torch.Tensor:
    """Weighted greedy k-means++ (as scikit-learn's, with ``_LOCAL_TRIALS`` candidates per step).

    The first centre is drawn proportionally to the weights; each further step draws ``_LOCAL_TRIALS`` candidates
    proportionally to weight times squared distance to the nearest centre so far and keeps the one that leaves the
    smallest weighted potential.

    Returns:
        (k,) int64 indices into ``points``.
    """
    count = points.shape[0]
    norms = points.square().sum(1)
    pairwise = None
    if count * count <= _MAX_PAIRWISE_ENTRIES:
        pairwise = _squared_distances(points, norms, points, norms)
        pairwise.fill_diagonal_(0.0)

    def distances_to(index: torch.Tensor) -> torch.Tensor:
        if pairwise is not None:
            return pairwise[index]
        rows = _squared_distances(points[index], norms[index], points, norms)
        rows[torch.arange(len(index), device=points.device), index] = 0.0
        return rows

    chosen = torch.empty(num_clusters, dtype=torch.long, device=points.device)
    chosen[:1] = _sample_proportional(weights, 1, generator)
    closest = distances_to(chosen[:1])[0].double()
    for step in range(1, num_clusters):
        trials = _sample_proportional(weights * closest, _LOCAL_TRIALS, generator)
        trial_closest = torch.minimum(distances_to(trials).double(), closest)
        best = (trial_closest @ weights).argmin()
        chosen[step] = trials[best]
        closest = trial_closest[best]
    return chosen
