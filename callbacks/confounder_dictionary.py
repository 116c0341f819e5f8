"""``ConfounderDictionaryCallback``: fills the CCIM head's dictionary before fitting, on every rank."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ccim_lightning.dictionary.features import ContextFeatureExtractor
from ccim_lightning.dictionary.recipe import (
    ContextFeatures,
    cluster_dictionary,
    dictionary_loader,
    expected_cache_key,
    extract_context_features,
    fingerprint_of,
    gather_features,
)
from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryFileError

log = logging.getLogger(__name__)


class ConfounderDictionaryCallback(Callback):
    """Builds the confounder dictionary Z and its prior P(z) in ``on_fit_start`` and puts them into the head.

    ``on_fit_start`` runs after a resumed checkpoint has been restored and before the sanity-check validation, so a
    restored dictionary is kept (and the log says so) and validation never sees an empty one. The build: the
    datamodule's ``dictionary_dataset(mask_subject=...)`` (train split, eval transforms, subject filled with zeros)
    -> the scene CNN on this rank's device, each rank over its own shard -> features gathered from all ranks, the
    sampler's padding repeats removed -> k-means once on rank 0 -> broadcast -> ``head.set_dictionary`` in place on
    every rank. The scene CNN is not part of the LightningModule (not in checkpoints, not touched by SyncBatchNorm).

    Args:
        extractor: timm model name of the scene CNN (the paper: ``resnet152`` on Places365).
        weights: Local weights file for the scene CNN (e.g. ``resnet152_places365.pth.tar``); None = random init.
        source: ``"features"`` (the method) or ``"random"`` (the paper's random-Z ablation; seeded, uniform prior).
        mask_subject: Fill the subject box with zeros (False = the paper's "without masking" ablation).
        seed: k-means (or random dictionary) seed.
        batch_size: Extraction batch size; defaults to the datamodule's ``batch_size`` or 64.
        num_workers: Extraction loader workers; defaults to the datamodule's ``num_workers`` or 0.
        num_iterations: k-means Lloyd iterations.
        pca_dim: Optional PCA size before k-means.
        cache: A dictionary file: reused when its metadata matches this run, (re)written after a build.
        progress: Show a progress bar while extracting.
    """

    def __init__(
        self,
        extractor: str = "resnet152",
        weights: str | None = None,
        source: Literal["features", "random"] = "features",
        mask_subject: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        num_workers: int | None = None,
        num_iterations: int = 25,
        pca_dim: int | None = None,
        cache: str | None = None,
        progress: bool = True,
    ) -> None:
        if source not in ("features", "random"):
            raise ValueError(f"source must be 'features' or 'random', got {source!r}")
        self.extractor_name = extractor
        self.weights = weights
        self.source = source
        self.mask_subject = mask_subject
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_iterations = num_iterations
        self.pca_dim = pca_dim
        self.cache = Path(cache) if cache else None
        self.progress = progress
        self.last_dictionary: ConfounderDictionary | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        head = pl_module.head
        if not head.uses_dictionary:
            log.info("Confounder dictionary: not needed (attention='none', the baseline head).")
            return
        if bool(head.dictionary_filled):
            log.info("Confounder dictionary: already filled (restored from a checkpoint or set by hand); not rebuilt.")
            return
        num_prototypes, dim = head.dictionary.shape
        start = time.perf_counter()
        dictionary = self.build(trainer, num_prototypes, dim)
        head.set_dictionary(dictionary.prototypes, dictionary.prior)
        self.last_dictionary = dictionary
        self._report(trainer, dictionary, time.perf_counter() - start)

    def build(
        self, trainer: L.Trainer, num_prototypes: int, dim: int, datamodule: L.LightningDataModule | None = None
    ) -> ConfounderDictionary:
        """Builds (or loads from the cache) the dictionary; every rank returns the same one.

        Args:
            trainer: The trainer (for its strategy: device, rank, collectives).
            num_prototypes: N of the head.
            dim: d of the head.
            datamodule: The data; defaults to the trainer's (``ccim build-dictionary`` passes it, outside a fit).
        """
        if self.source == "random":
            return ConfounderDictionary.random(num_prototypes, dim, seed=self.seed)
        datamodule = datamodule if datamodule is not None else trainer.datamodule
        make_dataset = getattr(datamodule, "dictionary_dataset", None)
        if not callable(make_dataset):
            raise TypeError(
                f"ConfounderDictionaryCallback needs a datamodule with dictionary_dataset(mask_subject=...) (the train "
                f"split with eval transforms); got {type(datamodule).__name__}. Use a ccim_lightning datamodule or add "
                "that method to yours."
            )
        dataset = make_dataset(mask_subject=self.mask_subject)
        device = trainer.strategy.root_device
        extractor = ContextFeatureExtractor(self.extractor_name, self.weights).to(device)
        if extractor.num_features != dim:
            raise ValueError(
                f"The scene CNN {extractor.name!r} gives {extractor.num_features}-dim features but the model's "
                f"confounder_dim is {dim}: set model.init_args.confounder_dim: {extractor.num_features}."
            )
        fingerprint = fingerprint_of(dataset)
        wanted = expected_cache_key(
            extractor=extractor,
            num_prototypes=num_prototypes,
            mask_subject=self.mask_subject,
            seed=self.seed,
            source=self.source,
            fingerprint=fingerprint,
        )
        # Rank 0 decides and tells the others: ranks that judged the cache on their own could disagree (node-local
        # disks, a file being written) and then wait in different collectives forever.
        cached = trainer.strategy.broadcast(self.load_cache(wanted) if trainer.is_global_zero else None, src=0)
        if cached is not None:
            return cached

        loader = dictionary_loader(
            dataset,
            batch_size=self.batch_size or getattr(datamodule, "batch_size", 64),
            num_workers=self.num_workers if self.num_workers is not None else getattr(datamodule, "num_workers", 0),
            world_size=trainer.world_size,
            rank=trainer.global_rank,
        )
        local = extract_context_features(extractor, loader, device, progress=self.progress and trainer.is_global_zero)
        gathered = gather_features(local, trainer.strategy.all_gather, trainer.world_size)
        del extractor
        dictionary = self.cluster(gathered, num_prototypes, wanted) if trainer.is_global_zero else None
        # Every rank takes part in the broadcast; only rank 0 has something to send.
        return trainer.strategy.broadcast(dictionary, src=0)

    def cluster(self, gathered: ContextFeatures, num_prototypes: int, wanted: dict) -> ConfounderDictionary:
        """k-means of gathered features with this callback's settings; saved to ``cache`` when one is set.

        Args:
            gathered: Every training sample's scene features, once each.
            num_prototypes: N.
            wanted: The run's cache key (:func:`~ccim_lightning.dictionary.recipe.expected_cache_key`).
        """
        dictionary = cluster_dictionary(
            gathered,
            num_prototypes,
            extractor_name=wanted["extractor"],
            weights_digest=wanted["weights_digest"],
            mask_subject=self.mask_subject,
            seed=self.seed,
            fingerprint=wanted["dataset_fingerprint"],
            num_iterations=self.num_iterations,
            pca_dim=self.pca_dim,
        )
        if self.cache is not None:
            dictionary.save(self.cache)
            log.info("Confounder dictionary: saved to %s", self.cache)
        return dictionary

    def load_cache(self, wanted: dict) -> ConfounderDictionary | None:
        """The cached dictionary if ``cache`` exists and its metadata matches ``wanted``; else None (says why)."""
        if self.cache is None or not self.cache.exists():
            return None
        try:
            cached = ConfounderDictionary.load(self.cache)
        except DictionaryFileError as error:
            raise DictionaryFileError(f"{error} (the `cache` of ConfounderDictionaryCallback)") from error
        reasons = cached.mismatches(wanted)
        if reasons:
            log.info(
                "Confounder dictionary: cache %s does not match this run, rebuilding: %s",
                self.cache,
                "; ".join(reasons),
            )
            return None
        log.info("Confounder dictionary: reusing %s", self.cache)
        return cached

    def _report(self, trainer: L.Trainer, dictionary: ConfounderDictionary, seconds: float) -> None:
        stats = {
            "dictionary/num_samples": float(dictionary.num_samples),
            "dictionary/num_prototypes": float(dictionary.prototypes.shape[0]),
            "dictionary/feature_dim": float(dictionary.prototypes.shape[1]),
            "dictionary/seconds": seconds,
        }
        if dictionary.inertia is not None:
            stats["dictionary/inertia"] = dictionary.inertia
        for name in ("scene_nmi", "scene_purity"):
            if name in dictionary.extra:
                stats[f"dictionary/{name}"] = dictionary.extra[name]
        log.info("Confounder dictionary: %s", ", ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in stats.items()))
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every rank must ask for it.
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=0)
        sizes = dictionary.extra.get("cluster_sizes")
        if sizes:
            path = self._plot_cluster_sizes(folder, torch.tensor(sizes))
            log.info("Confounder dictionary: cluster-size histogram in %s", path)

    def _plot_cluster_sizes(self, folder: Path, sizes: torch.Tensor) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder.mkdir(parents=True, exist_ok=True)
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.hist(sizes.numpy(), bins=min(50, max(10, len(sizes) // 4)), color="#4c72b0")
        axis.set_xlabel("samples in cluster")
        axis.set_ylabel("clusters")
        axis.set_title(f"Confounder dictionary: {len(sizes)} clusters, {int(sizes.sum())} samples")
        figure.tight_layout()
        path = folder / "confounder_dictionary_cluster_sizes.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path
