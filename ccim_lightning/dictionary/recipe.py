"""The confounder dictionary's settings (:class:`DictionaryRecipe`) and its one entry point, ``load_or_build``.

Every user builds, keys and reuses a dictionary through it: the key (:func:`dictionary_key`) -> the cache, decided
on rank 0 (:func:`load_cached`) -> the scene CNN over this rank's shard -> one k-means over all ranks' rows -> rank 0
assembles the dictionary (:func:`assemble`), saves the cache and broadcasts it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from ccim_lightning.arguments import check_int, check_optional_int
from ccim_lightning.dictionary.collectives import Collectives
from ccim_lightning.dictionary.features import (
    ContextFeatureExtractor,
    ContextFeatures,
    dictionary_loader,
    extract_context_features,
    own_rows,
)
from ccim_lightning.dictionary.kmeans import KMeansResult, kmeans
from ccim_lightning.dictionary.store import (
    ConfounderDictionary,
    DictionaryFileError,
    DictionaryKey,
    check_cache_path,
    dataset_fingerprint,
)
from ccim_lightning.types import DictionaryDataModule, IdentifiedDataset, missing_members

log = logging.getLogger(__name__)


@dataclass
class DictionaryRecipe:
    """How a confounder dictionary is made, keyed and reused: settings only, checked on construction.

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
        cache: A dictionary file: reused when its key matches this run, (re)written after a build.
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
            raise ValueError(f"DictionaryRecipe.source must be 'features' or 'random', got {self.source!r}")
        check_int("DictionaryRecipe", "seed", self.seed, 0)
        check_int("DictionaryRecipe", "num_iterations", self.num_iterations, 1)
        for name in ("pca_dim", "batch_size"):
            check_optional_int("DictionaryRecipe", name, getattr(self, name), 1)
        check_optional_int("DictionaryRecipe", "num_workers", self.num_workers, 0)

    @property
    def cache_path(self) -> Path | None:
        """``cache`` as a path, or None."""
        return Path(self.cache).expanduser() if self.cache else None

    def load_or_build(
        self, datamodule: object, num_prototypes: int, dim: int, collectives: Collectives | None = None
    ) -> ConfounderDictionary:
        """The dictionary for this run: from the cache when its key matches, else built; every rank returns the same.

        A step that fails on one rank ends every rank at once (:meth:`Collectives.agreed`).

        Args:
            datamodule: A :class:`~ccim_lightning.types.DictionaryDataModule`.
            num_prototypes: N of the model.
            dim: d of the model (the scene CNN's feature width).
            collectives: The process group; default: ``Collectives.current()``.
        """
        collectives = collectives if collectives is not None else Collectives.current()
        if self.source == "random":
            return ConfounderDictionary.random(num_prototypes, dim, seed=self.seed)
        with collectives.agreed("preparing the dictionary build"):
            dataset = training_samples(datamodule, self.mask_subject)
            check_cluster_count(num_prototypes, len(dataset))  # before minutes to hours of extraction
            extractor = ContextFeatureExtractor(self.extractor, self.weights).to(collectives.device)
            if extractor.num_features != dim:
                raise ValueError(
                    f"The scene CNN {extractor.name!r} gives {extractor.num_features}-dim features but the model's "
                    f"confounder_dim is {dim}: set model.init_args.confounder_dim: {extractor.num_features} (the "
                    "ccim CLI links it to --dictionary.extractor)."
                )
            key = dictionary_key(self, datamodule, dataset, extractor, num_prototypes)
            # Rank 0 decides and tells the others: ranks that judged the cache on their own could disagree
            # (node-local disks, a file being written) and then wait in different collectives forever.
            cached = load_cached(self.cache_path, key) if collectives.is_global_zero else None
            if cached is None and self.cache_path is not None and collectives.is_global_zero:
                check_cache_path(self.cache_path)  # before hours of extraction, not after
        cached = collectives.broadcast(cached, src=0)
        if cached is not None:
            return cached

        start = time.perf_counter()
        with collectives.agreed("extracting scene features"):
            loader = dictionary_loader(
                dataset,
                batch_size=self.batch_size or getattr(datamodule, "batch_size", 64),
                num_workers=self.num_workers if self.num_workers is not None else getattr(datamodule, "num_workers", 0),
                world_size=collectives.world_size,
                rank=collectives.rank,
            )
            show = self.progress and collectives.is_global_zero
            local = extract_context_features(extractor, loader, collectives.device, progress=show)
        del extractor
        rows = own_rows(local, collectives.world_size, collectives.rank)
        dictionary = build_from_features(self, rows, key, len(dataset), collectives)
        dictionary.extra["build_seconds"] = time.perf_counter() - start
        return dictionary


class DictionarySizeError(ValueError):
    """A dictionary size k-means cannot give; the message names the numbers and the option to change."""


def check_cluster_count(num_prototypes: int, num_samples: int) -> None:
    """Raises :class:`DictionarySizeError` for more clusters than training samples (or none at all)."""
    if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, int) or num_prototypes < 1:
        raise DictionarySizeError(
            f"The confounder dictionary needs a positive number of clusters, got num_prototypes={num_prototypes!r}: "
            "set --model.init_args.num_prototypes (the paper uses 128 to 256)."
        )
    if num_samples < num_prototypes:
        raise DictionarySizeError(
            f"The confounder dictionary asks for {num_prototypes} clusters but the training split has only "
            f"{num_samples} samples, and k-means cannot make more clusters than points: set "
            f"--model.init_args.num_prototypes to {num_samples} or fewer (the paper uses 128 to 256 on thousands of "
            "images), or train on more data."
        )


def training_samples(datamodule: object, mask_subject: bool) -> Dataset:
    """The datamodule's dictionary dataset (train split, eval transforms), or a clear error naming what it lacks."""
    if not isinstance(datamodule, DictionaryDataModule):
        raise TypeError(
            f"The confounder dictionary needs a datamodule with dictionary_dataset(mask_subject=...) (the train split "
            f"with eval transforms) and dictionary_signature(); {type(datamodule).__name__} lacks "
            f"{missing_members(datamodule, DictionaryDataModule)}. Use a ccim_lightning datamodule or add them "
            "(ccim_lightning.types.DictionaryDataModule)."
        )
    return datamodule.dictionary_dataset(mask_subject=mask_subject)


def dictionary_key(
    recipe: DictionaryRecipe,
    datamodule: object,
    dataset: Dataset,
    extractor: ContextFeatureExtractor,
    num_prototypes: int,
) -> DictionaryKey:
    """The key of the dictionary this run would build, which a cached file must equal to be reused.

    The data enter through :func:`sample_identities` (paths, boxes, and for files their size and modification time:
    an edit that keeps both is invisible, as is a change to annotation columns that are not identities).
    """
    return DictionaryKey(
        extractor=extractor.name,
        weights_digest=extractor.weights_digest,
        num_prototypes=int(num_prototypes),
        mask_subject=recipe.mask_subject,
        seed=recipe.seed,
        source=recipe.source,
        num_iterations=recipe.num_iterations,
        pca_dim=recipe.pca_dim,
        transform=json.dumps(datamodule.dictionary_signature(), sort_keys=True, default=str),
        dataset_fingerprint=dataset_fingerprint(sample_identities(dataset)),
    )


def sample_identities(dataset: Dataset) -> list[str]:
    """Stable names of a dataset's samples (:class:`~ccim_lightning.types.IdentifiedDataset`) for the fingerprint.

    Other datasets are named by class and position, which cannot tell two of the same class and size apart (warned).
    """
    if isinstance(dataset, IdentifiedDataset):
        return [str(identity) for identity in dataset.sample_identities()]
    lacks = missing_members(dataset, IdentifiedDataset)
    log.warning(f"{type(dataset).__name__} lacks {lacks} (IdentifiedDataset); the cache checks only class and size.")
    return [f"{type(dataset).__name__}:{i}" for i in range(len(dataset))]


def load_cached(path: Path | None, key: DictionaryKey) -> ConfounderDictionary | None:
    """The dictionary at ``path`` if it exists and its key equals ``key``; else None, logging each differing field."""
    if path is None or not path.exists():
        return None
    if path.is_dir():
        check_cache_path(path)  # raises: a folder
    try:
        cached = ConfounderDictionary.load(path)
    except DictionaryFileError as error:
        raise type(error)(f"{error} (the `cache` of the dictionary recipe)") from error  # unsafe stays unsafe
    reasons = cached.mismatches(key)
    if reasons:
        log.info("Confounder dictionary: cache %s does not match this run, rebuilding: %s", path, "; ".join(reasons))
        return None
    log.info("Confounder dictionary: reusing %s", path)
    return cached


def build_from_features(
    recipe: DictionaryRecipe,
    rows: ContextFeatures,
    key: DictionaryKey,
    num_samples: int | None = None,
    collectives: Collectives | None = None,
) -> ConfounderDictionary:
    """The dictionary of this rank's rows clustered with all ranks' rows, the same on every rank; cached on rank 0.

    Args:
        recipe: The settings (seed, iterations, PCA, cache).
        rows: This rank's samples, each once (:func:`~ccim_lightning.dictionary.features.own_rows`).
        key: The run's key, recorded in the dictionary.
        num_samples: Size of the split (unclustered samples get cluster -1); default: the largest index plus one.
        collectives: The process group; default: one process.
    """
    collectives = collectives if collectives is not None else Collectives.current()
    start = time.perf_counter()
    with collectives.agreed("clustering the scene features"):
        if int(collectives.all_reduce(torch.tensor([len(rows.indices)], device=collectives.device))[0]) == 0:
            raise ValueError("No training sample could be read for the confounder dictionary: the split is empty.")
        # the draws follow the sample indices: any split of the rows over ranks gives the same clusters
        settings = {"seed": recipe.seed, "num_iterations": recipe.num_iterations, "pca_dim": recipe.pca_dim}
        result = kmeans(rows.features, key.num_prototypes, sample_ids=rows.indices, collectives=collectives, **settings)
    # The per-sample columns (a few numbers per sample) go to rank 0, which assembles the dictionary.
    columns = [rows.indices, result.assignments.to(rows.indices.device).long()]
    if rows.scenes is not None:
        columns.append(rows.scenes.long())
    gathered = collectives.gather_unequal(torch.stack(columns, dim=1)).cpu()
    targets = None if rows.targets is None else collectives.gather_unequal(rows.targets).cpu()
    dictionary = None
    with collectives.agreed("assembling the dictionary"):
        if collectives.is_global_zero:
            size = int(num_samples if num_samples is not None else int(gathered[:, 0].max()) + 1)
            extra = {"kmeans_seconds": time.perf_counter() - start, "kmeans_backend": result.backend}
            dictionary = assemble(result, gathered, targets, key, size, extra)
            if recipe.cache_path is not None:
                dictionary.save(recipe.cache_path)
                log.info("Confounder dictionary: saved to %s", recipe.cache_path)
    return collectives.broadcast(dictionary, src=0)


def assemble(
    result: KMeansResult, rows: torch.Tensor, targets: torch.Tensor | None, key: DictionaryKey, size: int, extra: dict
) -> ConfounderDictionary:
    """The dictionary of a clustering, each sample's cluster and target at its index (cluster -1: not clustered).

    ``rows`` holds a (sample index, cluster[, true scene]) row per clustered sample and ``targets`` their targets;
    ``size`` is the split's size and ``extra`` the timings and backend for the logs.
    """
    indices, assignments = rows[:, 0], rows[:, 1]
    extra = extra | {"cluster_sizes": result.counts.tolist(), "feature_dim": int(result.centroids.shape[1])}
    extra["skipped_samples"] = size - len(indices)
    if rows.shape[1] > 2:
        extra |= _scene_statistics(assignments, rows[:, 2], key.num_prototypes)

    def by_index(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = values.new_full((size, *values.shape[1:]), fill)
        out[indices] = values
        return out

    targets = None if targets is None else by_index(targets, 0)
    return ConfounderDictionary.from_clustering(
        result.centroids,
        result.counts,
        key,
        num_samples=len(indices),
        inertia=result.inertia,
        assignments=by_index(assignments, -1),
        targets=targets,
        extra=extra,
    )


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


def dictionary_summary(dictionary: ConfounderDictionary) -> dict[str, float]:
    """The numbers a person checks after a build: samples, N, d, inertia, time, and scene NMI/purity when known."""
    stats = {"num_samples": dictionary.num_samples, "num_prototypes": dictionary.num_prototypes}
    stats |= {"feature_dim": dictionary.dim, "inertia": dictionary.inertia}
    stats |= {name: dictionary.extra.get(name) for name in ("build_seconds", "skipped_samples")}
    stats |= {name: dictionary.extra.get(name) for name in ("scene_nmi", "scene_purity")}
    return {name: float(value) for name, value in stats.items() if value is not None}
