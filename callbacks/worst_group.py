"""``WorstGroupValidation``: logs ``val/worst_group_acc`` over pseudo-groups, for model selection."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset
from typing_extensions import override

from ccim_lightning.arguments import check_int
from ccim_lightning.callbacks.confounder_dictionary import ConfounderDictionaryCallback
from ccim_lightning.callbacks.last_layer import run_dictionary
from ccim_lightning.debias.groups import GroupMode, PseudoGroups
from ccim_lightning.dictionary.features import ContextFeatureExtractor, dictionary_loader, extract_context_features
from ccim_lightning.dictionary.store import ConfounderDictionary
from ccim_lightning.module import CCIMLightningModule
from ccim_lightning.types import INDEX, TARGET

log = logging.getLogger(__name__)

#: The logged metric, for ``ModelCheckpoint(monitor=WORST_GROUP_METRIC, mode="max")``.
WORST_GROUP_METRIC = "val/worst_group_acc"


class WorstGroupValidation(Callback):
    """Logs the validation accuracy of the worst pseudo-group, so that checkpoints can be selected by it.

    Selecting by worst-group validation accuracy beats selecting by average accuracy when the test distribution
    differs from training, and inferred groups select nearly as well as true ones (SubpopBench, Yang et al. 2023).
    The groups here are inferred, never true scene ids: each validation sample's scene CNN feature (the
    dictionary's recipe: same extractor, weights and masking) goes to its nearest dictionary prototype ``z``, and
    ``(z, y)`` to its :class:`~ccim_lightning.debias.groups.PseudoGroups` group (coarse by default), fitted on the
    training split's clusters exactly as the debiasing methods fit theirs.

    At every validation epoch end it logs ``val/worst_group_acc`` (the smallest accuracy over groups with at least
    ``min_group_size`` validation samples) and ``val/groups``; use ``ModelCheckpoint(monitor="val/worst_group_acc",
    mode="max")`` (``--trainer.callbacks+=ModelCheckpoint`` in the CLI) to select by it.

    DDP: every rank computes the clusters of the whole validation split (rank 0's are broadcast) and records each
    sample's correctness by its ``index``; the records are max-reduced over ranks at epoch end, so the samples that
    the distributed sampler repeats to pad its shards count once.

    Args:
        groups: ``"coarse"``, ``"aligned"`` or ``"prototypes"``
            (see :class:`~ccim_lightning.debias.groups.PseudoGroups`).
        min_group_size: Groups with fewer validation samples are left out of the minimum (their accuracy is noise).
        seed: Seed of the coarse groups' k-means.
    """

    def __init__(self, groups: GroupMode = "coarse", min_group_size: int = 10, seed: int = 0) -> None:
        self.min_group_size = check_int(type(self).__name__, "min_group_size", min_group_size, 1)
        self.seed = check_int(type(self).__name__, "seed", seed, 0)
        PseudoGroups(groups)  # checks the mode now
        self.groups = groups
        self.val_groups: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None
        self._handle: Any = None
        self._logits: list[torch.Tensor] = []

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, CCIMLightningModule) or pl_module.task != "multiclass":
            raise ValueError("WorstGroupValidation is for a CCIMLightningModule with task='multiclass'")
        dictionary = run_dictionary(trainer, pl_module, type(self).__name__)
        dataset = trainer.datamodule.val_dataset
        if dataset is None:
            raise RuntimeError("WorstGroupValidation needs the datamodule's validation split (val_dataset is None)")
        clusters, targets = self.validation_clusters(trainer, dictionary, dataset)
        clusters, targets = trainer.strategy.broadcast((clusters, targets), src=0)
        self.val_groups = self.assign_groups(dictionary, clusters, targets, pl_module.num_classes)

    def assign_groups(
        self, dictionary: ConfounderDictionary, clusters: torch.Tensor, targets: torch.Tensor, num_classes: int
    ) -> torch.Tensor:
        """(n_val,) group of each validation sample from its nearest prototype and class (-1: not decoded)."""
        groups = PseudoGroups(self.groups, seed=self.seed)
        groups.bind(num_clusters=dictionary.num_prototypes, num_classes=num_classes)
        known = dictionary.assignments >= 0
        groups.fit(dictionary.prototypes, dictionary.assignments[known], dictionary.targets[known].long())
        self.num_groups = groups.num_groups
        out = torch.full_like(clusters, -1)
        decoded = clusters >= 0
        out[decoded] = groups(clusters[decoded], targets[decoded])
        return out

    @torch.no_grad()
    def validation_clusters(
        self, trainer: L.Trainer, dictionary: ConfounderDictionary, dataset: Dataset
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest prototype (n_val,) and class (n_val,) of every validation sample (-1 for undecodable ones)."""
        recipe = next(c.recipe for c in trainer.callbacks if isinstance(c, ConfounderDictionaryCallback))
        if not recipe.mask_subject:
            raise ValueError(
                "WorstGroupValidation assigns validation samples by their masked context (the validation split's "
                "context has the subject zeroed), but the dictionary was built unmasked (mask_subject=False)."
            )
        device = trainer.strategy.root_device
        extractor = ContextFeatureExtractor(recipe.extractor, recipe.weights).to(device)
        batch_size = recipe.batch_size or trainer.datamodule.batch_size
        loader = dictionary_loader(dataset, batch_size=batch_size, num_workers=0)
        features = extract_context_features(extractor, loader, device, progress=False).in_index_order()
        del extractor
        size = len(dataset)
        clusters = torch.full((size,), -1, dtype=torch.long)
        targets = torch.full((size,), -1, dtype=torch.long)
        nearest = torch.cdist(features.features.float().cpu(), dictionary.prototypes.float()).argmin(dim=1)
        clusters[features.indices.cpu()] = nearest
        targets[features.indices.cpu()] = features.targets.cpu().long()
        skipped = int((clusters < 0).sum())
        if skipped:
            log.warning("WorstGroupValidation: %d validation samples could not be decoded and are left out.", skipped)
        return clusters, targets

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.val_groups is None:
            return
        self._correct = torch.full((len(self.val_groups),), -1.0, device=pl_module.device)
        # The head's output layer gives the logits; the debiasing method's inference rule is applied after.
        self._handle = pl_module.head.fc.register_forward_hook(lambda _m, _i, out: self._logits.append(out.detach()))

    @override
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._correct is None or not self._logits:
            return
        logits = self._logits[-1]
        self._logits.clear()
        if pl_module.debias is not None:
            logits = pl_module.debias.inference_logits(logits, batch)
        self._correct[batch[INDEX]] = (logits.argmax(dim=1) == batch[TARGET]).float()

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._correct is None:
            return
        self._handle.remove()
        correct = trainer.strategy.reduce(self._correct, reduce_op="max") if trainer.world_size > 1 else self._correct
        self._correct = None
        worst, filled = worst_group_accuracy(correct.cpu(), self.val_groups, self.num_groups, self.min_group_size)
        if worst is None:
            log.warning(
                "WorstGroupValidation: no group has %d validation samples; nothing logged.", self.min_group_size
            )
            return
        pl_module.log(WORST_GROUP_METRIC, worst, prog_bar=True)
        pl_module.log("val/groups", float(filled))


def worst_group_accuracy(
    correct: torch.Tensor, groups: torch.Tensor, num_groups: int, min_group_size: int = 1
) -> tuple[float | None, int]:
    """The smallest per-group accuracy over groups with at least ``min_group_size`` evaluated samples.

    Args:
        correct: (n,) 1.0 right, 0.0 wrong, negative for samples not evaluated.
        groups: (n,) group of each sample, negative for samples without one.
        num_groups: Number of group ids.
        min_group_size: Smallest group counted.

    Returns:
        ``(worst accuracy or None when no group qualifies, number of groups counted)``.
    """
    used = (correct >= 0) & (groups >= 0)
    g, c = groups[used], correct[used].double()
    totals = torch.bincount(g, minlength=num_groups).double()
    rights = torch.zeros(num_groups, dtype=torch.float64).index_add(0, g, c)
    counted = totals >= min_group_size
    if not bool(counted.any()):
        return None, 0
    return float((rights[counted] / totals[counted]).min()), int(counted.sum())
