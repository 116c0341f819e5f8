"""The one owner of the confounder dictionary: its settings, its cache key, and load-or-build on every rank.

:class:`DictionaryRecipe` is used by ``ConfounderDictionaryCallback`` (before fitting), ``ccim build-dictionary``,
``ccim bias-report`` (cluster mode) and ``benchmarks/debias.py``, so all of them build, key and reuse a dictionary
the same way. The build: the datamodule's ``dictionary_dataset(mask_subject=...)`` (train split, eval transforms,
subject filled with zeros) -> the scene CNN on this rank's device, each rank over its own shard -> the sampler's
padding repeats removed -> one k-means over the ranks' shards (draws keyed by sample index, so every world size
builds the same dictionary) -> assembled on rank 0 and broadcast. Every rank returns the same
:class:`~ccim_lightning.dictionary.store.ConfounderDictionary`, with each training sample's cluster in sample-index
order.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ccim_lightning.dictionary.collectives import Collectives as ProcessGroup
from ccim_lightning.dictionary.collectives import RankFailedError  # noqa: F401 - raised by _agreed; importable here
from ccim_lightning.dictionary.features import ContextFeatureExtractor
from ccim_lightning.dictionary.kmeans import kmeans
from ccim_lightning.dictionary.store import (
    ConfounderDictionary,
    DictionaryFileError,
    check_cache_path,
    dataset_fingerprint,
)

log = logging.getLogger(__name__)


class Collectives(Protocol):
    """What the recipe needs from the process group: a Lightning ``Strategy`` (``trainer.strategy``) has it all."""

    @property
    def root_device(self) -> torch.device: ...

    @property
    def world_size(self) -> int: ...

    @property
    def global_rank(self) -> int: ...

    @property
    def is_global_zero(self) -> bool: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool: ...


@dataclass
class ContextFeatures:
    """Scene features of a split's samples.

    Attributes:
        features: (n, d) float32 features.
        indices: (n,) int64 sample index in the split.
        targets: (n,) int64 labels or (n, C) float multi-hot targets, or ``None`` where the batches have none.
        scenes: (n,) int64 true scene ids where the dataset knows them (synthetic data), else ``None``.
    """

    features: torch.Tensor
    indices: torch.Tensor
    targets: torch.Tensor | None = None
    scenes: torch.Tensor | None = None

    def rows(self, rows: torch.Tensor) -> ContextFeatures:
        """The subset of these rows."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return ContextFeatures(self.features[rows], self.indices[rows], pick(self.targets), pick(self.scenes))


def sample_identities(dataset: Dataset) -> list[str]:
    """Stable names of a dataset's samples, for the dictionary's dataset fingerprint.

    Datasets that know their samples (image path, box, file size and modification time; or generator seed and
    index) define ``sample_identities()``; for any other dataset the class name and position are used, which cannot
    tell two datasets of the same class and size apart, so a warning says the cache check is weak.
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

    The DistributedSampler pads the last shard with repeated samples; :func:`gather_features` removes the repeats by
    sample index (and copes with shards that differ in size once undecodable images are skipped).
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
    extractor: ContextFeatureExtractor, loader: DataLoader, device: torch.device, *, progress: bool = True
) -> ContextFeatures:
    """Runs the scene CNN over a loader of samples in the shared batch schema.

    Uses ``batch["context"]`` (the image with the subject filled with zeros, unless the dataset was asked for
    unmasked images), ``batch["index"]`` and, where present, ``target`` and ``scene``. On CUDA it runs in bfloat16
    autocast with channels_last, where convolutions are fastest; features come back as float32.

    Returns:
        The features of the samples this loader yields, on ``device``; empty (0 rows) for an empty shard.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    on_cuda = device.type == "cuda"
    if on_cuda:
        extractor = extractor.to(memory_format=torch.channels_last)
    parts: dict[str, list[torch.Tensor]] = {"features": [], "indices": [], "targets": [], "scenes": []}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("Confounder dictionary: scene features", total=len(loader))
        for batch in loader:
            images = batch["context"].to(device, non_blocking=True)
            if on_cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_cuda):
                parts["features"].append(extractor(images).float())
            parts["indices"].append(batch["index"].to(device).long())
            if "target" in batch:
                parts["targets"].append(batch["target"].to(device))
            if "scene" in batch:
                parts["scenes"].append(batch["scene"].to(device).long())
            bar.advance(task)
    if not parts["features"]:
        return ContextFeatures(
            torch.zeros(0, extractor.num_features, device=device), torch.zeros(0, dtype=torch.long, device=device)
        )
    cat = lambda name: torch.cat(parts[name]) if parts[name] else None  # noqa: E731
    return ContextFeatures(cat("features"), cat("indices"), cat("targets"), cat("scenes"))


def in_index_order(local: ContextFeatures) -> ContextFeatures:
    """The rows sorted by sample index, each sample once (a loader that repeats samples counts them once)."""
    order = torch.argsort(local.indices, stable=True)
    indices = local.indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return local.rows(order[keep])


def own_rows(local: ContextFeatures, world_size: int, rank: int) -> ContextFeatures:
    """This rank's shard without the DistributedSampler's padding repeats.

    With ``shuffle=False`` the sampler gives sample ``i`` to rank ``i % world_size``; the repeats it appends to make
    the shards equal belong to another rank (or repeat one of this rank's), so keeping the rows whose index this rank
    owns leaves every sample on exactly one rank, also when decode-time skips made the shards unequal.
    """
    return in_index_order(local.rows(local.indices % world_size == rank))


def _scene_statistics(assignments: torch.Tensor, scenes: torch.Tensor, num_clusters: int) -> dict[str, float]:
    from torchmetrics.functional.clustering import normalized_mutual_info_score

    with warnings.catch_warnings():  # torch's notice about sparse invariant checks, from inside torchmetrics
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        nmi = float(normalized_mutual_info_score(assignments, scenes))
    # NMI is capped well below 1 when there are more clusters than scenes; purity (the share of samples whose
    # cluster's most common scene is theirs) says directly whether clusters mix scenes.
    joint = torch.zeros(num_clusters, int(scenes.max()) + 1, dtype=torch.long)
    joint.index_put_((assignments, scenes), torch.ones_like(scenes), accumulate=True)
    return {"scene_nmi": nmi, "scene_purity": float(joint.max(dim=1).values.sum() / len(scenes))}


@dataclass
class DictionaryRecipe:
    """How a confounder dictionary is made, keyed and reused.

    Args:
        extractor: timm model name of the scene CNN (the paper: ``resnet152`` on Places365).
        weights: Local weights file for the scene CNN (e.g. ``resnet152_places365.pth.tar``); None = random init.
        source: ``"features"`` (the method) or ``"random"`` (the paper's random-Z ablation; seeded, uniform prior).
        mask_subject: Fill the subject box with zeros (False = the paper's "without masking" ablation).
        seed: k-means (or random dictionary) seed.
        num_iterations: k-means Lloyd iterations.
        pca_dim: Optional PCA size before k-means (the paper mentions PCA without a size).
        batch_size: Extraction batch size; defaults to the datamodule's ``batch_size`` or 64.
        num_workers: Extraction loader workers; defaults to the datamodule's ``num_workers`` or 0.
        cache: A dictionary file: reused when its cache key matches this run, (re)written after a build.
        progress: Show a progress bar while extracting.
    """

    extractor: str = "resnet152"
    weights: str | None = None
    source: Literal["features", "random"] = "features"
    mask_subject: bool = True
    seed: int = 0
    num_iterations: int = 25
    pca_dim: int | None = None
    batch_size: int | None = None
    num_workers: int | None = None
    cache: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.source not in ("features", "random"):
            raise ValueError(f"source must be 'features' or 'random', got {self.source!r}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, got {self.num_iterations}")

    @property
    def cache_path(self) -> Path | None:
        """``cache`` as a path, or None."""
        return Path(self.cache).expanduser() if self.cache else None

    # ------------------------------------------------------------------------------------------------ the key
    def cache_key(self, datamodule: Any, dataset: Dataset, extractor: ContextFeatureExtractor, num_prototypes: int):
        """What a cached dictionary's metadata must say to be reused by this run.

        Covers the scene CNN and its weights' digest, N, masking, seed, source, k-means iterations and PCA size, the
        dictionary transform (``datamodule.dictionary_signature()``: sizes, normalisation, masking fill) and the
        data (:func:`sample_identities`: paths, boxes, and for file-backed data each image's size and modification
        time; an edit that keeps both is invisible, as is a change to annotation columns that are not identities).
        """
        return {
            "extractor": extractor.name,
            "weights_digest": extractor.weights_digest,
            "num_prototypes": num_prototypes,
            "mask_subject": self.mask_subject,
            "seed": self.seed,
            "source": self.source,
            "num_iterations": self.num_iterations,
            "pca_dim": self.pca_dim,
            "transform": transform_signature(datamodule),
            "dataset_fingerprint": dataset_fingerprint(sample_identities(dataset)),
        }

    def load_cache(self, wanted: dict[str, Any]) -> ConfounderDictionary | None:
        """The cached dictionary if ``cache`` exists and its cache key equals ``wanted``; else None (logs why)."""
        path = self.cache_path
        if path is None or not path.exists():
            return None
        if path.is_dir():
            check_cache_path(path)  # raises: a folder
        try:
            cached = ConfounderDictionary.load(path)
        except DictionaryFileError as error:
            raise DictionaryFileError(f"{error} (the `cache` of the dictionary recipe)") from error
        reasons = cached.mismatches(wanted)
        if reasons:
            log.info(
                "Confounder dictionary: cache %s does not match this run, rebuilding: %s", path, "; ".join(reasons)
            )
            return None
        log.info("Confounder dictionary: reusing %s", path)
        return cached

    # ---------------------------------------------------------------------------------------------- the build
    def load_or_build(
        self, collectives: Collectives, datamodule: Any, num_prototypes: int, dim: int
    ) -> ConfounderDictionary:
        """The dictionary for this run: from the cache when it matches, else built; every rank returns the same.

        Every step that can fail on one rank is followed by an agreement on success across ranks, so a failure ends
        every rank at once (:class:`RankFailedError` on the others) instead of leaving them in a collective until
        the process-group timeout.

        Args:
            collectives: The process group (``trainer.strategy``).
            datamodule: The data; must have ``dictionary_dataset(mask_subject=...)``.
            num_prototypes: N of the model.
            dim: d of the model (the scene CNN's feature width).
        """
        if self.source == "random":
            return ConfounderDictionary.random(num_prototypes, dim, seed=self.seed)
        with _agreed(collectives, "preparing the dictionary build"):
            # The contract lives with the datamodules (imported here, not at module level: the data layer sits
            # above this one).
            from ccim_lightning.datamodules.schema import DictionaryDataModule, missing_members

            if not isinstance(datamodule, DictionaryDataModule):
                raise TypeError(
                    f"The confounder dictionary needs a datamodule with dictionary_dataset(mask_subject=...) (the "
                    f"train split with eval transforms) and dictionary_signature(); {type(datamodule).__name__} lacks "
                    f"{missing_members(datamodule, DictionaryDataModule)}. Use a ccim_lightning datamodule or add them "
                    "(ccim_lightning.datamodules.schema.DictionaryDataModule)."
                )
            dataset = datamodule.dictionary_dataset(mask_subject=self.mask_subject)
            device = collectives.root_device
            extractor = ContextFeatureExtractor(self.extractor, self.weights).to(device)
            if extractor.num_features != dim:
                raise ValueError(
                    f"The scene CNN {extractor.name!r} gives {extractor.num_features}-dim features but the model's "
                    f"confounder_dim is {dim}: set model.init_args.confounder_dim: {extractor.num_features} (the "
                    "ccim CLI links it to --dictionary.extractor)."
                )
            wanted = self.cache_key(datamodule, dataset, extractor, num_prototypes)
            cached = None
            if collectives.is_global_zero:
                # Rank 0 decides and tells the others: ranks that judged the cache on their own could disagree
                # (node-local disks, a file being written) and then wait in different collectives forever.
                cached = self.load_cache(wanted)
                if cached is None and self.cache_path is not None:
                    check_cache_path(self.cache_path)  # before hours of extraction, not after
        cached = collectives.broadcast(cached, src=0)
        if cached is not None:
            return cached

        start = time.perf_counter()
        with _agreed(collectives, "extracting scene features"):
            loader = dictionary_loader(
                dataset,
                batch_size=self.batch_size or getattr(datamodule, "batch_size", 64),
                num_workers=self.num_workers if self.num_workers is not None else getattr(datamodule, "num_workers", 0),
                world_size=collectives.world_size,
                rank=collectives.global_rank,
            )
            show = self.progress and collectives.is_global_zero
            local = extract_context_features(extractor, loader, device, progress=show)
        del extractor
        dictionary = self._cluster_shards(local, collectives, num_prototypes, wanted, len(dataset))
        dictionary.extra["build_seconds"] = time.perf_counter() - start
        return dictionary

    def _cluster_shards(
        self, local: ContextFeatures, collectives: Collectives, num_prototypes: int, wanted: dict, size: int
    ) -> ConfounderDictionary:
        """k-means over the ranks' shards, one path at every world size: a rank holds its shard plus O(k·d).

        The draws follow sample indices, so 1, 2 or 4 ranks build the same dictionary. The per-sample clusters,
        targets and scenes (a few numbers per sample) are gathered; rank 0 assembles the dictionary, writes the cache
        and broadcasts it.
        """
        group = ProcessGroup.current(collectives.root_device)
        local = own_rows(local, group.world_size, group.rank)
        if int(group.all_reduce(torch.tensor([len(local.indices)]))[0]) == 0:
            raise ValueError("No training sample could be read for the confounder dictionary: the split is empty.")
        start = time.perf_counter()
        result = kmeans(
            local.features,
            num_prototypes,
            seed=self.seed,
            num_iterations=self.num_iterations,
            pca_dim=self.pca_dim,
            sample_ids=local.indices,
            collectives=group,
        )
        columns = [local.indices, result.assignments.to(local.indices.device)]
        if local.scenes is not None:
            columns.append(local.scenes)
        gathered = group.gather_unequal(torch.stack(columns, dim=1)).cpu()
        targets = None if local.targets is None else group.gather_unequal(local.targets).cpu()
        dictionary = None
        with group.agreed("assembling the dictionary"):
            if group.is_global_zero:
                scenes = gathered[:, 2] if gathered.shape[1] > 2 else None
                rows = ContextFeatures(torch.zeros(len(gathered), 0), gathered[:, 0], targets, scenes)
                extra = {"kmeans_seconds": time.perf_counter() - start, "kmeans_backend": result.backend}
                dictionary = self._assemble(result, rows, gathered[:, 1], wanted, size, extra)
        return group.broadcast(dictionary, src=0)

    def cluster(
        self, gathered: ContextFeatures, num_prototypes: int, wanted: dict[str, Any], num_samples: int | None = None
    ) -> ConfounderDictionary:
        """k-means of gathered features with this recipe's settings; saved to ``cache`` when one is set.

        Args:
            gathered: Every training sample's scene features, once each, in index order.
            num_prototypes: N.
            wanted: The run's cache key (:meth:`cache_key`), recorded in the dictionary.
            num_samples: Size of the split (samples skipped at decode time get cluster -1); default: the rows.
        """
        if gathered.features.shape[0] == 0:
            raise ValueError("No training sample could be read for the confounder dictionary: the split is empty.")
        start = time.perf_counter()
        result = kmeans(
            gathered.features,
            num_prototypes,
            seed=self.seed,
            num_iterations=self.num_iterations,
            pca_dim=self.pca_dim,
            sample_ids=gathered.indices.tolist(),
        )
        size = int(num_samples if num_samples is not None else int(gathered.indices.max()) + 1)
        extra = {"kmeans_seconds": time.perf_counter() - start, "kmeans_backend": result.backend}
        return self._assemble(result, gathered, result.assignments, wanted, size, extra)

    def _assemble(
        self, result: Any, rows: ContextFeatures, assignments: torch.Tensor, wanted: dict, size: int, extra: dict
    ) -> ConfounderDictionary:
        """The dictionary of a clustering, each sample's cluster and target at its index; cached when asked.

        Args:
            result: The clustering (``centroids``, ``counts``, ``inertia``).
            rows: The clustered samples' indices, targets and scenes.
            assignments: Their clusters, row for row.
            wanted: The run's cache key.
            size: Samples in the split; those not clustered (skipped at decode time) get cluster -1.
            extra: Timings and backend, for the logs.
        """
        centroids, counts, indices, targets, scenes = (
            result.centroids,
            result.counts,
            rows.indices,
            rows.targets,
            rows.scenes,
        )
        indices = indices.cpu().long()
        by_index = torch.full((size,), -1, dtype=torch.long)
        by_index[indices] = assignments.cpu().long()
        targets_by_index = None
        if targets is not None:
            targets = targets.cpu()
            targets_by_index = targets.new_zeros((size, *targets.shape[1:]))
            targets_by_index[indices] = targets
        extra = {
            **extra,
            "cluster_sizes": counts.tolist(),
            "feature_dim": int(centroids.shape[1]),
            "skipped_samples": int(size - len(indices)),
        }
        if scenes is not None:
            extra.update(_scene_statistics(assignments.cpu().long(), scenes.cpu().long(), int(centroids.shape[0])))
        dictionary = ConfounderDictionary.from_clustering(
            centroids.cpu(),
            counts.cpu(),
            extractor=wanted["extractor"],
            weights_digest=wanted["weights_digest"],
            mask_subject=self.mask_subject,
            seed=self.seed,
            dataset_fingerprint=wanted["dataset_fingerprint"],
            num_samples=len(indices),
            inertia=float(result.inertia),
            num_iterations=self.num_iterations,
            pca_dim=self.pca_dim,
            transform=wanted["transform"],
            assignments=by_index,
            targets=targets_by_index,
            extra=extra,
        )
        if self.cache_path is not None:
            dictionary.save(self.cache_path)
            log.info("Confounder dictionary: saved to %s", self.cache_path)
        return dictionary


def transform_signature(datamodule: Any) -> str:
    """Canonical text of the datamodule's dictionary transform (``dictionary_signature()``), for the cache key."""
    return json.dumps(datamodule.dictionary_signature(), sort_keys=True, default=str)


def _agreed(collectives: Collectives, step: str) -> AbstractContextManager[None]:
    """All ranks agree a step succeeded before any goes on (:meth:`ProcessGroup.agreed`; :class:`RankFailedError`)."""
    return ProcessGroup.current(collectives.root_device).agreed(step)


def dictionary_summary(dictionary: ConfounderDictionary) -> dict[str, float]:
    """The numbers a person checks after a build: samples, N, d, inertia, time, and scene NMI/purity when known."""
    stats = {
        "num_samples": float(dictionary.num_samples),
        "num_prototypes": float(dictionary.prototypes.shape[0]),
        "feature_dim": float(dictionary.dim),
    }
    if dictionary.inertia is not None:
        stats["inertia"] = dictionary.inertia
    for name in ("build_seconds", "skipped_samples", "scene_nmi", "scene_purity"):
        if name in dictionary.extra:
            stats[name] = float(dictionary.extra[name])
    return stats
