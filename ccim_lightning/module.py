"""``CCIMLightningModule``: any host backbone + the CCIM head, with losses, metrics and prediction."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

from ccim_lightning.head import ContextualCausalIntervention

try:  # Set by LightningCLI while it instantiates the model: then the hparams are config dicts, not modules.
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older/newer Lightning without it: treat every call as a Python call
    _given_hyperparameters = None

log = logging.getLogger(__name__)

Task = Literal["multiclass", "multilabel"]


class CCIMLightningModule(L.LightningModule):
    """Wraps a host backbone with the CCIM head (``ContextualCausalIntervention``).

    The backbone maps the batch dict to the fused feature ``h`` (B, d_h); the head applies the causal intervention
    and classifies. The confounder dictionary lives in the head's buffers, so it rides in every checkpoint; it is
    filled by ``ccim_lightning.callbacks.ConfounderDictionaryCallback`` before fitting.

    Subclass points (override in your project): ``extract_features`` (how ``h`` is computed from the batch),
    ``compute_loss`` (the training objective), ``predict_probabilities`` (logits to probabilities).

    Args:
        backbone: Host model, ``forward(batch) -> h``. From YAML: ``class_path`` / ``init_args``.
        num_classes: Number of emotion classes (linked from the datamodule by the ``ccim`` CLI).
        task: ``"multiclass"`` (one label, cross-entropy, top-1 accuracy) or ``"multilabel"`` (multi-hot,
            BCE-with-logits, mean average precision).
        feature_dim: ``d_h``; read from ``backbone.feature_dim`` when not given.
        num_prototypes: ``N``, dictionary size (paper: EMOTIC 256, CAER-S 128, GroupWalk 256).
        confounder_dim: ``d``, width of the dictionary features (2048 for ResNet-152 features).
        attention: ``"dot_product"`` (eq. 6, the paper's default), ``"additive"`` (eq. 7) or ``"none"`` (baseline).
        hidden_dim: ``d_m`` of eq. 4.
        attention_dim: ``d_n`` of eqs. 6-7.
        dropout: Dropout of the head's residual block.
        residual_scale: Weight of the residual block's output.
        use_prior: Multiply by ``P(z)`` in eq. 5 (False: the "without P(z)" ablation).
        uniform_attention: Uniform ``lambda`` (the "without lambda" ablation).
        loss: Replaces the default loss; called as ``loss(logits, target)``.
        optimizer: Optimizer factory, called with the parameters (default ``torch.optim.AdamW`` with its defaults).
        lr_scheduler: Optional scheduler factory, called with the optimizer; ReduceLROnPlateau monitors
            ``val/loss``.
        class_names: Names used to log per-class values; defaults to ``class_0``...
        continuous_loss: Adds a regression output on the head's feature for the batch's ``continuous_key`` targets
            (EMOTIC's valence/arousal/dominance), trained with this loss (e.g.
            ``ccim_lightning.losses.EmoticContinuousLoss``) next to the classification loss.
        continuous_weight: Weight of the continuous loss in the total.
        continuous_key: Batch key of the continuous targets, (B, continuous_dim).
        continuous_dim: Number of continuous targets (3 for V/A/D).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        task: Task = "multiclass",
        feature_dim: int | None = None,
        num_prototypes: int = 128,
        confounder_dim: int = 2048,
        attention: Literal["dot_product", "additive", "none"] = "dot_product",
        hidden_dim: int = 128,
        attention_dim: int = 256,
        dropout: float = 0.5,
        residual_scale: float = 0.3,
        use_prior: bool = True,
        uniform_attention: bool = False,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        class_names: Sequence[str] | None = None,
        continuous_loss: nn.Module | None = None,
        continuous_weight: float = 1.0,
        continuous_key: str = "vad",
        continuous_dim: int = 3,
    ) -> None:
        super().__init__()
        cli_hparams = _given_hyperparameters is not None and _given_hyperparameters.get() is not None
        # From Python the backbone and loss are live modules: keeping them in hparams would pickle whole models
        # into every checkpoint; pass them again to ``load_from_checkpoint``. From the CLI they are configs.
        python_only = ["backbone", "loss", "continuous_loss", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=None if cli_hparams else python_only)
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
        if feature_dim is None:
            feature_dim = getattr(backbone, "feature_dim", None)
            if feature_dim is None:
                raise ValueError(
                    f"feature_dim was not given and the backbone {type(backbone).__name__} has no `feature_dim` "
                    "attribute: pass feature_dim= (the width of the feature the backbone returns)"
                )
        self.backbone = backbone
        self.head = ContextualCausalIntervention(
            feature_dim=feature_dim,
            num_classes=num_classes,
            num_prototypes=num_prototypes,
            confounder_dim=confounder_dim,
            attention=attention,
            hidden_dim=hidden_dim,
            attention_dim=attention_dim,
            dropout=dropout,
            residual_scale=residual_scale,
            use_prior=use_prior,
            uniform_attention=uniform_attention,
        )
        self.task = task
        self.num_classes = num_classes
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        if loss is None:
            loss = nn.CrossEntropyLoss() if task == "multiclass" else nn.BCEWithLogitsLoss()
        self.loss = loss
        self.continuous_loss = continuous_loss
        self.continuous_weight = continuous_weight
        self.continuous_key = continuous_key
        self.continuous_head = nn.Linear(hidden_dim, continuous_dim) if continuous_loss is not None else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # One metric collection per stage and evaluation set, created on first use (the test sets are only known
        # once the trainer hands over the dataloaders).
        self.metrics = nn.ModuleDict()

    # --- subclass points -------------------------------------------------------------------------------------------
    def extract_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns the host's fused feature ``h`` (B, d_h) for a batch."""
        return self.backbone(batch)

    def compute_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns the training loss for a batch's logits."""
        return self.loss(logits, self._loss_target(batch["target"]))

    def predict_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Maps logits to class probabilities (softmax for multiclass, sigmoid for multilabel)."""
        return logits.softmax(dim=-1) if self.task == "multiclass" else logits.sigmoid()

    # --- forward and steps -----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns logits (B, num_classes) for a batch dict."""
        return self._outputs(batch)[0]

    def _outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and the continuous predictions when a ``continuous_loss`` is set (else None)."""
        features = self.head.forward_features(self.extract_features(batch))
        continuous = self.continuous_head(features) if self.continuous_head is not None else None
        return self.head.forward_head(features), continuous

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._shared_step(batch, self._test_set_name(dataloader_idx))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Returns ``{"index": (B,), "probabilities": (B, C)}`` so predictions can be matched to samples."""
        logits, continuous = self._outputs(batch)
        outputs = {"index": batch["index"], "probabilities": self.predict_probabilities(logits.float())}
        if continuous is not None:
            outputs[self.continuous_key] = continuous.float()
        return outputs

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits, continuous = self._outputs(batch)
        loss = self.compute_loss(logits, batch)
        batch_size = logits.shape[0]
        on_step = stage == "train"
        if continuous is not None:
            continuous_loss = self.continuous_loss(continuous.float(), batch[self.continuous_key].float())
            self.log(f"{stage}/{self.continuous_key}_loss", continuous_loss, on_step=on_step, on_epoch=True,
                     batch_size=batch_size, add_dataloader_idx=False, sync_dist=True)  # fmt: skip
            loss = loss + self.continuous_weight * continuous_loss
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            batch_size=batch_size,
            prog_bar=stage in ("train", "val"),
            add_dataloader_idx=False,
            sync_dist=True,  # one scalar all-reduce per step: noise next to DDP's gradient all-reduce
        )
        scores = logits.detach().float()
        target = batch["target"].long() if self.task == "multilabel" else batch["target"]
        metrics = self._metrics(stage)
        metrics.update(scores, target)
        # Logged as Metric objects: Lightning computes them at epoch end (torchmetrics syncs the ranks), per test set.
        self.log_dict(
            metrics,
            on_step=False,
            on_epoch=True,
            batch_size=batch_size,
            prog_bar=stage != "train",
            add_dataloader_idx=False,
        )
        if self.task == "multilabel":
            self._metrics(stage, per_class=True).update(scores, target)
        return loss

    def _loss_target(self, target: torch.Tensor) -> torch.Tensor:
        return target.float() if self.task == "multilabel" else target

    # --- metrics ---------------------------------------------------------------------------------------------------
    def _make_metrics(self, stage: str, per_class: bool) -> MetricCollection:
        if per_class:  # multilabel AP of every class, logged under its class name at epoch end
            return MetricCollection({"AP": MultilabelAveragePrecision(self.num_classes, average=None)})
        if self.task == "multiclass":
            metrics: dict[str, Metric] = {
                "acc": MulticlassAccuracy(self.num_classes, average="micro"),
                "macro_acc": MulticlassAccuracy(self.num_classes, average="macro"),
            }
        else:
            # torchmetrics leaves classes without a positive sample (AP undefined) out of the macro mean.
            metrics = {"mAP": MultilabelAveragePrecision(self.num_classes, average="macro")}
        return MetricCollection(metrics, prefix=f"{stage}/")

    def _metrics(self, stage: str, per_class: bool = False) -> MetricCollection:
        # ModuleDict keys may not shadow nn.Module attributes such as `train`, hence the suffix.
        key = f"{stage}_per_class" if per_class else f"{stage}_metrics"
        if key not in self.metrics:
            self.metrics[key] = self._make_metrics(stage, per_class).to(self.device)
        return self.metrics[key]

    def _create_metrics(self, stages: Sequence[str]) -> None:
        # Before the first log of a run: Lightning finds logged Metric objects among the submodules it sees then.
        for stage in stages:
            self._metrics(stage)
            if self.task == "multilabel":
                self._metrics(stage, per_class=True)

    def _test_set_names(self) -> list[str]:
        loaders = self.trainer.test_dataloaders
        num_loaders = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        names = getattr(self.trainer.datamodule, "test_set_names", None)
        if names and len(names) == num_loaders:
            return [f"test_{name}" for name in names]
        return ["test"] if num_loaders == 1 else [f"test_{i}" for i in range(num_loaders)]

    def _test_set_name(self, dataloader_idx: int) -> str:
        return self._test_set_names()[dataloader_idx]

    def _log_per_class(self, stages: Sequence[str]) -> None:
        if self.task != "multilabel":
            return
        for stage in stages:
            metric = self._metrics(stage, per_class=True)["AP"]
            if not metric.update_called:
                continue
            per_class = metric.compute()
            for name, value in zip(self.class_names, per_class):
                self.log(f"{stage}/AP/{name}", value, add_dataloader_idx=False)
            metric.reset()

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._create_metrics(["train", "val"])
        elif stage == "validate":
            self._create_metrics(["val"])

    def on_test_start(self) -> None:
        self._create_metrics(self._test_set_names())

    def on_train_epoch_end(self) -> None:
        self._log_per_class(["train"])

    def on_validation_epoch_end(self) -> None:
        self._log_per_class(["val"])

    def on_test_epoch_end(self) -> None:
        self._log_per_class(self._test_set_names())

    # --- optimisation ----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
