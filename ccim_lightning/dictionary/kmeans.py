"""K-means for the confounder dictionary, one algorithm at every world size.

The CCIM paper builds its confounder dictionary Z with "K-Means++ with principal component analysis" over the scene
features of every training sample: z_i is the centroid of cluster i, P(z_i) its share of the samples. :func:`kmeans`
is that step. Each rank passes only its own rows; :class:`~ccim_lightning.dictionary.collectives.Collectives`
carries O(k·d) between ranks (nothing in one process):

1. Checks on every rank at once; the points centred on the global mean (with ``pca_dim``, projected on the leading
   eigenvectors of the all-reduced covariance), once, in float32.
2. Seeding of greedy k-means++ quality (:mod:`~ccim_lightning.dictionary.seeding`): every random draw is a fixed
   function of the seed and the row's *sample id*, never of its position or rank, so any split draws the same.
3. Lloyd iterations: each rank assigns its points (torch or FAISS, CPU or one GPU); per-cluster sums and counts are
   all-reduced; empty clusters take the globally farthest points (:func:`empty_cluster_moves`).
4. The centroids recomputed as the means of the members' *original* features (also with PCA), so that ``centroids``,
   ``counts``, ``assignments`` and ``inertia`` describe one and the same partition.

A rank holds its rows, one float32 centred copy, per-row scalars and O(k·d) centroids, sums and candidate pool.
Given the seed, the result depends on the world size only through floating-point summation order.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

from ccim_lightning.dictionary.collectives import Collectives
from ccim_lightning.dictionary.seeding import CHUNK_ENTRIES, nearest_centres, seed_centroids

__all__ = ["MIN_POINTS_PER_CLUSTER", "KMeansResult", "empty_cluster_moves", "kmeans"]

logger = logging.getLogger(__name__)

MIN_POINTS_PER_CLUSTER = 39
"""Fewer points per cluster than this (FAISS's own ``min_points_per_centroid``) makes :func:`kmeans` warn."""

_LISTED_ROWS = 10
"""How many offending rows an error message lists."""


@dataclass(frozen=True)
class KMeansResult:
    """The outcome of :func:`kmeans` on one rank; all tensors are on the CPU.

    Attributes:
        centroids: (k, d) float32, the mean of each cluster's members in the original feature space (global).
        counts: (k,) int64 cluster sizes over all ranks, all positive.
        assignments: (n_r,) int64 cluster of each of *this rank's* rows.
        inertia: Sum over all points of the squared Euclidean distance to their centroid, in the original space.
        iterations: Lloyd iterations run (fewer than asked when the assignment stopped changing).
        seconds: Wall time of the whole call.
        backend: ``"faiss-cpu"``, ``"faiss-gpu"``, ``"torch-gpu"`` or ``"torch-cpu"``.
        device: Device the assignment step ran on, such as ``"cpu"`` or ``"cuda:1"``.
        pca_dim: Dimension the points were clustered in when PCA was used, else ``None``.
        world_size: Number of ranks that took part.
    """

    centroids: torch.Tensor
    counts: torch.Tensor
    assignments: torch.Tensor
    inertia: float
    iterations: int
    seconds: float
    backend: str
    device: str
    pca_dim: int | None = None
    world_size: int = 1

    @property
    def num_clusters(self) -> int:
        """Number of clusters k."""
        return int(self.centroids.shape[0])


@torch.no_grad()
def kmeans(
    features: torch.Tensor | np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    num_iterations: int = 25,
    pca_dim: int | None = None,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    collectives: Collectives | None = None,
    device: torch.device | str | int | None = None,
    backend: Literal["auto", "faiss", "torch"] = "auto",
) -> KMeansResult:
    """Clusters the rows of every rank into ``num_clusters`` groups; call it on every rank with its own rows.

    Args:
        features: (n_r, d) this rank's features, a torch tensor (any float dtype, any device) or a numpy array. Ranks
            may hold different numbers of rows, down to zero.
        num_clusters: k, at most the number of rows over all ranks.
        seed: Seed of every random draw of the seeding.
        num_iterations: Most Lloyd iterations; they stop early once no assignment changes.
        pca_dim: Cluster on the first ``pca_dim`` principal components; the centroids are still original-space means.
        sample_ids: The rows' dataset indices, distinct over all ranks: they key the random draws (any split gives the
            same clusters) and name rows in errors. Default: the row's position in the rows of all ranks in order.
        collectives: The process group; default :meth:`Collectives.current`.
        device: Where the assignment step runs. Defaults to the device of ``features`` (CPU for numpy arrays). An
            integer means that CUDA device.
        backend: ``"auto"``: torch on the CPU (its matrix product outran FAISS's flat search 2-3x there, measured
            on 20,000 x 2048 against 256 centroids); on a CUDA device FAISS's GPU index when the installed FAISS has
            GPU support, else torch on that GPU. ``"faiss"``: FAISS (raises on a CUDA device without FAISS GPU
            support). ``"torch"``: torch on ``device``.

    Returns:
        This rank's :class:`KMeansResult` (global centroids, counts and inertia; this rank's assignments).

    Raises:
        ValueError: On every rank, when any rank's features are not 2-D, dimensions differ, there are NaN/inf values
            (the message lists sample ids), fewer rows in all than ``num_clusters``, or an argument is out of range.
        RuntimeError: ``backend="faiss"`` on a CUDA device while the installed FAISS has no GPU support.
    """
    start = time.perf_counter()
    group = collectives if collectives is not None else Collectives.current()
    x = _as_tensor(features)
    _check_arguments(num_clusters, num_iterations, backend)
    ids, total, largest = _check_rows(x, num_clusters, pca_dim, sample_ids, group)
    target = _resolve_device(device, x)
    backend_name = _resolve_backend(backend, target)
    if group.is_global_zero:
        pca = f", PCA to {pca_dim}" if pca_dim else ""
        logger.info(
            f"k-means: {total} points of dimension {x.shape[1]} into {num_clusters} clusters on {group.world_size} "
            f"rank(s), {target} (backend {backend_name}{pca}), seed {seed}, at most {num_iterations} iterations"
        )
    x = x.to(target)
    _warn_if_degenerate(x, num_clusters, total, group)
    points = _centred_points(x, largest, total, pca_dim, group)  # float32, on target
    ids = ids.to(target)
    seeding_start = time.perf_counter()
    centroids = seed_centroids(points, ids, num_clusters, seed, total, group)
    lloyd_start = time.perf_counter()
    assign = _assignment_step(points, backend_name, target)
    distances, assignments = assign(centroids)
    iterations = num_iterations
    for iteration in range(1, num_iterations + 1):
        filled = _refill(assignments, distances, ids, num_clusters, group)
        sums, counts = _sums(points, filled, num_clusters, group)
        centroids = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        previous = assignments
        distances, assignments = assign(centroids)
        if int(group.all_reduce((assignments != previous).sum())) == 0:
            iterations = iteration
            break
    assignments = _refill(assignments, distances, ids, num_clusters, group)
    del points, distances
    sums, counts = _sums(x, assignments, num_clusters, group, exact=True)
    centroids = (sums / counts.unsqueeze(1)).float()
    inertia = float(group.all_reduce(_inertia(x, assignments, centroids)))
    seconds = time.perf_counter() - start
    if group.is_global_zero:
        logger.info(
            f"k-means done in {seconds:.2f} s ({backend_name}; seeding {lloyd_start - seeding_start:.2f} s, Lloyd "
            f"{time.perf_counter() - lloyd_start:.2f} s): {iterations} iterations, inertia {inertia:.6g}, cluster "
            f"sizes {int(counts.min())}..{int(counts.max())}"
        )
    return KMeansResult(
        centroids=centroids.cpu(),
        counts=counts.cpu(),
        assignments=assignments.cpu(),
        inertia=inertia,
        iterations=iterations,
        seconds=seconds,
        backend=backend_name,
        device=str(target),
        pca_dim=pca_dim,
        world_size=group.world_size,
    )


# ------------------------------------------------------------------------------------------------------- checks
def _as_tensor(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The features as a floating-point tensor (numpy arrays are wrapped on the CPU without a copy if float32)."""
    if isinstance(features, torch.Tensor):
        x = features.detach()
    else:
        array = np.asarray(features)
        # float64 (and float16) stay as they are until the range check: a cast here would turn 1e40 into inf
        dtype = array.dtype if array.dtype in (np.float16, np.float64) else np.float32
        x = torch.from_numpy(np.require(array, dtype=dtype, requirements=["C", "W"]))
    return x if x.is_floating_point() else x.float()


def _check_arguments(num_clusters: int, num_iterations: int, backend: str) -> None:
    """Raises ValueError for out-of-range arguments (the same on every rank, so no agreement is needed)."""
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive integer; got {num_clusters!r}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1; got {num_iterations}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch'; got {backend!r}")


def _check_rows(
    x: torch.Tensor,
    num_clusters: int,
    pca_dim: int | None,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor | None,
    group: Collectives,
) -> tuple[torch.Tensor, int, float]:
    """Checks every rank's rows together, so that every rank raises the same error or none does.

    Returns:
        This rank's (n_r,) int64 sample ids (default: global row numbers), the total rows, the largest magnitude.
    """
    rows = x.shape[0] if x.ndim else 0
    if isinstance(sample_ids, torch.Tensor):
        ids = sample_ids.detach().cpu().long().flatten()
    else:
        ids = None if sample_ids is None else torch.as_tensor(np.asarray(sample_ids), dtype=torch.int64).flatten()
    bad = torch.zeros(0, dtype=torch.int64)
    largest = 0.0
    if x.ndim == 2 and (ids is None or len(ids) == rows):
        finite = torch.isfinite(x).all(dim=1).cpu()
        bad = (~finite).nonzero().flatten()
        if x.numel() and not bad.numel():
            largest = max(float(x.max()), -float(x.min()))
    status = torch.full((5 + _LISTED_ROWS,), -1, dtype=torch.int64)
    status[:5] = torch.tensor([x.ndim, rows, x.shape[1] if x.ndim == 2 else -1, -1 if ids is None else len(ids), 0])
    status[4] = bad.numel()
    table = group.all_gather(status).tolist()
    sizes = [row[1] for row in table]
    offset, total = sum(sizes[: group.rank]), sum(sizes)
    if ids is None:
        ids = torch.arange(offset, offset + rows, dtype=torch.int64)
    where = lambda r: f" on rank {r}" if group.world_size > 1 else ""  # noqa: E731
    for r, (ndim, count, _, id_count, *_) in enumerate(table):
        if ndim != 2:
            shape = f", shape {tuple(x.shape)}" if r == group.rank else ""
            raise ValueError(
                f"features must be a 2-D (num_samples, feature_dim) array{where(r)}; got {ndim} dimension(s){shape}"
            )
        if id_count not in (-1, count):
            raise ValueError(f"sample_ids has {id_count} entries for {count} feature rows{where(r)}")
    dims = [row[2] for row in table]
    if len(set(dims)) > 1:
        raise ValueError(f"Every rank's features must have the same dimension; got {dims} (by rank)")
    if total < num_clusters:
        raise ValueError(
            f"k-means needs at least as many points as clusters: got {total} feature rows for "
            f"num_clusters={num_clusters}; lower num_clusters or cluster more samples"
        )
    # the listed rows, named by sample id (or global row), rank by rank
    status[5 : 5 + len(bad[:_LISTED_ROWS])] = ids[bad[:_LISTED_ROWS]]
    named = [v for row in group.all_gather(status).tolist() for v in row[5:] if v >= 0]
    bad_rows = sum(row[4] for row in table)
    if bad_rows:
        what = "rows" if sample_ids is None else "sample ids"
        more = ", ..." if bad_rows > len(named[:_LISTED_ROWS]) else ""
        raise ValueError(
            f"features contain NaN or inf in {bad_rows} of {total} rows; first {what}: "
            f"{', '.join(map(str, named[:_LISTED_ROWS]))}{more}. Check the feature extractor on those samples or "
            "drop them"
        )
    if pca_dim is not None and not 1 <= pca_dim <= min(dims[0], total):
        raise ValueError(
            f"pca_dim must be between 1 and the smaller of the feature dimension ({dims[0]}) and the number of points "
            f"({total}); got {pca_dim}"
        )
    limit = torch.finfo(torch.float32).max
    largest = float(group.all_gather(torch.tensor([largest], dtype=torch.float64)).max())
    if largest > limit:
        raise ValueError(
            f"features reach magnitude {largest:.3g}, beyond the float32 range (largest {limit:.3g}) that k-means "
            "runs in; normalise them (e.g. divide by their largest norm or standardise each dimension) or reduce "
            "them with PCA before clustering"
        )
    if total < MIN_POINTS_PER_CLUSTER * num_clusters:
        warnings.warn(
            f"k-means with {total} points into {num_clusters} clusters leaves {total / num_clusters:.1f} "
            f"points per cluster on average (FAISS recommends at least {MIN_POINTS_PER_CLUSTER}); the centroids will "
            "be noisy, consider fewer clusters",
            UserWarning,
            stacklevel=4,  # past the no_grad wrapper, at the caller of kmeans()
        )
    return ids, total, largest


def _warn_if_degenerate(x: torch.Tensor, num_clusters: int, total: int, group: Collectives) -> None:
    """Logs a warning when there are surely fewer distinct rows than clusters: some centroids must then repeat."""
    distinct = torch.unique(x, dim=0).shape[0]  # a sort; about 0.25 s for 23,000 x 2048 on one CPU thread
    distinct = int(group.all_reduce(torch.tensor([distinct]))[0])  # exact in one process, an upper bound across ranks
    if distinct >= num_clusters:
        return
    bound = "" if group.world_size == 1 else "at most "
    what = f"all {total} feature rows are identical" if distinct == 1 else f"only {bound}{distinct} of {total} rows"
    what += "" if distinct == 1 else " are distinct"
    logger.warning(
        f"k-means: {what}, fewer than the {num_clusters} clusters asked for, so k-means cannot form {num_clusters} "
        "different clusters: centroids will repeat one another. Identical features usually mean blank or fully "
        f"masked images or a broken feature extractor; check those, or lower num_clusters to at most {distinct}"
    )


def _resolve_device(device: torch.device | str | int | None, x: torch.Tensor) -> torch.device:
    """The device to run on; a CUDA device without CUDA falls back to the CPU (logged)."""
    if device is None:
        target = x.device
    elif isinstance(device, int):
        target = torch.device("cuda", device)
    else:
        target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            logger.warning("k-means: %s requested but CUDA is not available; falling back to the CPU", target)
            return torch.device("cpu")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
    return target


def _faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend name for a requested backend and the resolved device."""
    if backend == "torch" or (backend == "auto" and device.type == "cpu"):
        return "torch-gpu" if device.type == "cuda" else f"torch-{device.type}"
    if device.type == "cpu":
        return "faiss-cpu"
    if device.type == "cuda":
        if _faiss_has_gpu():
            return "faiss-gpu"
        if backend == "faiss":
            raise RuntimeError(
                f"backend='faiss' on {device} needs a FAISS build with GPU support (the 'gpu' extra: faiss-gpu-cu12); "
                "the installed FAISS is CPU-only. Use backend='auto' to run the assignment step in torch on the GPU"
            )
        logger.info("k-means: the installed FAISS has no GPU support; the assignment step runs in torch on %s", device)
        return "torch-gpu"
    if backend == "faiss":
        raise RuntimeError(f"backend='faiss' runs on the CPU or a CUDA device, not on {device}")
    return f"torch-{device.type}"


# ------------------------------------------------------------------------------------------ centring and PCA
def _centred_points(
    x: torch.Tensor, largest: float, total: int, pca_dim: int | None, group: Collectives
) -> torch.Tensor:
    """This rank's rows scaled, centred on the global mean and optionally projected by PCA: (n_r, d or p) float32.

    Squared distances overflow float32 from |x| ~ 1e19 (FAISS then finds no nearest centroid and aborts the process)
    and underflow below |x| ~ 1e-19. Scaling by a power of two is exact and k-means is scale-invariant, so the
    clustering runs on x / 2^e with entries below 1 in magnitude. Centring keeps |x|^2 + |c|^2 - 2 x.c from cancelling
    on the large common component of non-negative (ReLU) features in float32.
    """
    scale = 1.0 if largest == 0.0 else math.ldexp(1.0, -math.frexp(largest)[1])
    points = x.to(torch.float32) * scale  # always a copy: the caller's features are never modified
    chunk = max(1, CHUNK_ENTRIES // max(1, points.shape[1]))
    mean = sum(
        (rows.double().sum(0) for rows in points.split(chunk)),
        torch.zeros(points.shape[1], dtype=torch.float64, device=points.device),
    )
    mean = group.all_reduce(mean) / total
    points -= mean.float()
    if pca_dim is None:
        return points
    start = time.perf_counter()
    # Written on the covariance rather than with faiss.PCAMatrix, which needs every row in one process: the (d, d)
    # sums of the ranks add up exactly to those of the concatenated rows. float32 products, float64 accumulation.
    covariance = torch.zeros(points.shape[1], points.shape[1], dtype=torch.float64, device=points.device)
    for rows in points.split(max(1, CHUNK_ENTRIES // points.shape[1])):
        covariance += (rows.T @ rows).double()
    covariance = group.all_reduce(covariance) / total
    # rank 0's eigenvectors on every rank: eigh on other hardware or thread counts may differ in the last bits
    projection = group.broadcast(torch.linalg.eigh(covariance.cpu()).eigenvectors[:, -pca_dim:].flip(1).float())
    if group.is_global_zero:
        logger.info("k-means: PCA %d -> %d dimensions in %.2f s", points.shape[1], pca_dim, time.perf_counter() - start)
    return points @ projection.to(points.device)


# ---------------------------------------------------------------------------------------------- Lloyd steps
def _assignment_step(points: torch.Tensor, backend: str, device: torch.device):
    """A function centroids -> (squared distance to, index of) each point's nearest centroid, on the backend."""
    if backend.startswith("torch"):
        norms = points.square().sum(1)
        return lambda centroids: nearest_centres(points, norms, centroids)
    data = points.cpu().numpy()
    resources = faiss.StandardGpuResources() if device.type == "cuda" else None

    def search(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if resources is not None:
            config = faiss.GpuIndexFlatConfig()
            config.device = device.index
            index = faiss.GpuIndexFlatL2(resources, centroids.shape[1], config)
        else:
            index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids.cpu().numpy()))
        distances, nearest = index.search(data, 1) if len(data) else (np.zeros((0, 1), "f4"), np.zeros((0, 1), "i8"))
        to = lambda a: torch.from_numpy(a[:, 0]).to(points.device)  # noqa: E731
        return to(distances).clamp_min_(0.0), to(nearest)

    return search


def _sums(x: torch.Tensor, assignments: torch.Tensor, num_clusters: int, group: Collectives, exact: bool = False):
    """(k, d) float64 per-cluster sums of x's rows over all ranks and (k,) int64 sizes.

    Within a chunk of rows the sums are float32 (fast, and precise enough for the Lloyd steps on unit-scaled points)
    unless ``exact``: the final means of the original features, whose magnitude may be anything, are float64 sums.
    """
    dtype = torch.float64 if exact else torch.float32
    sums = torch.zeros(num_clusters, x.shape[1], dtype=torch.float64, device=x.device)
    chunk = max(1, CHUNK_ENTRIES // (4 * max(1, x.shape[1])))
    for rows, labels in zip(x.split(chunk), assignments.split(chunk)):
        part = torch.zeros(num_clusters, x.shape[1], dtype=dtype, device=x.device)
        sums += part.index_add_(0, labels, rows.to(dtype)).double()
    return group.all_reduce(sums), group.all_reduce(torch.bincount(assignments, minlength=num_clusters))


def _inertia(x: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """0-dim float64 sum of squared distances of this rank's original rows to their (float32) centroid."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    chunk = max(1, CHUNK_ENTRIES // max(1, x.shape[1]))
    centroids = centroids.double()
    for rows, labels in zip(x.split(chunk), assignments.split(chunk)):
        total += (rows.double() - centroids[labels]).square().sum()
    return total


def _refill(
    assignments: torch.Tensor, distances: torch.Tensor, ids: torch.Tensor, num_clusters: int, group: Collectives
) -> torch.Tensor:
    """Empty clusters take the globally farthest points (:func:`empty_cluster_moves`); a new tensor if any moved.

    Each rank offers its ``k`` farthest points (a cluster of one never gives its point, so at most one point per
    non-empty cluster is passed over and ``k`` always suffice); every rank replays the same moves on the gathered
    candidates, ordered by distance and then by sample id, and applies those of its own points.
    """
    counts = group.all_reduce(torch.bincount(assignments, minlength=num_clusters))
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return assignments
    if group.is_global_zero:
        logger.info("k-means: moving the farthest points into %d empty cluster(s)", len(empty))
    values, local = distances.topk(min(num_clusters, len(distances)))
    table = torch.stack([values.double(), ids[local].double(), assignments[local].double(), local.double()], 1)
    table = torch.cat([table, torch.full_like(table[:, :1], group.rank)], 1).cpu()
    gathered = group.gather_unequal(table)
    by_id = torch.argsort(gathered[:, 1], stable=True)
    order = by_id[torch.argsort(-gathered[by_id, 0], stable=True)].tolist()
    candidates = ((row, int(gathered[row, 2])) for row in order)
    moved = assignments.clone()
    for row, cluster in empty_cluster_moves(empty, counts.tolist(), candidates):
        if int(gathered[row, 4]) == group.rank:
            moved[int(gathered[row, 3])] = cluster
    return moved


def empty_cluster_moves(
    empty: list[int], sizes: list[int], farthest_first: Iterable[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Which points refill the empty clusters: one ``(point, empty cluster)`` pair per empty cluster.

    Walks the candidates farthest from their centroid first and takes a point only if its cluster keeps at least one
    member, so no cluster empties in turn.

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
