"""K-means for the confounder dictionary (the paper's "K-Means++ with PCA"), one algorithm at every world size.

Each rank passes its own rows and O(k·d) travels between ranks. Steps: checks on every rank at once; the points
scaled and centred (optionally PCA-projected) in float32; seeding keyed by sample id (:mod:`.seeding`); Lloyd
iterations with all-reduced sums, empty clusters refilled (:func:`empty_cluster_moves`); the centroids recomputed as
means of the *original* features, so that centroids, counts, assignments and inertia describe one partition. The
world size changes the result only through floating-point summation order.
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
from ccim_lightning.dictionary.seeding import CHUNK_ENTRIES, nearest_centres, seed_centroids, smallest_keys

__all__ = ["MIN_POINTS_PER_CLUSTER", "KMeansResult", "empty_cluster_moves", "kmeans"]

logger = logging.getLogger(__name__)

MIN_POINTS_PER_CLUSTER = 39
"""Fewer points per cluster than this (FAISS's own ``min_points_per_centroid``) makes :func:`kmeans` warn."""

_LISTED_ROWS = 10  # offending rows an error message names


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


@torch.no_grad()
def kmeans(
    features: torch.Tensor | np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    num_iterations: int = 25,
    tolerance: float = 0.0,
    pca_dim: int | None = None,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    collectives: Collectives | None = None,
    device: torch.device | str | int | None = None,
    backend: Literal["auto", "faiss", "torch"] = "auto",
) -> KMeansResult:
    """Clusters the rows of every rank into ``num_clusters`` groups; call it on every rank with its own rows.

    Args:
        features: (n_r, d) this rank's rows, any float tensor or a numpy array; ranks may hold any number, even 0.
        num_clusters: k, at most the number of rows over all ranks.
        seed: Seed of every random draw of the seeding.
        num_iterations: Most Lloyd iterations; they stop early once no assignment changes.
        tolerance: Also stop when an iteration lowers the inertia by less than this share (0: off); not a fixed point.
        pca_dim: Cluster on the first ``pca_dim`` principal components; the centroids are still original-space means.
        sample_ids: The rows' dataset indices, distinct over all ranks: they key the random draws (any split gives the
            same clusters) and name rows in errors. Default: the row's position in the rows of all ranks in order.
        collectives: The process group; default :meth:`Collectives.current`.
        device: Where the assignment step runs (an int: that CUDA device); default: where ``features`` are.
        backend: ``"auto"``: torch on the CPU (its matrix product outran FAISS's flat search 2-3x on 20,000 x
            2048 against 256 centroids); on CUDA FAISS's GPU index if installed, else torch. ``"faiss"`` or
            ``"torch"``: that library on ``device``.

    Returns:
        This rank's :class:`KMeansResult` (global centroids, counts and inertia; this rank's assignments).

    Raises:
        ValueError: On every rank, for bad shapes, NaN/inf (naming sample ids), too few rows or bad arguments.
        RuntimeError: ``backend="faiss"`` on a CUDA device while the installed FAISS has no GPU support.
    """
    start = time.perf_counter()
    group = collectives if collectives is not None else Collectives.current()
    x = _as_tensor(features)
    _check_arguments(num_clusters, num_iterations, tolerance, backend)
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
    points, mean = _centred_points(x, largest, total, pca_dim, group)  # float32, on target
    ids = ids.to(target)
    seeding_start = time.perf_counter()
    centroids = seed_centroids(points, ids, num_clusters, seed, total, group)
    lloyd_start = time.perf_counter()
    assign = _assignment_step(points, backend_name, target)
    distances, assignments = assign(centroids)
    iterations, lloyd_inertia = num_iterations, math.inf
    for iteration in range(1, num_iterations + 1):
        filled = _refill(assignments, distances, ids, num_clusters, group)
        sums, counts = _sums(points, filled, num_clusters, group)
        centroids = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        previous = assignments
        distances, assignments = assign(centroids)
        last, lloyd_inertia = lloyd_inertia, float(group.all_reduce(distances.double().sum())) if tolerance else 0.0
        if int(group.all_reduce((assignments != previous).sum())) == 0 or last - lloyd_inertia < tolerance * last:
            iterations = iteration
            break
    assignments = _refill(assignments, distances, ids, num_clusters, group)
    del points, distances
    centroids, counts, inertia = _means_and_inertia(x, assignments, num_clusters, mean, group)
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


def _check_arguments(num_clusters: int, num_iterations: int, tolerance: float, backend: str) -> None:
    """Raises ValueError for out-of-range arguments (the same on every rank, so no agreement is needed)."""
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive integer; got {num_clusters!r}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1; got {num_iterations}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1); got {tolerance}")
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
    target = x.device if device is None else torch.device("cuda", device) if isinstance(device, int) else device
    target = torch.device(target)
    if target.type == "cuda" and not torch.cuda.is_available():
        logger.warning("k-means: %s requested but CUDA is not available; falling back to the CPU", target)
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device()) if str(target) == "cuda" else target


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend name for a requested backend and the resolved device."""
    torch_name = "torch-gpu" if device.type == "cuda" else f"torch-{device.type}"
    if backend == "torch" or (backend == "auto" and device.type == "cpu"):
        return torch_name
    if device.type == "cpu":
        return "faiss-cpu"
    if device.type == "cuda":
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            return "faiss-gpu"
        if backend == "faiss":
            raise RuntimeError(
                f"backend='faiss' on {device} needs a FAISS build with GPU support (the 'gpu' extra: faiss-gpu-cu12); "
                "the installed FAISS is CPU-only. Use backend='auto' to run the assignment step in torch on the GPU"
            )
        logger.info("k-means: the installed FAISS has no GPU support; the assignment step runs in torch on %s", device)
    elif backend == "faiss":
        raise RuntimeError(f"backend='faiss' runs on the CPU or a CUDA device, not on {device}")
    return torch_name


def _centred_points(
    x: torch.Tensor, largest: float, total: int, pca_dim: int | None, group: Collectives
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows scaled, centred and optionally PCA-projected, (n_r, d or p) float32; the (d,) float64 mean.

    Squared distances overflow float32 from |x| ~ 1e19 (FAISS then aborts the process) and underflow below 1e-19:
    scaling by a power of two is exact and k-means scale-invariant, so it runs on x / 2^e with entries below 1.
    Centring keeps |x|^2 + |c|^2 - 2 x.c from cancelling on the common component of ReLU features in float32.
    """
    scale = 1.0 if largest == 0.0 else math.ldexp(1.0, -math.frexp(largest)[1])
    points = x.to(torch.float32) * scale  # always a copy: the caller's features are never modified
    mean = group.all_reduce(points.sum(0, dtype=torch.float64)) / total
    points -= mean.float()
    if pca_dim is None:
        return points, mean / scale
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
    return points @ projection.to(points.device), mean / scale


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


def _sums(x: torch.Tensor, assignments: torch.Tensor, num_clusters: int, group: Collectives):
    """(k, d) float64 per-cluster sums of the unit-scaled points over all ranks (float32 within a chunk of rows)."""
    sums = torch.zeros(num_clusters, x.shape[1], dtype=torch.float64, device=x.device)
    chunk = max(1, CHUNK_ENTRIES // (4 * max(1, x.shape[1])))
    for rows, labels in zip(x.split(chunk), assignments.split(chunk)):
        sums += torch.zeros(num_clusters, x.shape[1], device=x.device).index_add_(0, labels, rows).double()
    return group.all_reduce(sums), group.all_reduce(torch.bincount(assignments, minlength=num_clusters))


def _means_and_inertia(
    x: torch.Tensor, assignments: torch.Tensor, num_clusters: int, mean: torch.Tensor, group: Collectives
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The (k, d) float32 member means of the original rows, (k,) sizes, and the inertia to those float32 means.

    One float64 pass instead of a second one for the inertia: per cluster, with S the sum of x - m over its n members
    and c its float32 mean, sum |x - c|^2 = sum |x - m|^2 - |S|^2 / n + n |S / n - (c - m)|^2 exactly. Taking m as
    the global mean keeps the subtraction from cancelling on a large common offset.
    """
    sums = torch.zeros(num_clusters, x.shape[1], dtype=torch.float64, device=x.device)
    squares = torch.zeros((), dtype=torch.float64, device=x.device)
    chunk = max(1, CHUNK_ENTRIES // (4 * max(1, x.shape[1])))
    for rows, labels in zip(x.split(chunk), assignments.split(chunk)):
        rows = rows.double() - mean
        sums.index_add_(0, labels, rows)
        squares += torch.dot(rows.view(-1), rows.view(-1))
    sums, squares = group.all_reduce(sums), group.all_reduce(squares)
    counts = group.all_reduce(torch.bincount(assignments, minlength=num_clusters))
    within = sums / counts.unsqueeze(1)
    centroids = (mean + within).float()
    rounding = counts * (within - (centroids.double() - mean)).square().sum(1)
    inertia = squares - (sums.square().sum(1) / counts).sum() + rounding.sum()
    return centroids, counts, max(0.0, float(inertia))


def _refill(
    assignments: torch.Tensor, distances: torch.Tensor, ids: torch.Tensor, num_clusters: int, group: Collectives
) -> torch.Tensor:
    """Empty clusters take the globally farthest points (:func:`empty_cluster_moves`); a new tensor if any moved.

    Each rank offers its ``k`` farthest points (enough: only clusters of one are passed over); every rank replays the
    same moves on the candidates, ordered by distance then sample id, and applies those of its own points.
    """
    counts = group.all_reduce(torch.bincount(assignments, minlength=num_clusters))
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return assignments
    if group.is_global_zero:
        logger.info("k-means: moving the farthest points into %d empty cluster(s)", len(empty))
    # (-distance, sample id, local row, rank, cluster) of the farthest points first
    table = smallest_keys(-distances, ids, num_clusters, group, payload=assignments).tolist()
    moved = assignments.clone()
    for row, cluster in empty_cluster_moves(empty, counts.tolist(), ((i, int(r[4])) for i, r in enumerate(table))):
        if int(table[row][3]) == group.rank:
            moved[int(table[row][2])] = cluster
    return moved


def empty_cluster_moves(
    empty: list[int], sizes: list[int], farthest_first: Iterable[tuple[int, int]]
) -> list[tuple[int, int]]:
    """One ``(point, empty cluster)`` move per cluster of ``empty``, taking points whose cluster keeps a member.

    ``farthest_first`` holds ``(point, its cluster)`` candidates, farthest first; ``sizes``: before the moves.

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
