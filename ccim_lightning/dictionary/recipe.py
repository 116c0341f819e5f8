"""The confounder dictionary's settings (:class:`DictionaryRecipe`) and its one entry point, ``load_or_build``.

``ConfounderDictionaryCallback`` (before fitting), ``ccim build-dictionary``, ``ccim bias-report`` (cluster mode) and
``benchmarks/debias.py`` all call ``recipe.load_or_build(...)``, so all of them build, key and reuse a dictionary the
same way. The steps, one small function each: the run's :class:`~ccim_lightning.dictionary.store.DictionaryKey`
(:func:`dictionary_key`) -> the cache, decided on rank 0 (:func:`load_cached`) -> the scene CNN over this rank's
shard of ``datamodule.dictionary_dataset(mask_subject=...)`` (train split, eval transforms, subject filled with
zeros) -> one k-means over all ranks' rows (:func:`cluster`) -> rank 0 assembles the dictionary, each training
sample's cluster in sample-index order (:func:`assemble`), saves the cache and broadcasts it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
from ccim_lightning.dictionary.kmeans import kmeans
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
        self, datamodule: Any, num_prototypes: int, dim: int, collectives: Collectives | None = None
    ) -> ConfounderDictionary:
        """The dictionary for this run: from the cache when its key matches, else built; every rank returns the same.

        Every step that can fail on one rank is agreed on across ranks (:meth:`Collectives.agreed`), so a failure
        ends every rank at once instead of leaving them in a collective until the process-group timeout.

        Args:
            datamodule: The data; a :class:`~ccim_lightning.types.DictionaryDataModule`.
            num_prototypes: N of the model.
            dim: d of the model (the scene CNN's feature width).
            collectives: The process group; default: ``Collectives.current()`` (one process without one).
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
            cached = None
            if collectives.is_global_zero:
                # Rank 0 decides and tells the others: ranks that judged the cache on their own could disagree
                # (node-local disks, a file being written) and then wait in different collectives forever.
                cached = load_cached(self.cache_path, key)
                if cached is None and self.cache_path is not None:
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


def check_cluster_count(num_prototypes: int, num_samples: int) -> None:
    """Refuses a dictionary size k-means cannot give: more clusters than training samples (or none at all).

    Raises:
        ValueError: Naming both numbers and the option to change (``--model.init_args.num_prototypes``).
    """
    if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, int) or num_prototypes < 1:
        raise ValueError(
            f"The confounder dictionary needs a positive number of clusters, got num_prototypes={num_prototypes!r}: "
            "set --model.init_args.num_prototypes (the paper uses 128 to 256)."
        )
    if num_samples < num_prototypes:
        raise ValueError(
            f"The confounder dictionary asks for {num_prototypes} clusters but the training split has only "
            f"{num_samples} samples, and k-means cannot make more clusters than points: set "
            f"--model.init_args.num_prototypes to {num_samples} or fewer (the paper uses 128 to 256 on thousands of "
            "images), or train on more data."
        )


def training_samples(datamodule: Any, mask_subject: bool) -> Dataset:
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
    recipe: DictionaryRecipe, datamodule: Any, dataset: Dataset, extractor: ContextFeatureExtractor, num_prototypes: int
) -> DictionaryKey:
    """The key of the dictionary this run would build, which a cached file must equal to be reused.

    Covers the scene CNN and its weights' digest, N, masking, seed, source, k-means iterations and PCA size, the
    dictionary transform (:func:`transform_signature`) and the data (:func:`sample_identities`: paths, boxes, and for
    file-backed data each image's size and modification time; an edit that keeps both is invisible, as is a change
    to annotation columns that are not identities).
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
        transform=transform_signature(datamodule),
        dataset_fingerprint=dataset_fingerprint(sample_identities(dataset)),
    )


def sample_identities(dataset: Dataset) -> list[str]:
    """Stable names of a dataset's samples, for the dictionary's dataset fingerprint.

    Datasets that know their samples (image path, box, file size and modification time; or generator seed and
    index) are :class:`~ccim_lightning.types.IdentifiedDataset`; for any other dataset the class name and position
    are used, which cannot tell two datasets of the same class and size apart, so a warning says the check is weak.
    """
    if isinstance(dataset, IdentifiedDataset):
        return [str(identity) for identity in dataset.sample_identities()]
    log.warning(
        "%s lacks %s (IdentifiedDataset); the dictionary cache can only check its class and size.",
        type(dataset).__name__,
        missing_members(dataset, IdentifiedDataset),
    )
    return [f"{type(dataset).__name__}:{i}" for i in range(len(dataset))]


def transform_signature(datamodule: Any) -> str:
    """Canonical text of the datamodule's dictionary transform (``dictionary_signature()``), for the key."""
    return json.dumps(datamodule.dictionary_signature(), sort_keys=True, default=str)


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
    """The dictionary of this rank's feature rows clustered with all ranks' rows; saved to the cache on rank 0.

    Args:
        recipe: The settings (seed, iterations, PCA, cache).
        rows: This rank's samples, each once (:func:`~ccim_lightning.dictionary.features.own_rows`).
        key: The run's key, recorded in the dictionary.
        num_samples: Size of the split (samples skipped at decode time get cluster -1); default: the largest index
            plus one.
        collectives: The process group; default: one process.

    Returns:
        The same dictionary on every rank.
    """
    collectives = collectives if collectives is not None else Collectives.current()
    start = time.perf_counter()
    with collectives.agreed("clustering the scene features"):
        if int(collectives.all_reduce(torch.tensor([len(rows.indices)], device=collectives.device))[0]) == 0:
            raise ValueError("No training sample could be read for the confounder dictionary: the split is empty.")
        result, backend = cluster(rows, key.num_prototypes, recipe, collectives)
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
            scenes = gathered[:, 2] if gathered.shape[1] > 2 else None
            everyone = ContextFeatures(torch.zeros(len(gathered), 0), gathered[:, 0], targets, scenes)
            extra = {"kmeans_seconds": time.perf_counter() - start, "kmeans_backend": backend}
            dictionary = assemble(result, everyone, gathered[:, 1], key, size, extra)
            if recipe.cache_path is not None:
                dictionary.save(recipe.cache_path)
                log.info("Confounder dictionary: saved to %s", recipe.cache_path)
    return collectives.broadcast(dictionary, src=0)


def cluster(
    rows: ContextFeatures, num_prototypes: int, recipe: DictionaryRecipe, collectives: Collectives
) -> tuple[Any, str]:
    """k-means of all ranks' rows: the global centroids, counts and inertia, and this rank's rows' clusters.

    One call at every world size; the draws follow the sample indices, so any split of the rows over ranks gives
    the same clusters.

    Returns:
        The clustering (``centroids``, ``counts``, ``inertia``, ``assignments`` of ``rows``) and its backend's name.
    """
    result = kmeans(
        rows.features,
        num_prototypes,
        seed=recipe.seed,
        num_iterations=recipe.num_iterations,
        pca_dim=recipe.pca_dim,
        sample_ids=rows.indices,
        collectives=collectives,
    )
    return result, result.backend


def assemble(
    result: Any, rows: ContextFeatures, assignments: torch.Tensor, key: DictionaryKey, size: int, extra: dict
) -> ConfounderDictionary:
    """The dictionary of a clustering, with each sample's cluster and target at its index.

    Args:
        result: The clustering (``centroids``, ``counts``, ``inertia``).
        rows: The clustered samples' indices, targets and scenes (features unused).
        assignments: Their clusters, row for row.
        key: The run's key.
        size: Samples in the split; those not clustered (skipped at decode time) get cluster -1.
        extra: Timings and backend, for the logs.
    """
    indices, assignments = rows.indices.cpu().long(), assignments.cpu().long()
    by_index = torch.full((size,), -1, dtype=torch.long)
    by_index[indices] = assignments
    targets_by_index = None
    if rows.targets is not None:
        targets = rows.targets.cpu()
        targets_by_index = targets.new_zeros((size, *targets.shape[1:]))
        targets_by_index[indices] = targets
    centroids, counts = result.centroids.cpu(), result.counts.cpu()
    extra = {
        **extra,
        "cluster_sizes": counts.tolist(),
        "feature_dim": int(centroids.shape[1]),
        "skipped_samples": int(size - len(indices)),
    }
    if rows.scenes is not None:
        extra.update(_scene_statistics(assignments, rows.scenes.cpu().long(), int(centroids.shape[0])))
    return ConfounderDictionary.from_clustering(
        centroids,
        counts,
        key,
        num_samples=len(indices),
        inertia=float(result.inertia),
        assignments=by_index,
        targets=targets_by_index,
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
    stats = {
        "num_samples": float(dictionary.num_samples),
        "num_prototypes": float(dictionary.num_prototypes),
        "feature_dim": float(dictionary.dim),
    }
    if dictionary.inertia is not None:
        stats["inertia"] = dictionary.inertia
    for name in ("build_seconds", "skipped_samples", "scene_nmi", "scene_purity"):
        if name in dictionary.extra:
            stats[name] = float(dictionary.extra[name])
    return stats
