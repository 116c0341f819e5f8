"""Builds a confounder dictionary: masked context images -> scene CNN features -> k-means -> prototypes + prior.

The steps are plain functions so the Lightning callback (per rank, under DDP) and the standalone
``ccim build-dictionary`` command share them.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ccim_lightning.dictionary.features import ContextFeatureExtractor
from ccim_lightning.dictionary.kmeans import kmeans
from ccim_lightning.dictionary.store import ConfounderDictionary, dataset_fingerprint

log = logging.getLogger(__name__)


@dataclass
class ContextFeatures:
    """Scene features of a split's samples, in sample order.

    Attributes:
        features: (n, d) float32 features.
        indices: (n,) int64 sample index in the split.
        scenes: (n,) int64 true scene ids where the dataset knows them (synthetic data), else ``None``.
    """

    features: torch.Tensor
    indices: torch.Tensor
    scenes: torch.Tensor | None = None


def sample_identities(dataset: Dataset) -> list[str]:
    """Stable names of a dataset's samples, for the dictionary's dataset fingerprint.

    Datasets that know their samples (image path and box, or generator seed and index) define
    ``sample_identities()``; for any other dataset the class name and position are used, which cannot tell two
    datasets of the same class and size apart, so a warning says the cache check is weak.
    """
    identities = getattr(dataset, "sample_identities", None)
    if callable(identities):
        return [str(identity) for identity in identities()]
    log.warning(
        "%s has no sample_identities(); the dictionary cache can only check its class and size.",
        type(dataset).__name__,
    )
    return [f"{type(dataset).__name__}:{i}" for i in range(len(dataset))]


def dictionary_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, world_size: int = 1, rank: int = 0
) -> DataLoader:
    """A fixed-order loader over ``dataset``, sharded across ranks when ``world_size > 1``.

    The DistributedSampler pads the last shard with repeated samples so every rank runs the same number of
    batches (equal-sized collectives); :func:`gather_features` removes the repeats by sample index.
    """
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=num_workers,
        # Datasets that can skip undecodable images (on_bad_sample="skip") bring a collate that drops them.
        collate_fn=getattr(dataset, "collate_fn", None),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


@torch.no_grad()
def extract_context_features(
    extractor: ContextFeatureExtractor,
    loader: DataLoader,
    device: torch.device,
    *,
    progress: bool = True,
) -> ContextFeatures:
    """Runs the scene CNN over a loader of samples in the shared batch schema.

    Uses ``batch["context"]`` (the image with the subject filled with zeros, unless the dataset was asked for
    unmasked images) and ``batch["index"]``. On CUDA it runs in bfloat16 autocast with channels_last, where
    convolutions are fastest; features come back as float32.

    Args:
        extractor: The frozen scene CNN, already on ``device``.
        loader: Batches with ``context`` and ``index`` (and optionally ``scene``).
        device: Device of this rank.
        progress: Show a progress bar.

    Returns:
        The features of the samples this loader yields, on ``device``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    on_cuda = device.type == "cuda"
    if on_cuda:
        extractor = extractor.to(memory_format=torch.channels_last)
    features, indices, scenes = [], [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("Confounder dictionary: scene features", total=len(loader))
        for batch in loader:
            images = batch["context"].to(device, non_blocking=True)
            if on_cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_cuda):
                features.append(extractor(images).float())
            indices.append(batch["index"].to(device))
            if "scene" in batch:
                scenes.append(batch["scene"].to(device))
            bar.advance(task)
    if not features:
        raise ValueError("The dictionary loader yielded no batches: the training split is empty.")
    return ContextFeatures(torch.cat(features), torch.cat(indices).long(), torch.cat(scenes).long() if scenes else None)


def gather_features(
    local: ContextFeatures, all_gather: Callable[[torch.Tensor], torch.Tensor] | None, world_size: int
) -> ContextFeatures:
    """Collects every rank's features, drops the sampler's padding repeats and sorts by sample index.

    Args:
        local: This rank's shard (every rank has the same number of rows: DistributedSampler pads).
        all_gather: A collective returning (world_size, *shape) for a tensor (e.g. ``trainer.strategy.all_gather``);
            ``None`` in a single process.
        world_size: Number of ranks.

    Returns:
        All samples exactly once, in index order, so the result equals a single-process extraction.
    """
    if world_size > 1 and all_gather is not None:

        def flat(tensor: torch.Tensor) -> torch.Tensor:
            return all_gather(tensor).reshape(-1, *tensor.shape[1:])

        local = ContextFeatures(
            flat(local.features), flat(local.indices), None if local.scenes is None else flat(local.scenes)
        )
    order = torch.argsort(local.indices, stable=True)
    indices = local.indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    rows = order[keep]
    return ContextFeatures(
        local.features[rows], local.indices[rows], None if local.scenes is None else local.scenes[rows]
    )


def cluster_dictionary(
    gathered: ContextFeatures,
    num_prototypes: int,
    *,
    extractor_name: str,
    weights_digest: str,
    mask_subject: bool,
    seed: int,
    fingerprint: str,
    num_iterations: int = 25,
    pca_dim: int | None = None,
) -> ConfounderDictionary:
    """Clusters gathered features into the dictionary: centroids as prototypes, cluster shares as prior.

    Args:
        gathered: All training samples' features (see :func:`gather_features`).
        num_prototypes: N.
        extractor_name: Name of the scene CNN (metadata).
        weights_digest: Digest of its weights (metadata).
        mask_subject: Whether the subjects were masked (metadata).
        seed: k-means seed.
        fingerprint: :func:`~ccim_lightning.dictionary.dataset_fingerprint` of the split.
        num_iterations: Lloyd iterations.
        pca_dim: Optional PCA size before clustering (the paper mentions PCA without a size).

    Returns:
        The dictionary, with extra statistics (cluster sizes, time, NMI against true scenes when known).
    """
    start = time.perf_counter()
    result = kmeans(
        gathered.features,
        num_prototypes,
        seed=seed,
        num_iterations=num_iterations,
        pca_dim=pca_dim,
        sample_ids=gathered.indices.tolist(),
    )
    extra: dict = {
        "cluster_sizes": result.counts.tolist(),
        "kmeans_seconds": time.perf_counter() - start,
        "feature_dim": int(gathered.features.shape[1]),
    }
    if gathered.scenes is not None:
        from torchmetrics.functional.clustering import normalized_mutual_info_score

        assignments, scenes = result.assignments.cpu(), gathered.scenes.cpu()
        with warnings.catch_warnings():  # torch's notice about sparse invariant checks, from inside torchmetrics
            warnings.filterwarnings("ignore", message="Sparse invariant checks")
            extra["scene_nmi"] = float(normalized_mutual_info_score(assignments, scenes))
        # NMI is capped well below 1 when there are more clusters than scenes; purity (the share of samples whose
        # cluster's most common scene is theirs) says directly whether clusters mix scenes.
        joint = torch.zeros(num_prototypes, int(scenes.max()) + 1, dtype=torch.long)
        joint.index_put_((assignments, scenes), torch.ones_like(scenes), accumulate=True)
        extra["scene_purity"] = float(joint.max(dim=1).values.sum() / len(scenes))
    return ConfounderDictionary.from_clustering(
        result.centroids.cpu(),
        result.counts.cpu(),
        extractor=extractor_name,
        weights_digest=weights_digest,
        mask_subject=mask_subject,
        seed=seed,
        dataset_fingerprint=fingerprint,
        num_samples=int(gathered.features.shape[0]),
        inertia=float(result.inertia),
        extra=extra,
    )


def expected_cache_key(
    *,
    extractor: ContextFeatureExtractor,
    num_prototypes: int,
    mask_subject: bool,
    seed: int,
    source: str,
    fingerprint: str,
) -> dict:
    """What a cached dictionary's metadata must say to be reused by this run."""
    return {
        "extractor": extractor.name,
        "weights_digest": extractor.weights_digest,
        "num_prototypes": num_prototypes,
        "mask_subject": mask_subject,
        "seed": seed,
        "source": source,
        "dataset_fingerprint": fingerprint,
    }


def fingerprint_of(dataset: Dataset, extra: Sequence[str] = ()) -> str:
    """The dataset fingerprint of a split (identities of its samples plus any extra identity strings)."""
    return dataset_fingerprint([*sample_identities(dataset), *extra])
