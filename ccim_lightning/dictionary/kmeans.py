"""K-means for the confounder dictionary: k-means++ seeding, Lloyd iterations in FAISS, optional PCA.

The CCIM paper builds its confounder dictionary Z with "K-Means++ with principal component analysis" over the scene
features of every training sample: z_i is the centroid of cluster i, P(z_i) its share of the samples. :func:`kmeans`
is that step:

1. Optional PCA (``faiss.PCAMatrix``) to ``pca_dim`` dimensions; the clustering runs in that space.
2. Seeding of k-means++ quality (:func:`_kmeans_plusplus_seeds`, hand-written in torch so that every backend shares
   it; the reason is in its docstring).
3. Lloyd iterations on all points (FAISS's subsampling is switched off): ``faiss.Clustering`` over a flat L2 index
   on the CPU or on one GPU, or a torch loop when the installed FAISS has no GPU support.
4. A final assignment of every point, clusters left empty filled with the points farthest from their centroids, and
   the centroids recomputed as the mean of their members' *original* features (also when PCA is used), so that
   ``centroids``, ``counts``, ``assignments`` and ``inertia`` describe one and the same partition.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

from ccim_lightning.dictionary.refill import fill_empty_clusters

__all__ = ["MIN_POINTS_PER_CLUSTER", "KMeansResult", "kmeans"]

logger = logging.getLogger(__name__)

MIN_POINTS_PER_CLUSTER = 39
"""Fewer points per cluster than this (FAISS's own ``min_points_per_centroid``) makes :func:`kmeans` warn."""

_SEEDING_ROUNDS = 5
"""Oversampling rounds of the seeding, each drawing ``num_clusters`` candidates."""

_LOCAL_TRIALS = 20
"""Candidates drawn per greedy k-means++ step (scikit-learn draws 2 + ln k; more gives better seeds here, cheaply)."""

_MAX_PAIRWISE_ENTRIES = 1 << 26
"""Largest candidate-by-candidate distance matrix the seeding precomputes (256 MiB in float32)."""

_CHUNK_ENTRIES = 1 << 24
"""Entries of the largest temporary (distance block, float64 copy of rows) the torch code materialises at once."""

_LISTED_ROWS = 10
"""How many offending rows an error message lists."""


@dataclass(frozen=True)
class KMeansResult:
    """The outcome of :func:`kmeans`; all tensors are on the CPU.

    Attributes:
        centroids: (k, d) float32, the mean of each cluster's members in the original feature space.
        counts: (k,) int64 cluster sizes, all positive, summing to the number of points.
        assignments: (n,) int64 cluster of each point.
        inertia: Sum over points of the squared Euclidean distance to their centroid, in the original space.
        iterations: Lloyd iterations run (fewer than asked when the assignment stopped changing).
        seconds: Wall time of the whole call.
        backend: ``"faiss-cpu"``, ``"faiss-gpu"``, ``"torch-gpu"`` or ``"torch-cpu"`` (``backend="torch"`` on the CPU).
        device: Device the assignment step ran on, such as ``"cpu"`` or ``"cuda:1"``.
        pca_dim: Dimension the points were clustered in when PCA was used, else ``None``.
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

    @property
    def num_clusters(self) -> int:
        """Number of clusters k."""
        return int(self.centroids.shape[0])


def kmeans(
    features: torch.Tensor | np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    num_iterations: int = 25,
    pca_dim: int | None = None,
    device: torch.device | str | int | None = None,
    backend: Literal["auto", "faiss", "torch"] = "auto",
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> KMeansResult:
    """Clusters feature vectors into ``num_clusters`` groups with k-means (k-means++ seeding, FAISS Lloyd steps).

    Deterministic for a given ``seed``, input and backend. Progress and the backend used are logged on the
    ``ccim_lightning.dictionary.kmeans`` logger.

    Args:
        features: (n, d) features, a torch tensor (any float dtype, any device) or a numpy array.
        num_clusters: k, at most n.
        seed: Seed of the k-means++ seeding (and of FAISS's splitting of large clusters into empty ones).
        num_iterations: Most Lloyd iterations; they stop early once the assignment no longer changes.
        pca_dim: When given, the points are projected on their first ``pca_dim`` principal components
            (``faiss.PCAMatrix``) before clustering; the centroids are still means of the original features.
        device: Where the assignment step runs. Defaults to the device of ``features`` (CPU for numpy arrays). On a
            CUDA device only that GPU is used. An integer means that CUDA device.
        backend: ``"auto"``: FAISS on the CPU; on a CUDA device FAISS's GPU index when the installed FAISS has GPU
            support, else the torch loop on that GPU. ``"faiss"``: FAISS (raises on a CUDA device without FAISS GPU
            support). ``"torch"``: the torch Lloyd loop on ``device``, CPU included.
        sample_ids: Optional dataset index of each row, used instead of row numbers in error messages.

    Returns:
        The :class:`KMeansResult`.

    Raises:
        ValueError: ``features`` is not 2-D, has fewer rows than ``num_clusters`` or NaN/inf values; or an argument
            is out of range.
        RuntimeError: ``backend="faiss"`` on a CUDA device while the installed FAISS has no GPU support.
    """
    start = time.perf_counter()
    x = _as_tensor(features)
    num_points, dim = x.shape
    _check_arguments(x, num_clusters, num_iterations, pca_dim, backend, sample_ids)
    target = _resolve_device(device, x)
    backend_name = _resolve_backend(backend, target)
    logger.info(
        "k-means: %d points of dimension %d into %d clusters on %s (backend %s%s), seed %d, at most %d iterations",
        num_points,
        dim,
        num_clusters,
        target,
        backend_name,
        f", PCA to {pca_dim}" if pca_dim else "",
        seed,
        num_iterations,
    )

    _check_float32_range(x)
    x = x.to(device=target if backend_name.startswith("torch") else "cpu", dtype=torch.float32).contiguous()
    _warn_if_degenerate(x, num_clusters)
    # Squared distances overflow float32 from |x| ~ 1e19 (FAISS then finds no nearest centroid and aborts the process)
    # and underflow below |x| ~ 1e-19. Scaling by a power of two is exact and k-means is scale-invariant, so the
    # clustering runs on x / 2^e with entries below 1 in magnitude; the centroids are means of the unscaled x.
    points = x * _unit_scale(x)
    generator = torch.Generator().manual_seed(seed)
    if pca_dim is not None:  # the PCA output is centred already
        points = _pca(points, pca_dim)
    else:
        # Distances are translation-invariant; centring keeps |x|^2 + |c|^2 - 2 x.c from cancelling on the large
        # common component of non-negative (ReLU) features in float32, and shrinks the error of TF32 products where a
        # caller has enabled them (torch's global precision flags are left alone).
        points -= points.mean(0)
    seeding_start = time.perf_counter()
    seeds = _kmeans_plusplus_seeds(points.to(target), num_clusters, generator)
    init = points[seeds.to(points.device)]
    lloyd_start = time.perf_counter()
    if backend_name.startswith("faiss"):
        distances, assignments, iterations = _lloyd_faiss(points, init, num_iterations, seed, target)
    else:
        distances, assignments, iterations = _lloyd_torch(points, init, num_iterations)
    assignments = fill_empty_clusters(assignments, distances, num_clusters)
    centroids, counts, inertia = _cluster_means(x, assignments, num_clusters)

    seconds = time.perf_counter() - start
    logger.info(
        "k-means done in %.2f s (%s; seeding %.2f s, Lloyd %.2f s): %d iterations, inertia %.6g, cluster sizes %d..%d",
        seconds,
        backend_name,
        lloyd_start - seeding_start,
        time.perf_counter() - lloyd_start,
        iterations,
        inertia,
        int(counts.min()),
        int(counts.max()),
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
    )


def _as_tensor(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The features as a 2-D floating-point tensor (numpy arrays are wrapped on the CPU without a copy if float32)."""
    if isinstance(features, torch.Tensor):
        x = features.detach()
    else:
        array = np.asarray(features)
        # float64 (and float16) stay as they are until the range check: a cast here would turn 1e40 into inf
        dtype = array.dtype if array.dtype in (np.float16, np.float64) else np.float32
        x = torch.from_numpy(np.require(array, dtype=dtype, requirements=["C", "W"]))
    if x.ndim != 2:
        raise ValueError(
            f"features must be a 2-D (num_samples, feature_dim) array; got {x.ndim} dimension(s), shape "
            f"{tuple(x.shape)}"
        )
    if not x.is_floating_point():
        x = x.float()
    return x


def _check_arguments(
    x: torch.Tensor,
    num_clusters: int,
    num_iterations: int,
    pca_dim: int | None,
    backend: str,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor | None,
) -> None:
    """Raises ValueError for out-of-range arguments or non-finite features; warns when clusters would be small."""
    num_points, dim = x.shape
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive integer; got {num_clusters!r}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1; got {num_iterations}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch'; got {backend!r}")
    if pca_dim is not None and not 1 <= pca_dim <= min(dim, num_points):
        raise ValueError(
            f"pca_dim must be between 1 and the smaller of the feature dimension ({dim}) and the number of points "
            f"({num_points}); got {pca_dim}"
        )
    if sample_ids is not None and len(sample_ids) != num_points:
        raise ValueError(f"sample_ids has {len(sample_ids)} entries for {num_points} feature rows")
    if num_points < num_clusters:
        raise ValueError(
            f"k-means needs at least as many points as clusters: got {num_points} feature rows for "
            f"num_clusters={num_clusters}; lower num_clusters or cluster more samples"
        )
    bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
    if bad.numel():
        first = bad[:_LISTED_ROWS].cpu()
        if sample_ids is None:
            what, listed = "rows", first.tolist()
        else:
            what, listed = "sample ids", [_plain(sample_ids[i]) for i in first.tolist()]
        more = ", ..." if bad.numel() > _LISTED_ROWS else ""
        raise ValueError(
            f"features contain NaN or inf in {bad.numel()} of {num_points} rows; first {what}: "
            f"{', '.join(map(str, listed))}{more}. Check the feature extractor on those samples or drop them"
        )
    if num_points < MIN_POINTS_PER_CLUSTER * num_clusters:
        warnings.warn(
            f"k-means with {num_points} points into {num_clusters} clusters leaves {num_points / num_clusters:.1f} "
            f"points per cluster on average (FAISS recommends at least {MIN_POINTS_PER_CLUSTER}); the centroids will "
            "be noisy, consider fewer clusters",
            UserWarning,
            stacklevel=3,
        )


def _check_float32_range(x: torch.Tensor) -> None:
    """Raises ValueError when finite features (float64, say) overflow float32, the precision k-means runs in."""
    limit = torch.finfo(torch.float32).max
    if torch.finfo(x.dtype).max <= limit or x.numel() == 0:
        return
    largest = float(x.abs().max())
    if largest > limit:
        raise ValueError(
            f"features reach magnitude {largest:.3g}, beyond the float32 range (largest {limit:.3g}) that k-means "
            "runs in; normalise them (e.g. divide by their largest norm or standardise each dimension) or reduce "
            "them with PCA before clustering"
        )


def _unit_scale(x: torch.Tensor) -> float:
    """The power of two that brings the largest magnitude in x into [0.5, 1) (1.0 for all-zero features)."""
    largest = max(float(x.max()), -float(x.min())) if x.numel() else 0.0
    return 1.0 if largest == 0.0 else math.ldexp(1.0, -math.frexp(largest)[1])


def _warn_if_degenerate(x: torch.Tensor, num_clusters: int) -> None:
    """Logs a warning when x has fewer distinct rows than clusters: some centroids must then repeat others."""
    distinct = torch.unique(x, dim=0).shape[0]  # a sort; about 0.25 s for 23,000 x 2048 on one CPU thread
    if distinct >= num_clusters:
        return
    rows = x.shape[0]
    what = f"all {rows} feature rows are identical" if distinct == 1 else f"only {distinct} of {rows} rows are distinct"
    logger.warning(
        f"k-means: {what}, fewer than the {num_clusters} clusters asked for, so k-means cannot form {num_clusters} "
        "different clusters: centroids will repeat one another. Identical features usually mean blank or fully "
        f"masked images or a broken feature extractor; check those, or lower num_clusters to at most {distinct}"
    )


def _plain(value: object) -> object:
    """A numpy or torch scalar as a Python number, for messages."""
    return value.item() if hasattr(value, "item") else value


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
    if backend == "torch":
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


def _pca(x: torch.Tensor, pca_dim: int) -> torch.Tensor:
    """Projects the rows of x on their first ``pca_dim`` principal components with ``faiss.PCAMatrix``."""
    start = time.perf_counter()
    data = x.cpu().numpy()
    pca = faiss.PCAMatrix(data.shape[1], pca_dim)
    pca.train(data)
    projected = torch.from_numpy(pca.apply(data)).to(x.device)
    logger.info("k-means: PCA %d -> %d dimensions in %.2f s", data.shape[1], pca_dim, time.perf_counter() - start)
    return projected


def _squared_distances(a: torch.Tensor, a_norms: torch.Tensor, b: torch.Tensor, b_norms: torch.Tensor) -> torch.Tensor:
    """(p, q) squared Euclidean distances between the rows of a (p, d) and b (q, d), given |a|^2 and |b|^2."""
    return (a_norms.unsqueeze(1) + b_norms - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _nearest(x: torch.Tensor, x_norms: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest centroid of every row of x (row chunks bound the memory)."""
    norms = centroids.square().sum(1)
    chunk = max(1, _CHUNK_ENTRIES // centroids.shape[0])
    distances, indices = [], []
    for rows, rows_norms in zip(x.split(chunk), x_norms.split(chunk)):
        values, index = _squared_distances(rows, rows_norms, centroids, norms).min(1)
        distances.append(values)
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def _sample_proportional(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices drawn with replacement with probability proportional to ``weights`` (inverse CDF).

    The uniform numbers come from the CPU generator whatever the device, so a seed means the same draws everywhere.
    """
    cumulative = weights.double().cumsum(0)
    uniform = torch.rand(count, generator=generator, dtype=torch.float64).to(weights.device)
    index = torch.searchsorted(cumulative, uniform * cumulative[-1], right=True)
    return index.clamp_(max=weights.numel() - 1)


def _sample_without_replacement(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices with positive weight, drawn proportionally to ``weights`` (at least ``count`` > 0).

    Efraimidis-Spirakis: each index gets the key Exp(1) / weight and the ``count`` smallest keys win.
    """
    uniform = torch.rand(weights.numel(), generator=generator, dtype=torch.float64).to(weights.device)
    keys = -torch.log1p(-uniform) / weights.double()  # weight 0 -> key inf
    return keys.topk(count, largest=False).indices


def _kmeans_plusplus_seeds(x: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``num_clusters`` rows of x to start Lloyd's iterations from, of greedy k-means++ quality.

    Hand-written rather than left to FAISS: ``faiss.Clustering`` seeds with random points; FAISS 1.12+ also offers
    k-means++, but the plain variant (one candidate per step) and on the CPU only. On clustered 2048-d features with
    k=256 either start ends Lloyd's iterations several percent above scikit-learn's greedy k-means++. Greedy
    k-means++ itself costs a pass over all points per step and candidate (k * trials skinny, memory-bound matrix
    products), which is slow on a CPU.

    So the seeding works in two vectorised stages:

    1. Oversampling (k-means||, Bahmani et al., 2012): from one uniformly drawn point, ``_SEEDING_ROUNDS`` rounds
       each draw ``num_clusters`` new candidates proportionally to the squared distance to the candidates so far and
       update those distances with one large matrix product. Each candidate is weighted by the number of points it is
       the nearest candidate of.
    2. Reduction: weighted greedy k-means++ over the candidates (:func:`_greedy_kmeans_plusplus`).

    When the data set is no larger than the candidate pool, stage 2 runs on all points with unit weights, which is
    greedy k-means++ itself.

    Args:
        x: (n, d) points, on any device.
        num_clusters: k, at most n.
        generator: CPU generator for every random draw.

    Returns:
        (k,) int64 row indices, on the device of x.
    """
    num_points = x.shape[0]
    if num_points <= _SEEDING_ROUNDS * num_clusters + 1:
        candidates = torch.arange(num_points, device=x.device)
        weights = torch.ones(num_points, dtype=torch.float64, device=x.device)
    else:
        norms = x.square().sum(1)
        first = torch.randint(num_points, (1,), generator=generator).to(x.device)
        chosen = [first]
        closest = _squared_distances(x[first], norms[first], x, norms)[0]
        closest[first] = 0.0
        owner = torch.zeros(num_points, dtype=torch.long, device=x.device)
        for _ in range(_SEEDING_ROUNDS):
            remaining = int((closest > 0).sum())
            if remaining == 0:  # every point coincides with a candidate
                break
            new = _sample_without_replacement(closest, min(num_clusters, remaining), generator)
            distances, nearest = _nearest(x, norms, x[new])
            offset = sum(len(c) for c in chosen)
            distances[new] = 0.0  # exactly, rather than float32 cancellation noise
            nearest[new] = torch.arange(len(new), device=x.device)
            closer = distances < closest
            closest = torch.where(closer, distances, closest)
            owner = torch.where(closer, nearest + offset, owner)
            chosen.append(new)
        candidates = torch.cat(chosen)
        weights = torch.bincount(owner, minlength=len(candidates)).double()
    return candidates[_greedy_kmeans_plusplus(x[candidates], weights, num_clusters, generator)]


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


def _lloyd_faiss(
    points: torch.Tensor, init: torch.Tensor, num_iterations: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's iterations with ``faiss.Clustering`` from the given centroids, on all points.

    On a CUDA device the index is a ``GpuIndexFlatL2`` on that device alone. FAISS refills empty clusters by
    splitting large ones.

    Returns:
        Squared distance to and index of each point's nearest final centroid (CPU tensors), and the iterations run.
    """
    num_clusters, dim = init.shape
    data = points.cpu().numpy()
    params = faiss.ClusteringParameters()
    params.niter = num_iterations
    params.seed = seed
    params.verbose = False
    params.min_points_per_centroid = 1  # kmeans() warns about small clusters itself; FAISS would print to stderr
    params.max_points_per_centroid = -(-data.shape[0] // num_clusters)  # no subsampling: every point counts
    clustering = faiss.Clustering(dim, num_clusters, params)
    faiss.copy_array_to_vector(np.ascontiguousarray(init.cpu().numpy()).ravel(), clustering.centroids)

    resources = None  # must outlive the GPU index
    if device.type == "cuda":
        resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = device.index
        index = faiss.GpuIndexFlatL2(resources, dim, config)
    else:
        index = faiss.IndexFlatL2(dim)
    clustering.train(data, index)  # leaves the final centroids in the index
    iterations = clustering.iteration_stats.size()
    distances, assignments = index.search(data, 1)
    del index, resources
    return torch.from_numpy(distances[:, 0]), torch.from_numpy(assignments[:, 0]), iterations


def _lloyd_torch(
    points: torch.Tensor, init: torch.Tensor, num_iterations: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's iterations in torch on the device of ``points`` (a CUDA device without FAISS GPU support).

    Written out rather than plugging a torch dataset object into ``faiss.contrib.clustering.kmeans``: that loop draws
    its own random initial centroids (the k-means++ seeds cannot be passed), prints unconditionally and brings the
    assignment back to numpy on every iteration. Empty clusters are refilled as in the final step
    (:func:`~ccim_lightning.dictionary.refill.fill_empty_clusters`) instead of by FAISS's splitting of large clusters.

    Returns:
        Squared distance to and index of each point's nearest final centroid, and the iterations run.
    """
    num_clusters = init.shape[0]
    norms = points.square().sum(1)
    centroids = init
    previous = None
    for iteration in range(1, num_iterations + 1):
        distances, assignments = _nearest(points, norms, centroids)
        if previous is not None and torch.equal(assignments, previous):
            return distances, assignments, iteration
        previous = assignments
        filled = fill_empty_clusters(assignments, distances, num_clusters)
        centroids = _member_means(points, filled, num_clusters)[0].float()
    distances, assignments = _nearest(points, norms, centroids)
    return distances, assignments, num_iterations


def _member_means(x: torch.Tensor, assignments: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, d) float64 mean of each cluster's rows of x and the (k,) int64 sizes; sums accumulate in float64."""
    counts = torch.bincount(assignments, minlength=num_clusters)
    sums = torch.zeros(num_clusters, x.shape[1], dtype=torch.float64, device=x.device)
    chunk = max(1, _CHUNK_ENTRIES // x.shape[1])
    for rows, labels in zip(x.split(chunk), assignments.split(chunk)):
        sums.index_add_(0, labels, rows.double())
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def _cluster_means(
    x: torch.Tensor, assignments: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Float32 centroids (member means of x), int64 sizes and the inertia of the partition, on the device of x."""
    assignments = assignments.to(x.device)
    means, counts = _member_means(x, assignments, num_clusters)
    centroids = means.float()
    inertia = torch.zeros((), dtype=torch.float64, device=x.device)
    chunk = max(1, _CHUNK_ENTRIES // x.shape[1])
    for rows, labels in zip(x.split(chunk), assignments.split(chunk)):
        inertia += (rows.double() - centroids[labels].double()).square().sum()
    return centroids, counts, float(inertia)
