"""Seeding of the one k-means at every world size: k-means|| oversampling reduced by weighted greedy k-means++.

Every draw is a function of the seed and the row's sample id (:func:`sample_uniforms`), so any split of the rows
over ranks draws the same candidates; only O(k·d) rows travel between ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from ccim_lightning.dictionary.collectives import Collectives

__all__ = ["CHUNK_ENTRIES", "nearest_centres", "sample_uniforms", "seed_centroids", "smallest_keys"]

CHUNK_ENTRIES = 1 << 24
"""Entries of the largest temporary (distance block, float64 copy of rows) materialised at once."""

_SEEDING_ROUNDS = 5
"""Oversampling rounds of the seeding, each drawing ``num_clusters`` candidates."""

_LOCAL_TRIALS = 20
"""Candidates drawn per greedy k-means++ step (scikit-learn draws 2 + ln k; more gives better seeds here, cheaply)."""

_MAX_PAIRWISE_ENTRIES = 1 << 26
"""Largest candidate-by-candidate distance matrix the greedy step precomputes (256 MiB in float32)."""


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
    keys = _splitmix64(np.array([seed & (1 << 64) - 1, stream], dtype=np.uint64))
    z = _splitmix64(_splitmix64(ids.cpu().numpy().astype(np.uint64) ^ keys[0]) ^ keys[1])
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53).to(ids.device)


def _squared_distances(a: torch.Tensor, a_norms: torch.Tensor, b: torch.Tensor, b_norms: torch.Tensor) -> torch.Tensor:
    """(p, q) squared Euclidean distances between the rows of a (p, d) and b (q, d), given |a|^2 and |b|^2."""
    return (a_norms.unsqueeze(1) + b_norms - 2.0 * (a @ b.T)).clamp_min_(0.0)


def nearest_centres(x: torch.Tensor, x_norms: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest of ``centres`` for every row of x (row chunks bound memory).

    The nearest centre minimises |c|^2 - 2 x.c, one fused matrix product; |x|^2 is added to the minimum only.
    """
    norms = centres.square().sum(1)
    chunk = max(1, CHUNK_ENTRIES // max(1, centres.shape[0]))
    distances = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    indices = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        distances[rows], indices[rows] = torch.addmm(norms, x[rows], centres.T, alpha=-2.0).min(1)
    distances += x_norms
    return distances.clamp_min_(0.0), indices


def smallest_keys(
    keys: torch.Tensor, ids: torch.Tensor, count: int, group: Collectives, payload: torch.Tensor | None = None
) -> torch.Tensor:
    """Every rank's ``count`` rows with the smallest keys, ordered by key then sample id, the same on every rank.

    The ``count`` smallest of all ranks are among them, so only those travel.

    Returns:
        (m, 4) float64 rows of (key, sample id, local row, rank), plus a fifth column of ``payload`` when given.
    """
    local_keys, local_rows = keys.topk(min(count, len(keys)), largest=False)
    columns = [local_keys.double(), ids[local_rows].double(), local_rows.double()]
    columns += [torch.full_like(columns[0], group.rank)] + ([] if payload is None else [payload[local_rows].double()])
    gathered = group.gather_unequal(torch.stack(columns, 1))
    by_id = torch.argsort(gathered[:, 1], stable=True)
    return gathered[by_id[torch.argsort(gathered[by_id, 0], stable=True)]]


def _draw(keys: torch.Tensor, ids: torch.Tensor, count: int, group: Collectives) -> torch.Tensor:
    """(count, 4) rows of :func:`smallest_keys`: the ``count`` smallest keys of all ranks, in ascending sample id."""
    winners = smallest_keys(keys, ids, count, group)[:count]
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

    Hand-written: FAISS seeds with random points or plain k-means++ on all rows in one process, and on clustered
    2048-d features with k=256 either start ends Lloyd several percent above scikit-learn's greedy k-means++, whose
    cost is a pass over all points per step and candidate. So: k-means|| oversampling (``_SEEDING_ROUNDS`` rounds of
    ``num_clusters`` draws without replacement proportional to the squared distance, Efraimidis-Spirakis keys
    Exp(1) / w), each candidate weighted by the points nearest to it, reduced to k by weighted greedy k-means++ (on
    all points with unit weights when they are no more than the pool).
    """
    if total <= _SEEDING_ROUNDS * num_clusters + 1:
        table = group.gather_unequal(torch.cat([ids.unsqueeze(1).double(), points.double()], 1))
        pool = table[torch.argsort(table[:, 0])][:, 1:].float().to(points.device)
        weights = torch.ones(len(pool), dtype=torch.float64, device=points.device)
    else:
        norms = points.square().sum(1)
        closest = torch.full((len(points),), torch.inf, device=points.device)
        owner = torch.zeros(len(points), dtype=torch.int64, device=points.device)
        pool_parts, pool_size = [], 0
        for round_ in range(_SEEDING_ROUNDS + 1):
            remaining = int(group.all_reduce((closest > 0).sum()))
            if remaining == 0:  # every point coincides with a candidate
                break
            uniforms = sample_uniforms(ids, seed, round_)
            # round 0 draws the first candidate uniformly, later rounds proportionally to the squared distance
            keys = uniforms if round_ == 0 else -torch.log1p(-uniforms) / closest.double()  # weight 0 -> key inf
            winners = _draw(keys, ids, 1 if round_ == 0 else min(num_clusters, remaining), group)
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
    """``count`` indices drawn with replacement proportionally to ``weights`` (CPU generator: same on any device)."""
    cumulative = weights.double().cumsum(0)
    uniform = torch.rand(count, generator=generator, dtype=torch.float64).to(weights.device)
    index = torch.searchsorted(cumulative, uniform * cumulative[-1], right=True)
    return index.clamp_(max=weights.numel() - 1)


def _greedy_kmeans_plusplus(
    points: torch.Tensor, weights: torch.Tensor, num_clusters: int, generator: torch.Generator
) -> torch.Tensor:
    """(k,) int64 indices into ``points`` of weighted greedy k-means++ (scikit-learn's, ``_LOCAL_TRIALS`` trials).

    Each step draws trials proportionally to weight times squared distance and keeps the one leaving the smallest
    weighted potential.
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
