"""``ConfounderDictionaryCallback``: fills the model's confounder dictionary before fitting, on every rank."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ccim_lightning.dictionary.collectives import Collectives
from ccim_lightning.dictionary.recipe import DictionaryRecipe, dictionary_summary
from ccim_lightning.dictionary.store import ConfounderDictionary
from ccim_lightning.types import DictionaryModel, missing_members

log = logging.getLogger(__name__)


class ConfounderDictionaryCallback(Callback):
    """Builds (or loads from its cache) the confounder dictionary in ``on_fit_start`` and hands it to the model.

    ``on_fit_start`` runs after a resumed checkpoint has been restored and before the sanity-check validation, so a
    restored dictionary is kept (and the log says so) and validation never sees an empty one. The work is done by
    :class:`~ccim_lightning.dictionary.recipe.DictionaryRecipe` (the same object ``ccim build-dictionary`` and
    ``ccim bias-report`` use); the model receives it through ``set_dictionary`` (the head's prototypes and prior,
    each training sample's cluster for the debiasing methods). The scene CNN is not part of the LightningModule
    (not in checkpoints, not touched by SyncBatchNorm). In the ``ccim`` CLI its options are ``--dictionary.*``.

    Args:
        recipe: The dictionary's settings (scene CNN, weights, source, masking, seed, k-means, cache, ...); the
            defaults of :class:`~ccim_lightning.dictionary.recipe.DictionaryRecipe` when None.
    """

    def __init__(self, recipe: DictionaryRecipe | None = None) -> None:
        if recipe is not None and not isinstance(recipe, DictionaryRecipe):
            raise TypeError(
                f"ConfounderDictionaryCallback takes a DictionaryRecipe, got {type(recipe).__name__}: build one with "
                "DictionaryRecipe(extractor=..., cache=...)."
            )
        self.recipe = recipe if recipe is not None else DictionaryRecipe()
        self.last_dictionary: ConfounderDictionary | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, DictionaryModel):
            raise TypeError(
                f"ConfounderDictionaryCallback fills a CCIMLightningModule's dictionary; {type(pl_module).__name__} "
                f"lacks {missing_members(pl_module, DictionaryModel)} (the DictionaryModel protocol). Subclass "
                "CCIMLightningModule or drop the callback."
            )
        if not pl_module.needs_dictionary:
            log.info("Confounder dictionary: not needed (attention='none' and no debiasing method reads clusters).")
            return
        if pl_module.has_dictionary:
            log.info("Confounder dictionary: already filled (restored from a checkpoint or set by hand); not rebuilt.")
            return
        num_prototypes, dim = pl_module.dictionary_shape
        start = time.perf_counter()
        collectives = Collectives.current(trainer.strategy.root_device)
        dictionary = self.recipe.load_or_build(trainer.datamodule, num_prototypes, dim, collectives)
        pl_module.set_dictionary(dictionary)
        self.last_dictionary = dictionary
        self._report(trainer, dictionary, time.perf_counter() - start)

    def _report(self, trainer: L.Trainer, dictionary: ConfounderDictionary, seconds: float) -> None:
        stats = {f"dictionary/{k}": v for k, v in dictionary_summary(dictionary).items()}
        stats["dictionary/seconds"] = seconds
        log.info("Confounder dictionary: %s", ", ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in stats.items()))
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every rank must ask for it.
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=0)
        sizes = dictionary.extra.get("cluster_sizes")
        if sizes:
            path = plot_cluster_sizes(folder, torch.tensor(sizes))
            log.info("Confounder dictionary: cluster-size histogram in %s", path)


def plot_cluster_sizes(folder: Path, sizes: torch.Tensor) -> Path:
    """Saves a histogram of the clusters' sizes (a few huge clusters or many near-empty ones show at a glance)."""
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
