"""K-means over features sharded across ranks: no rank ever holds more than its own shard.

:func:`~ccim_lightning.dictionary.kmeans.kmeans` needs every feature in one process, O(n·d) memory (3M x 2048
float32 features are 25 GB). :func:`distributed_kmeans` runs the same algorithm with each rank passing only its
shard and ``torch.distributed`` collectives (gloo or NCCL) carrying O(k·d) between them:

1. The global mean (all-reduced); every pass centres its row chunk on the fly, as :func:`kmeans` centres its points
   (float32 distances then do not cancel on the common component of ReLU features), without a centred copy.
2. k-means|| seeding (Bahmani et al., 2012) over the shards, with :func:`kmeans`'s schedule: a first point drawn
   uniformly over all ranks, then ``_SEEDING_ROUNDS`` rounds that each draw ``k`` candidates without replacement,
   with probability proportional to the squared distance to the candidates so far (Efraimidis-Spirakis keys: each
   rank keeps its ``k`` smallest keys, the ranks' keys are gathered and the ``k`` smallest overall win). The
   uniform numbers come from blocks of *global* row numbers, so the draws are those one process would make on the
   concatenated shards, whatever the world size. Candidates are weighted by how many points of all shards they are
   the nearest candidate of (all-reduced counts) and reduced to ``k`` seeds by :func:`kmeans`'s weighted greedy
   k-means++ (in its row-wise form, which needs no candidate-by-candidate matrix).
3. Lloyd iterations: each rank assigns its points; per-cluster sums (float64) and counts are all-reduced; the new
   centroids are their quotients. Clusters left empty receive the globally farthest points (from clusters with at
   least two members), as :func:`kmeans`'s torch path does; iterations stop once no assignment changes anywhere.
4. A final assignment, empty clusters filled, centroids recomputed as the members' means of the *original*
   features, and the inertia of that partition, all-reduced.

A rank's memory is its shard, a few per-row scalars (distance, cluster), O(k·d) centroids and sums, the candidate
pool ((5k + 1) x d) and (trials x pool) distances of the greedy seeding, and row chunks of at most
``_CHUNK_ENTRIES`` entries. The global row order is the ranks' shards concatenated in rank order; given the seed, the
result depends on the world size only through floating-point summation order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ccim_lightning.dictionary.kmeans import (
    _LOCAL_TRIALS,
    _SEEDING_ROUNDS,
    KMeansResult,
    _sample_proportional,
    _squared_distances,
)
from ccim_lightning.dictionary.refill import empty_cluster_moves

__all__ = ["DistributedKMeansResult", "all_gather_variable", "distributed_kmeans"]

logger = logging.getLogger(__name__)

_CHUNK_ENTRIES = {"cpu": 1 << 18}
"""Entries of the largest row chunk or distance block materialised at once, per device type (1 MiB of float32 on the
CPU, where the rank's memory is the point; on accelerators larger blocks keep the device busy)."""

_DEFAULT_CHUNK_ENTRIES = 1 << 24

_UNIFORM_BLOCK = 1 << 16
"""Global rows per block of seeding uniforms: block b of round r is drawn from the seed sequence (seed, r, b)."""


@dataclass(frozen=True)
class DistributedKMeansResult(KMeansResult):
    """The outcome of :func:`distributed_kmeans` on one rank, a :class:`KMeansResult` with global statistics.

    Tensors are on the device of the local features; ``centroids``, ``counts`` and ``inertia`` are global (identical
    on every rank) and ``assignments`` (n_r,) are the clusters of *this rank's* points.

    Attributes:
        world_size: Number of ranks that took part.
        rank: This rank within the group.
        num_points: Total number of points over all ranks.
    """

    world_size: int = 1
    rank: int = 0
    num_points: int = 0


class _Collectives:
    """Sum-reductions, gathers and broadcasts within one process group, or no-ops without one.

    Tensors travel on the device the backend needs (the CPU for gloo, CUDA for NCCL) and come back on their own.
    """

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        if group is not None and not self.active:
            raise ValueError("A process group was given but torch.distributed is not initialised")
        self.group = group
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        backend = str(dist.get_backend(group)) if self.active else ""
        if backend == "gloo":
            self.device = torch.device("cpu")
        elif backend == "nccl":
            self.device = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        else:  # a multi-device backend such as "cpu:gloo,cuda:nccl" takes tensors where they are
            self.device = device

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new tensor on the device of ``tensor``)."""
        if self.world_size == 1:
            return tensor.clone()
        moved = tensor.to(self.device, copy=True)
        dist.all_reduce(moved, group=self.group)
        return moved.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world_size, *shape): every rank's ``tensor`` (same shape on every rank), in rank order."""
        if self.world_size == 1:
            return tensor.unsqueeze(0).clone()
        moved = tensor.to(self.device).contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(parts, moved, group=self.group)
        return torch.stack(parts).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Group rank 0's ``tensor`` on every rank."""
        if self.world_size == 1:
            return tensor
        moved = tensor.to(self.device, copy=True)
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(moved, src=source, group=self.group)
        return moved.to(tensor.device)

    def all_gather_variable(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dimension 0 in rank order; first dimensions may differ."""
        if self.world_size == 1:
            return tensor.clone()
        row_shape = tuple(tensor.shape[1:])
        meta = torch.tensor([tensor.shape[0], tensor.ndim, *row_shape, -1][:8], dtype=torch.int64)
        meta = torch.nn.functional.pad(meta, (0, 8 - len(meta)), value=-1)
        metas = self.all_gather(meta)
        if not (metas[:, 1:] == metas[0, 1:]).all():
            shapes = ", ".join(
                f"rank {r}: ({int(m[0])}, {', '.join(str(int(v)) for v in m[2 : 1 + int(m[1])])})"
                for r, m in enumerate(metas)
            )
            raise ValueError(
                f"all_gather_variable needs tensors that differ only in their first dimension; got {shapes}"
            )
        sizes = metas[:, 0].tolist()
        wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor  # NCCL has no bool
        padded = wire.new_zeros((max(sizes), *row_shape))
        padded[: tensor.shape[0]] = wire
        gathered = self.all_gather(padded)
        out = torch.cat([gathered[r, :size] for r, size in enumerate(sizes)])
        return out.to(torch.bool) if tensor.dtype == torch.bool else out


def all_gather_variable(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenates every rank's ``tensor`` along dimension 0, in rank order, allowing unequal first dimensions.

    Each rank pads its tensor to the largest first dimension for one ``all_gather`` and the padding is cut off again.
    Without an initialised process group this returns a copy of ``tensor``.

    Args:
        tensor: (n_r, ...) on the device the backend uses (or any: it is moved there and back); the same trailing
            shape and dtype on every rank. Zero rows are allowed.
        group: Process group; the default group when ``None``.

    Returns:
        (sum of n_r, ...) on the device of ``tensor``.

    Raises:
        ValueError: The ranks' tensors differ in more than their first dimension (raised on every rank).
    """
    return _Collectives(group, tensor.device).all_gather_variable(tensor)


class _Shard:
    """This rank's points, read in centred float32 row chunks, with their squared norms and global row offset."""

    def __init__(self, x: torch.Tensor, mean: torch.Tensor, offset: int, total: int) -> None:
        self.x = x
        self.mean64 = mean
        self.mean = mean.float()
        self.offset = offset
        self.total = total
        self.rows, self.dim = x.shape
        self.entries = _CHUNK_ENTRIES.get(x.device.type, _DEFAULT_CHUNK_ENTRIES)
        self.norms = torch.empty(self.rows, dtype=torch.float32, device=x.device)
        for start, chunk in self.chunks(self.dim):
            self.norms[start : start + len(chunk)] = chunk.square().sum(1)

    def chunks(self, width: int, centred: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) pairs covering the shard, float32 (centred) or float64 (original) rows."""
        step = max(1, self.entries // max(width, self.dim))
        for start in range(0, self.rows, step):
            rows = self.x[start : start + step]
            # Always a new tensor: callers work on chunks in place and must never touch the caller's features.
            yield start, (rows.float() - self.mean) if centred else rows.to(torch.float64, copy=True)

    def nearest(self, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distance to and index of the nearest of ``centres`` (m, d), centred float32, for every row."""
        centre_norms = centres.square().sum(1)
        distances = torch.empty(self.rows, dtype=torch.float32, device=self.x.device)
        indices = torch.empty(self.rows, dtype=torch.int64, device=self.x.device)
        for start, chunk in self.chunks(len(centres)):
            block = torch.addmm(centre_norms, chunk, centres.T, alpha=-2.0)  # |c|^2 - 2 x.c
            block.add_(self.norms[start : start + len(chunk)].unsqueeze(1))
            values, index = block.min(1)
            distances[start : start + len(chunk)] = values.clamp_min_(0.0)
            indices[start : start + len(chunk)] = index
        return distances, indices

    def sums(self, assignments: torch.Tensor, num_clusters: int, centred: bool = True) -> torch.Tensor:
        """(k, d) float64 sums of this shard's rows (centred, or original) per cluster."""
        sums = torch.zeros(num_clusters, self.dim, dtype=torch.float64, device=self.x.device)
        for start, chunk in self.chunks(2 * self.dim, centred):  # the float64 copy is twice the entries' bytes
            sums.index_add_(0, assignments[start : start + len(chunk)], chunk.double())
        return sums

    def inertia(self, assignments: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """0-dim float64 sum of squared distances of the original rows to their (float32) centroid."""
        total = torch.zeros((), dtype=torch.float64, device=self.x.device)
        centroids = centroids.double()
        for start, chunk in self.chunks(2 * self.dim, centred=False):
            chunk.sub_(centroids[assignments[start : start + len(chunk)]])
            total += chunk.square_().sum()
        return total

    def local(self, global_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``global_rows`` this rank holds (a mask) and their local row numbers."""
        mine = (global_rows >= self.offset) & (global_rows < self.offset + self.rows)
        return mine, global_rows[mine] - self.offset

    def rows_at(self, global_rows: torch.Tensor, comm: _Collectives) -> torch.Tensor:
        """(m, d) centred float32 rows of the given global row numbers, whichever ranks hold them, on every rank.

        The holder writes each row, the other ranks zeros; the all-reduced sum is the row exactly.
        """
        out = torch.zeros(len(global_rows), self.dim, dtype=torch.float32, device=self.x.device)
        mine, local = self.local(global_rows)
        out[mine] = self.x[local].float() - self.mean
        return comm.all_reduce(out)

    def uniforms(self, seed: int, stream: int) -> torch.Tensor:
        """(n_r,) float64 uniforms in [0, 1) of this shard's global rows, the same whatever the sharding."""
        if self.rows == 0:
            return torch.empty(0, dtype=torch.float64, device=self.x.device)
        first, last = self.offset // _UNIFORM_BLOCK, (self.offset + self.rows - 1) // _UNIFORM_BLOCK
        blocks = [np.random.default_rng([seed, stream, b]).random(_UNIFORM_BLOCK) for b in range(first, last + 1)]
        start = self.offset - first * _UNIFORM_BLOCK
        values = np.concatenate(blocks)[start : start + self.rows]
        return torch.from_numpy(values).to(self.x.device)


@torch.no_grad()
def distributed_kmeans(
    local_features: torch.Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    num_iterations: int = 25,
    group: dist.ProcessGroup | None = None,
) -> DistributedKMeansResult:
    """Clusters the union of every rank's features into ``num_clusters`` groups; each rank passes only its shard.

    Call it on every rank of the group with the same ``num_clusters``, ``seed`` and ``num_iterations``. Without an
    initialised process group it clusters ``local_features`` alone. See the module docstring for the algorithm.

    Args:
        local_features: (n_r, d) this rank's features, any real dtype (read in float32 chunks, never copied
            whole). Shards may differ in size, down to zero rows. Keep them on the CPU for gloo and on this rank's
            GPU for NCCL (other placements work, moving O(k·d) tensors per collective).
        num_clusters: k, at most the total number of rows over all ranks.
        seed: Seed of the seeding draws; the same seed and world size give the same result.
        num_iterations: Most Lloyd iterations; they stop early once no assignment changes on any rank.
        group: Process group; the default group when ``None``.

    Returns:
        The :class:`DistributedKMeansResult` of this rank (global centroids, counts and inertia; local assignments).

    Raises:
        ValueError: On every rank, when any rank's features are not 2-D, dimensions differ between ranks, a rank has
            NaN/inf values (the message names the rank, the count and the first local row), there are fewer rows in
            all than ``num_clusters``, or an argument is out of range.
    """
    start = time.perf_counter()
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive integer; got {num_clusters!r}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1; got {num_iterations}")
    x = local_features.detach() if isinstance(local_features, torch.Tensor) else torch.as_tensor(local_features)
    comm = _Collectives(group, x.device)
    shard_sizes = _check_shards(x, num_clusters, comm)
    offset, total = sum(shard_sizes[: comm.rank]), sum(shard_sizes)
    mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    chunk_rows = max(1, _CHUNK_ENTRIES.get(x.device.type, _DEFAULT_CHUNK_ENTRIES) // (2 * x.shape[1]))
    for rows in x.split(chunk_rows):
        mean += rows.double().sum(0)
    shard = _Shard(x, comm.all_reduce(mean) / total, offset, total)
    if comm.rank == 0:
        logger.info(
            "distributed k-means: %d points (shards %s) of dimension %d into %d clusters on %d rank(s), seed %d",
            total,
            shard_sizes,
            shard.dim,
            num_clusters,
            comm.world_size,
            seed,
        )

    centroids = _seed_centres(shard, num_clusters, seed, comm)
    previous = None
    iterations = num_iterations
    for iteration in range(1, num_iterations + 1):
        distances, assignments = shard.nearest(centroids)
        if previous is not None and int(comm.all_reduce((assignments != previous).sum())) == 0:
            iterations = iteration
            break
        previous = assignments
        filled = _fill_empty_clusters(shard, assignments, distances, num_clusters, comm)
        sums = comm.all_reduce(shard.sums(filled, num_clusters))
        counts = comm.all_reduce(torch.bincount(filled, minlength=num_clusters))
        centroids = (sums / counts.clamp_min(1).unsqueeze(1)).float()
    else:
        distances, assignments = shard.nearest(centroids)
    del previous

    assignments = _fill_empty_clusters(shard, assignments, distances, num_clusters, comm)
    del distances
    counts = comm.all_reduce(torch.bincount(assignments, minlength=num_clusters))
    sums = comm.all_reduce(shard.sums(assignments, num_clusters, centred=False))
    centroids = (sums / counts.unsqueeze(1)).float()
    inertia = float(comm.all_reduce(shard.inertia(assignments, centroids)))
    seconds = time.perf_counter() - start
    if comm.rank == 0:
        logger.info(
            "distributed k-means done in %.2f s: %d iterations, inertia %.6g, cluster sizes %d..%d",
            seconds,
            iterations,
            inertia,
            int(counts.min()),
            int(counts.max()),
        )
    return DistributedKMeansResult(
        centroids=centroids,
        counts=counts,
        assignments=assignments,
        inertia=inertia,
        iterations=iterations,
        seconds=seconds,
        backend="distributed-torch",
        device=str(assignments.device),
        world_size=comm.world_size,
        rank=comm.rank,
        num_points=total,
    )


def _check_shards(x: torch.Tensor, num_clusters: int, comm: _Collectives) -> list[int]:
    """Every rank's row count, after checking all shards together (so that every rank raises the same error)."""
    well_formed = x.ndim == 2
    bad_rows, first_bad = 0, -1
    if well_formed:
        step = max(1, _CHUNK_ENTRIES.get(x.device.type, _DEFAULT_CHUNK_ENTRIES) // max(1, x.shape[1]))
        for start in range(0, x.shape[0], step):  # in chunks: a whole-shard boolean mask is a quarter of the shard
            bad = ~torch.isfinite(x[start : start + step]).all(1)
            if bool(bad.any()):
                first_bad = first_bad if first_bad >= 0 else start + int(bad.nonzero()[0, 0])
                bad_rows += int(bad.sum())
    status = torch.tensor(
        [x.ndim, x.shape[0] if well_formed else -1, x.shape[1] if well_formed else -1, bad_rows, first_bad],
        dtype=torch.int64,
    )
    table = comm.all_gather(status).tolist()
    wrong = [f"rank {r}: {ndim} dimension(s)" for r, (ndim, *_) in enumerate(table) if ndim != 2]
    if wrong:
        raise ValueError(
            f"local_features must be a 2-D (rows, feature_dim) tensor on every rank; got {', '.join(wrong)}"
        )
    dims = [row[2] for row in table]
    if len(set(dims)) > 1:
        raise ValueError(f"Every rank's features must have the same dimension; got {dims} (by rank)")
    non_finite = [
        f"rank {r}: {count} row(s), first local row {row}" for r, (*_, count, row) in enumerate(table) if count
    ]
    if non_finite:
        raise ValueError(
            f"Features contain NaN or infinite values ({'; '.join(non_finite)}); fix the feature extraction or drop "
            "those samples before clustering"
        )
    sizes = [row[1] for row in table]
    if sum(sizes) < num_clusters:
        raise ValueError(f"num_clusters ({num_clusters}) exceeds the number of points over all ranks ({sum(sizes)})")
    return sizes


def _seed_centres(shard: _Shard, num_clusters: int, seed: int, comm: _Collectives) -> torch.Tensor:
    """(k, d) centred float32 seeds: k-means|| candidates over the shards, reduced by weighted greedy k-means++."""
    generator = torch.Generator().manual_seed(seed)
    seed_key = seed & 0xFFFF_FFFF_FFFF_FFFF  # numpy seed sequences take non-negative integers
    if shard.total <= _SEEDING_ROUNDS * num_clusters + 1:  # as kmeans(): greedy k-means++ on all points
        pool = comm.all_gather_variable(shard.x.float() - shard.mean)
        weights = torch.ones(len(pool), dtype=torch.float64, device=pool.device)
    else:
        first = torch.randint(shard.total, (1,), generator=generator).to(shard.x.device)
        pool_parts = [shard.rows_at(first, comm)]
        closest, _ = shard.nearest(pool_parts[0])
        mine, local = shard.local(first)
        closest[local] = 0.0
        owner = torch.zeros(shard.rows, dtype=torch.int64, device=shard.x.device)
        pool_size = 1
        for round_ in range(_SEEDING_ROUNDS):
            remaining = int(comm.all_reduce((closest > 0).sum()))
            if remaining == 0:  # every point coincides with a candidate
                break
            chosen = _draw_without_replacement(shard, closest, min(num_clusters, remaining), seed_key, round_, comm)
            rows = shard.rows_at(chosen, comm)
            distances, nearest = shard.nearest(rows)
            mine, local = shard.local(chosen)
            distances[local] = 0.0  # exactly, rather than float32 cancellation noise
            nearest[local] = mine.nonzero().flatten()
            closer = distances < closest
            closest = torch.where(closer, distances, closest)
            owner = torch.where(closer, nearest + pool_size, owner)
            pool_parts.append(rows)
            pool_size += len(chosen)
        pool = torch.cat(pool_parts)
        weights = comm.all_reduce(torch.bincount(owner, minlength=pool_size)).double()
        del closest, owner
    # Every rank holds the same pool and weights; rank 0's choice is broadcast so that ranks whose BLAS differs in
    # the last bit (thread counts) still agree.
    seeds = comm.broadcast(_greedy_kmeans_plusplus(pool, weights, num_clusters, generator))
    return pool[seeds]


def _greedy_kmeans_plusplus(
    points: torch.Tensor, weights: torch.Tensor, num_clusters: int, generator: torch.Generator
) -> torch.Tensor:
    """Weighted greedy k-means++ over the candidate pool: ``kmeans._greedy_kmeans_plusplus`` in its row-wise form.

    The one-process function precomputes the candidate-by-candidate distances for pools up to 8192 candidates; with
    its temporaries that is about three (5k + 1)^2 float32 matrices (20 MB at k = 256), several times what a rank
    holds besides its shard. Here each step computes the distances of its ``_LOCAL_TRIALS`` trials only: the same
    draws and choices, (trials x pool) temporaries, a few times the arithmetic (still small next to one pass).

    Returns:
        (k,) int64 indices into ``points``.
    """
    norms = points.square().sum(1)

    def distances_to(index: torch.Tensor) -> torch.Tensor:
        rows = _squared_distances(points[index], norms[index], points, norms)
        rows[torch.arange(len(index), device=points.device), index] = 0.0
        return rows.double()

    chosen = torch.empty(num_clusters, dtype=torch.long, device=points.device)
    chosen[:1] = _sample_proportional(weights, 1, generator)
    closest = distances_to(chosen[:1])[0]
    for step in range(1, num_clusters):
        trials = _sample_proportional(weights * closest, _LOCAL_TRIALS, generator)
        trial_closest = torch.minimum(distances_to(trials), closest)
        best = (trial_closest @ weights).argmin()
        chosen[step] = trials[best]
        closest = trial_closest[best]
    return chosen


def _draw_without_replacement(
    shard: _Shard, weights: torch.Tensor, count: int, seed: int, round_: int, comm: _Collectives
) -> torch.Tensor:
    """``count`` distinct global rows drawn proportionally to ``weights`` over all shards, sorted.

    Efraimidis-Spirakis: row i gets the key Exp(1) / w_i from its global uniform and the ``count`` smallest keys
    win; the global winners are among the union of every rank's ``count`` smallest, so only those are gathered.
    """
    keys = -torch.log1p(-shard.uniforms(seed, round_)) / weights.double()  # weight 0 -> key inf
    local_keys, local_rows = keys.topk(min(count, shard.rows), largest=False)
    padded_keys = torch.full((count,), float("inf"), dtype=torch.float64, device=keys.device)
    padded_rows = torch.full((count,), -1, dtype=torch.int64, device=keys.device)
    padded_keys[: len(local_keys)] = local_keys
    padded_rows[: len(local_rows)] = local_rows + shard.offset
    all_keys, all_rows = comm.all_gather(padded_keys).flatten(), comm.all_gather(padded_rows).flatten()
    by_row = torch.argsort(all_rows, stable=True)  # ties in key (never among finite keys in practice) by row
    winners = by_row[torch.argsort(all_keys[by_row], stable=True)[:count]]
    return all_rows[winners].sort().values


def _fill_empty_clusters(
    shard: _Shard, assignments: torch.Tensor, distances: torch.Tensor, num_clusters: int, comm: _Collectives
) -> torch.Tensor:
    """Moves the globally farthest points, one per empty cluster, into the empty clusters (as :func:`kmeans`).

    Points are visited from the farthest from their centroid (ties by global row); a point moves only if its
    cluster keeps at least one member. A cluster of size one stays so, so at most one point per non-empty cluster
    is passed over and the ``k`` farthest points of all ranks always suffice: each rank contributes its ``k``
    farthest, every rank replays the same moves, and each applies those of its own points.
    """
    counts = comm.all_reduce(torch.bincount(assignments, minlength=num_clusters))
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return assignments
    if comm.rank == 0:
        logger.info("distributed k-means: moving the farthest points into %d empty cluster(s)", len(empty))
    take = min(num_clusters, shard.rows)
    values, local = distances.topk(take)
    padded = torch.full((3, num_clusters), -1.0, dtype=torch.float64, device=distances.device)
    padded[0, :] = -float("inf")
    padded[0, :take], padded[1, :take], padded[2, :take] = values.double(), local + shard.offset, assignments[local]
    gathered = comm.all_gather(padded).permute(1, 0, 2).reshape(3, -1).cpu()
    by_row = torch.argsort(gathered[1], stable=True)
    order = by_row[torch.argsort(-gathered[0, by_row], stable=True)]
    rows, clusters = gathered[1, order].long().tolist(), gathered[2, order].long().tolist()
    moved = assignments.clone()
    candidates = ((row, cluster) for row, cluster in zip(rows, clusters) if row >= 0)
    for row, cluster in empty_cluster_moves(empty, counts.tolist(), candidates):
        if shard.offset <= row < shard.offset + shard.rows:
            moved[row - shard.offset] = cluster
    return moved
