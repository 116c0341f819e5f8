"""``LastLayerRetraining``: after fitting, refits the output layer on group-balanced data (DFR-style)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from typing_extensions import override

from ccim_lightning.arguments import check_float, check_int
from ccim_lightning.callbacks.confounder_dictionary import ConfounderDictionaryCallback
from ccim_lightning.datamodules.dataset import collate_skipping_none
from ccim_lightning.debias.groups import GroupMode, PseudoGroups
from ccim_lightning.dictionary.collectives import Collectives
from ccim_lightning.dictionary.store import ConfounderDictionary
from ccim_lightning.module import CCIMLightningModule
from ccim_lightning.types import INDEX, TARGET

log = logging.getLogger(__name__)

#: Key of the refit's record in a checkpoint saved after it.
CHECKPOINT_KEY = "last_layer_retraining"


class LastLayerRetraining(Callback):
    """Refits only the head's output layer ``head.fc`` after ``fit``, on group-balanced frozen features.

    Deep Feature Reweighting (Kirichenko et al. 2023) keeps the trained features and refits the last layer so that
    every group counts the same. Here the groups are pseudo-groups (class, context cluster) from the confounder
    dictionary (:class:`~ccim_lightning.debias.groups.PseudoGroups`, coarse by default), never true scene labels.

    Which data: the **training split** as the host sees it, with the evaluation transforms
    (``datamodule.dictionary_dataset(mask_subject=True)``: fixed order, subject zeroed in ``context`` as in every
    batch), i.e. DFR's "train" variant, not a held-out split. Only training samples have a
    dictionary cluster (validation samples have no scene features), and the datamodules train on the whole training
    split; a held-out slice would need both. DFR reports smaller gains from training data than from held-out data,
    since the host has partly fit its training samples' minority groups.

    The rule: with ``n_g`` samples in group ``g`` and ``G`` filled groups, sample ``i`` weighs ``1 / (G n_{g(i)})``
    (every group's total weight is ``1 / G``); starting from the trained layer, L-BFGS minimises
    ``sum_i w_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||^2`` over the frozen features ``x_i`` (the input of
    ``head.fc``, in evaluation mode). Samples without a cluster are left out and counted in the log.

    DDP: every rank computes the features of the whole split and fits; rank 0's weights are broadcast so that all
    ranks hold the same layer. The refit replaces ``head.fc``'s weights in the model; with ``checkpoint`` set, a
    checkpoint is saved after it (``<log dir>/<checkpoint>``) whose ``state_dict`` has the refit layer and whose
    ``last_layer_retraining`` entry (and this callback's state) records the refit. Checkpoints saved during
    ``fit`` (``ModelCheckpoint``) hold the layer before the refit.

    Args:
        groups: ``"coarse"`` (per class, 2-8 clusters of the dictionary's prototypes), ``"aligned"`` (per class,
            the clusters that favour it and the others) or ``"prototypes"``.
        weight_decay: L2 penalty on ``W`` (DFR uses a strong one; it keeps the refit close to a balanced solution).
        max_iterations: L-BFGS iterations.
        batch_size: Batch size of the feature pass (default: the datamodule's).
        checkpoint: File name of the checkpoint saved after the refit, in the trainer's log directory; None to save
            none.
        seed: Seed of the coarse groups' k-means.
    """

    def __init__(
        self,
        groups: GroupMode = "coarse",
        weight_decay: float = 1e-3,
        max_iterations: int = 100,
        batch_size: int | None = None,
        checkpoint: str | None = "last_layer_refit.ckpt",
        seed: int = 0,
    ) -> None:
        where = type(self).__name__
        self.weight_decay = check_float(where, "weight_decay", weight_decay, 0.0)
        self.max_iterations = check_int(where, "max_iterations", max_iterations, 1)
        self.batch_size = None if batch_size is None else check_int(where, "batch_size", batch_size, 1)
        PseudoGroups(groups)  # checks the mode now rather than after training
        self.groups = groups
        self.checkpoint = checkpoint
        self.seed = check_int(where, "seed", seed, 0)
        self.record: dict[str, Any] = {}

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, CCIMLightningModule):
            name = type(pl_module).__name__
            raise TypeError(f"LastLayerRetraining refits a CCIMLightningModule's head.fc, got {name}")
        if pl_module.task != "multiclass":
            raise ValueError("LastLayerRetraining is for task='multiclass' (its groups are (class, cluster))")
        start = time.perf_counter()
        dictionary = run_dictionary(trainer, pl_module, type(self).__name__)
        features, targets, index = self._features(trainer, pl_module)
        clusters = dictionary.assignments[index]
        known = clusters >= 0
        skipped = int((~known).sum())
        features, targets, clusters = features[known], targets[known], clusters[known]
        groups = PseudoGroups(self.groups, seed=self.seed)
        groups.bind(num_clusters=dictionary.num_prototypes, num_classes=pl_module.num_classes)
        groups.fit(dictionary.prototypes, clusters, targets)
        group = groups(clusters, targets)
        counts = torch.bincount(group, minlength=groups.num_groups)
        filled = int((counts > 0).sum())
        weights = 1.0 / (filled * counts[group].double())
        layer = pl_module.head.fc
        weight, bias = refit_linear(
            features, targets, weights, layer.weight.detach(), layer.bias.detach(), self.weight_decay,
            self.max_iterations,
        )  # fmt: skip
        weight, bias = trainer.strategy.broadcast((weight, bias), src=0)
        with torch.no_grad():
            layer.weight.copy_(weight.to(layer.weight))
            layer.bias.copy_(bias.to(layer.bias))
        self.record = {
            "groups": self.groups,
            "split": "train",
            "samples": len(targets),
            "skipped_without_cluster": skipped,
            "filled_groups": filled,
            "smallest_group": int(counts[counts > 0].min()),
            "weight_decay": self.weight_decay,
            "seconds": time.perf_counter() - start,
        }
        log.info("Last-layer retraining: %s", ", ".join(f"{k}={v}" for k, v in self.record.items()))
        if skipped:
            log.warning("Last-layer retraining: %d training samples have no dictionary cluster and were left out.",
                        skipped)  # fmt: skip
        if self.checkpoint:
            folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
            path = folder / self.checkpoint
            trainer.save_checkpoint(path)
            self.record["checkpoint"] = str(path)
            log.info("Last-layer retraining: checkpoint with the refit layer in %s", path)

    @torch.no_grad()
    def _features(
        self, trainer: L.Trainer, pl_module: CCIMLightningModule
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input of ``head.fc`` (n, d_m), the targets and the sample indices of the training split, on the CPU."""
        datamodule = trainer.datamodule
        dataset = datamodule.dictionary_dataset(mask_subject=True)  # the context as batches have it
        loader = DataLoader(dataset, batch_size=self.batch_size or datamodule.batch_size, shuffle=False,
                            num_workers=datamodule.num_workers, collate_fn=collate_skipping_none)  # fmt: skip
        was_training = pl_module.training
        pl_module.eval()
        parts: dict[str, list[torch.Tensor]] = {"x": [], TARGET: [], INDEX: []}
        try:
            for batch in loader:
                batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                x = pl_module.head.forward_features(pl_module.extract_features(batch))
                parts["x"].append(x.float().cpu())
                parts[TARGET].append(batch[TARGET].cpu())
                parts[INDEX].append(batch[INDEX].cpu())
        finally:
            pl_module.train(was_training)
        return torch.cat(parts["x"]), torch.cat(parts[TARGET]).long(), torch.cat(parts[INDEX]).long()

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.record:
            checkpoint[CHECKPOINT_KEY] = dict(self.record)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"record": dict(self.record)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.record = dict(state_dict.get("record", {}))


def refit_linear(
    features: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_decay: float,
    max_iterations: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted, L2-penalised multinomial logistic regression by L-BFGS, started from ``(weight, bias)``.

    Minimises ``sum_i w_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||^2`` (the weights sum to 1). Written with
    torch rather than scikit-learn (a dev dependency only), in float64 on the CPU so that every rank's fit agrees.

    Returns:
        The fitted ``(W (C, d), b (C,))``, float64.
    """
    x, w = features.double().cpu(), (weights / weights.sum()).double().cpu()
    y = targets.cpu()
    W = weight.double().cpu().clone().requires_grad_(True)
    b = bias.double().cpu().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([W, b], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (w * torch.nn.functional.cross_entropy(x @ W.T + b, y, reduction="none")).sum()
        loss = loss + 0.5 * weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return W.detach(), b.detach()


def run_dictionary(trainer: L.Trainer, pl_module: CCIMLightningModule, user: str) -> ConfounderDictionary:
    """The run's dictionary: the one the dictionary callback built or loaded, else built (or loaded) now by its recipe.

    Args:
        trainer: The trainer, whose callbacks include a :class:`ConfounderDictionaryCallback`.
        pl_module: The model (its ``dictionary_shape``).
        user: Name of the caller, for messages.

    Raises:
        RuntimeError: No dictionary callback. ValueError: a dictionary without clusters (``source="random"``).
    """
    builders = [c for c in trainer.callbacks if isinstance(c, ConfounderDictionaryCallback)]
    if not builders:
        raise RuntimeError(
            f"{user} groups samples by their confounder-dictionary cluster: add ConfounderDictionaryCallback to the "
            "trainer, before it (the ccim CLI always does)."
        )
    builder = builders[0]
    dictionary = builder.last_dictionary
    if dictionary is None:  # not needed by the model (baseline head) or restored from a checkpoint: build/load it
        num_prototypes, dim = pl_module.dictionary_shape
        collectives = Collectives.current(trainer.strategy.root_device)
        dictionary = builder.recipe.load_or_build(trainer.datamodule, num_prototypes, dim, collectives)
        builder.last_dictionary = dictionary
    if dictionary.assignments is None or dictionary.targets is None:
        raise ValueError(
            f"{user} needs each training sample's cluster, but the dictionary (source={dictionary.source!r}) has "
            "none: use source='features'."
        )
    return dictionary
