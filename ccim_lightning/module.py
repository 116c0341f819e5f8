"""``CCIMLightningModule``: any host backbone + the CCIM head, with losses, metrics and prediction."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import ClasswiseWrapper, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAveragePrecision,
    MultilabelPrecisionRecallCurve,
)
from typing_extensions import override

from ccim_lightning.arguments import check_finite_settings, check_float, check_int
from ccim_lightning.compat import instantiated_by_cli
from ccim_lightning.datamodules.dataset import is_empty_batch
from ccim_lightning.datamodules.inputs import INPUT_SETTINGS_KEY, settings_entry
from ccim_lightning.debias.base import DebiasMethod
from ccim_lightning.dictionary.store import ConfounderDictionary
from ccim_lightning.head import HEAD_OPTIONS, ContextualCausalIntervention
from ccim_lightning.thresholds import DEFAULT_THRESHOLD, best_f1_thresholds
from ccim_lightning.types import (
    CONTEXT,
    INDEX,
    PROBABILITIES,
    SUBJECT,
    TARGET,
    VAD,
    Batch,
    FeatureBackbone,
    NamedTestSets,
    ReducibleLoss,
    Task,
    check_task,
)

log = logging.getLogger(__name__)

PER_PROCESS_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""BatchNorm layers that need two samples per process in training (``SyncBatchNorm`` is not among them)."""


class TorchModule(Protocol):
    """Any ``torch.nn.Module`` (the type of ``backbone`` and the losses).

    A protocol rather than ``nn.Module`` itself so that ``ccim fit --model.help`` does not list every module torch
    and timm define; any ``nn.Module`` subclass fits.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = True) -> Any: ...


#: ReduceLROnPlateau's running state (``inf`` until the first epoch is measured), not settings.
_SCHEDULER_RUNNING_STATE = ("best", "mode_worse")


def check_optimization_settings(
    where: str, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None
) -> None:
    """Builds the optimizer (and scheduler) once on a probe parameter and refuses any NaN/inf number in them.

    The factories hide their arguments (``lr``, ``betas``, ``gamma``, ...) until ``configure_optimizers``, and torch
    refuses a NaN learning rate but accepts ``lr=inf``; probing at construction names the bad setting before any
    data is read.

    Args:
        where: The module's class name, for messages.
        optimizer: The optimizer factory.
        lr_scheduler: The scheduler factory, or None.
    """
    try:
        probe = optimizer([nn.Parameter(torch.zeros(1))])
    except ValueError as error:  # torch's own refusal ("Invalid learning rate: nan")
        raise ValueError(f"{where}: the optimizer refused its settings: {error}") from error
    name = type(probe).__name__
    for i, group in enumerate(probe.param_groups):
        settings = {key: value for key, value in group.items() if key != "params"}
        check_finite_settings(where, f"optimizer {name} param_groups[{i}]", settings)
    if lr_scheduler is None:
        return
    scheduler = lr_scheduler(probe)
    state = {key: value for key, value in scheduler.state_dict().items() if key not in _SCHEDULER_RUNNING_STATE}
    check_finite_settings(where, f"lr_scheduler {type(scheduler).__name__}", state)
    for i, group in enumerate(probe.param_groups):
        check_finite_settings(where, f"lr_scheduler {type(scheduler).__name__}: param_groups[{i}]['lr']", group["lr"])


class CCIMLightningModule(L.LightningModule):
    """Wraps a host backbone with the CCIM head (``ContextualCausalIntervention``).

    The backbone maps the batch dict to the fused feature ``h`` (B, d_h); the head applies the causal intervention
    and classifies. The confounder dictionary lives in the head's buffers, so it rides in every checkpoint; it is
    filled by ``ccim_lightning.callbacks.ConfounderDictionaryCallback`` before fitting.

    Subclass points (override in your project): ``extract_features`` (how ``h`` is computed from the batch),
    ``compute_loss`` (the training objective), ``predict_probabilities`` (logits to probabilities).

    Args:
        backbone: Host model, any ``nn.Module`` with ``forward(batch) -> h`` (B, d_h). Shipped hosts:
            ``ccim_lightning.hosts.TwoStreamHost``, ``ccim_lightning.hosts.EmotNet`` (EMOTIC's two-stream
            baseline), ``ccim_lightning.hosts.CAERNet`` (CAER-Net-S). From YAML: ``class_path`` / ``init_args``.
        num_classes: Number of emotion classes (linked from the datamodule by the ``ccim`` CLI).
        task: ``"multiclass"`` (one label, cross-entropy, top-1 accuracy) or ``"multilabel"`` (multi-hot,
            BCE-with-logits, mean average precision).
        feature_dim: ``d_h``; read from ``backbone.feature_dim`` when not given.
        num_prototypes: ``N``, dictionary size (paper: EMOTIC 256, CAER-S 128, GroupWalk 256).
        confounder_dim: ``d``, width of the dictionary features (2048 for ResNet-152 features). The ``ccim`` CLI
            sets it from the scene CNN (``--dictionary.extractor``), so it is set in one place.
        attention: ``"dot_product"`` (eq. 6, the paper's default), ``"additive"`` (eq. 7) or ``"none"`` (baseline).
        hidden_dim: ``d_m`` of eq. 4.
        attention_dim: ``d_n`` of eqs. 6-7.
        dropout: Dropout of the head's residual block.
        residual_scale: Weight of the residual block's output.
        use_prior: Multiply by ``P(z)`` in eq. 5 (False: the "without P(z)" ablation).
        uniform_attention: Uniform ``lambda`` (the "without lambda" ablation).
        loss: Replaces the default loss; called as ``loss(logits, target)``. With ``debias`` it must have a
            ``reduction`` attribute (the methods weight per-sample losses).
        debias: A method from :mod:`ccim_lightning.debias` that changes what the host learns (e.g.
            ``ccim_lightning.debias.ClusterReweighting``); combines with any ``attention``.
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
        backbone: TorchModule,
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
        loss: TorchModule | None = None,
        debias: DebiasMethod | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        class_names: Sequence[str] | None = None,
        continuous_loss: TorchModule | None = None,
        continuous_weight: float = 1.0,
        continuous_key: str = VAD,
        continuous_dim: int = 3,
    ) -> None:
        arguments = dict(locals())  # before any other local: the head's options are passed through by name
        super().__init__()
        # From Python the backbone and loss are live modules: keeping them in hparams would pickle whole models
        # into every checkpoint; pass them again to ``load_from_checkpoint``. From the CLI they are configs.
        python_only = ["backbone", "loss", "debias", "continuous_loss", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=None if instantiated_by_cli() else python_only)
        task = check_task(task, where=f"{type(self).__name__}(task=...)")
        if feature_dim is None:
            if not isinstance(backbone, FeatureBackbone):
                raise ValueError(
                    f"feature_dim was not given and the backbone {type(backbone).__name__} has no `feature_dim` "
                    "attribute: pass feature_dim= (the width of the feature the backbone returns)"
                )
            feature_dim = backbone.feature_dim
        self.backbone = backbone
        head_options = {name: arguments[name] for name in HEAD_OPTIONS}
        self.head = ContextualCausalIntervention(feature_dim=feature_dim, num_classes=num_classes, **head_options)
        self.task = task
        self.num_classes = num_classes
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        if loss is None:
            loss = nn.CrossEntropyLoss() if task == "multiclass" else nn.BCEWithLogitsLoss()
        self.loss = loss
        self.debias = debias
        self._elementwise = None
        if debias is not None:
            if not isinstance(loss, ReducibleLoss):
                raise ValueError(
                    f"debias={type(debias).__name__} weights per-sample losses, but the loss {type(loss).__name__} "
                    "has no `reduction` attribute to turn off: give it one (reduction='none' -> per-element loss)."
                )
            self._elementwise = copy.copy(loss)
            self._elementwise.reduction = "none"
            debias.bind(num_classes=num_classes, task=task, num_clusters=num_prototypes)
        # Each training sample's dictionary cluster (sample-index order; -1: not clustered), for the debiasing
        # methods. Its length is the training split's, known only after the build: resized in on_load_checkpoint.
        self.register_buffer("train_clusters", torch.zeros(0, dtype=torch.long))
        # Multilabel decision thresholds, per class, chosen for the best F1 on the validation probabilities at each
        # validation epoch end (``ccim_lightning.thresholds``); 0.5 with ``thresholds_chosen`` False until then (and
        # always for multiclass).
        self.register_buffer("decision_thresholds", torch.full((num_classes,), DEFAULT_THRESHOLD))
        self.register_buffer("thresholds_chosen", torch.tensor(False))
        self.threshold_curve = MultilabelPrecisionRecallCurve(num_classes) if task == "multilabel" else None
        self.continuous_loss = continuous_loss
        self.continuous_weight = check_float(type(self).__name__, "continuous_weight", continuous_weight, 0.0)
        continuous_dim = check_int(type(self).__name__, "continuous_dim", continuous_dim, 1)
        check_optimization_settings(type(self).__name__, optimizer, lr_scheduler)
        self.continuous_key = continuous_key
        self.continuous_head = nn.Linear(hidden_dim, continuous_dim) if continuous_loss is not None else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # One metric collection per stage and evaluation set, created on first use (the test sets are only known
        # once the trainer hands over the dataloaders).
        self.metrics = nn.ModuleDict()
        # Batches a step could not use as they are, by "stage: reason" (see _note_skipped_batch); this process's.
        self.skipped_batches: dict[str, int] = {}

    # --- subclass points -------------------------------------------------------------------------------------------
    def extract_features(self, batch: Batch) -> torch.Tensor:
        """Returns the host's fused feature ``h`` (B, d_h) for a batch."""
        return self.backbone(batch)

    def compute_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Returns the training loss for a batch's logits."""
        return self.loss(logits, self._loss_target(batch[TARGET]))

    def predict_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Maps logits to class probabilities (softmax for multiclass, sigmoid for multilabel)."""
        return logits.softmax(dim=-1) if self.task == "multiclass" else logits.sigmoid()

    # --- forward and steps -----------------------------------------------------------------------------------------
    @override
    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns the logits (B, num_classes) to predict from (after the debiasing method's inference rule)."""
        logits, _ = self._outputs(batch)
        return self.debias.inference_logits(logits, batch) if self.debias is not None else logits

    def _outputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's logits, and the continuous predictions when a ``continuous_loss`` is set (else None)."""
        for key in (CONTEXT, SUBJECT):
            if key in batch and batch[key].dtype == torch.uint8:
                raise TypeError(
                    f'batch["{key}"] is uint8: the datamodule hands raw pixels to the device and normalises them in '
                    "its on_after_batch_transfer hook, which did not run for this batch (a loader taken by hand "
                    "during a run?). Call datamodule.normalize_batch(batch) first, or use device_normalize=False."
                )
        features = self.head.forward_features(self.extract_features(batch))
        continuous = self.continuous_head(features) if self.continuous_head is not None else None
        return self.head.forward_head(features), continuous

    # --- the confounder dictionary -------------------------------------------------------------------------------
    @property
    def needs_dictionary(self) -> bool:
        """Whether the head or the debiasing method reads the confounder dictionary."""
        return self.head.uses_dictionary or (self.debias is not None and self.debias.needs_clusters)

    @property
    def has_dictionary(self) -> bool:
        """Whether everything that reads the dictionary has it (built, or restored from a checkpoint)."""
        head_ready = not self.head.uses_dictionary or self.head.is_dictionary_filled
        clusters_ready = self.debias is None or not self.debias.needs_clusters or self.train_clusters.numel() > 0
        return head_ready and clusters_ready

    @property
    def dictionary_shape(self) -> tuple[int, int]:
        """(N, d) the dictionary must have."""
        return self.head.num_prototypes, self.head.confounder_dim

    def set_dictionary(self, dictionary: ConfounderDictionary) -> None:
        """Puts a dictionary into the model: the head's prototypes and prior, the training samples' clusters.

        Raises:
            ValueError: A debiasing method needs the samples' clusters and targets but the dictionary has none
                (the random-Z ablation has no clusters).
        """
        if self.head.uses_dictionary:
            self.head.set_dictionary(dictionary.prototypes, dictionary.prior)
        if dictionary.assignments is not None:
            self.train_clusters = dictionary.assignments.to(self.device)
        if self.debias is not None and self.debias.needs_clusters:
            if dictionary.assignments is None or dictionary.targets is None:
                raise ValueError(
                    f"debias={type(self.debias).__name__} needs each training sample's cluster and label, but this "
                    f"dictionary (source={dictionary.source!r}) has none: use source='features' (the random-Z "
                    "ablation has no clusters)."
                )
            known = dictionary.assignments >= 0
            self.debias.fit_dictionary(dictionary.prototypes)
            self.debias.fit_clusters(dictionary.assignments[known], dictionary.targets[known])

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the state dict is loaded: give the variable-length buffer the checkpoint's length.
        state = checkpoint.get("state_dict", {})
        saved = state.get("train_clusters")
        if saved is not None:
            self.train_clusters = torch.zeros_like(saved, device=self.train_clusters.device)
        if "state_dict" in checkpoint and "decision_thresholds" not in state:  # saved before thresholds existed
            state["decision_thresholds"] = torch.full_like(self.decision_thresholds, DEFAULT_THRESHOLD, device="cpu")
            state["thresholds_chosen"] = torch.tensor(False)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The evaluation input settings of the datamodule, for ``ccim_lightning.inference.Predictor``.
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        entry = settings_entry(datamodule)
        if entry is not None:
            checkpoint[INPUT_SETTINGS_KEY] = entry

    def _batch_clusters(self, batch: Batch) -> torch.Tensor | None:
        if self.debias is None or not self.debias.needs_clusters:
            return None
        if self.train_clusters.numel() == 0:
            raise RuntimeError(
                f"debias={type(self.debias).__name__} needs each training sample's dictionary cluster, but none is "
                "known: add ConfounderDictionaryCallback (the ccim CLI always does) or call set_dictionary()."
            )
        index = batch[INDEX]
        if int(index.max()) >= self.train_clusters.numel():
            raise IndexError(
                f"Batch sample index {int(index.max())} is beyond the {self.train_clusters.numel()} training samples "
                "the dictionary was built on: the training split changed since; rebuild the dictionary."
            )
        clusters = self.train_clusters[index]
        if (clusters < 0).any():
            missing = index[clusters < 0].tolist()[:10]
            raise ValueError(f"Training samples {missing} have no dictionary cluster (skipped during the build).")
        return clusters

    # --- batches that skipped samples left empty or with one sample -----------------------------------------------
    def _note_skipped_batch(self, stage: str, reason: str) -> None:
        """Counts a batch the step could not use as it is (``skipped_batches``); warns on the first of each kind."""
        key = f"{stage}: {reason}"
        self.skipped_batches[key] = self.skipped_batches.get(key, 0) + 1
        if self.skipped_batches[key] == 1:
            log.warning(
                "%s (rank %d); further such batches are counted in model.skipped_batches. The skipped samples' "
                "files are named in the datamodule's summary at the end of the run.",
                key, self.global_rank,
            )  # fmt: skip

    def _skip_training_batch(self) -> torch.Tensor | None:
        """The training step of an empty batch: nothing to learn, and no collective left out under DDP.

        In one process it returns ``None`` (Lightning then skips backward and the optimizer step). Under DDP the
        other ranks still run the gradient all-reduce and the step's ``sync_dist`` log, so this rank returns a zero
        loss that depends on every trainable parameter (its gradients are zeros; the ranks average them) and logs
        it with weight 0, so the epoch mean is that of the real batches.
        """
        self._note_skipped_batch("train", "a training batch with no sample (all failed to decode) is skipped")
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        loss = torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0
        if self.continuous_head is not None:
            self.log(f"train/{self.continuous_key}_loss", loss, on_step=True, on_epoch=True, batch_size=0,
                     add_dataloader_idx=False, sync_dist=True)  # fmt: skip
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=0, prog_bar=True,
                 add_dataloader_idx=False, sync_dist=True)  # fmt: skip
        return loss

    @contextlib.contextmanager
    def _running_statistics_for_one_sample(self, batch: Batch) -> Iterator[None]:
        """A one-sample training batch through the BatchNorm layers' running statistics (eval mode) for this step.

        Batch statistics of one sample do not exist (BatchNorm raises "Expected more than 1 value per channel"):
        such a batch, e.g. one that skipped samples shrank, is trained with the running mean and variance instead,
        and leaves them unchanged. Only per-process BatchNorm layers are affected (SyncBatchNorm sees all ranks).
        """
        layers = []
        if batch[INDEX].numel() == 1:
            layers = [m for m in self.modules() if isinstance(m, PER_PROCESS_BATCH_NORM) and m.training]
        if layers:
            self._note_skipped_batch("train", "a one-sample training batch uses BatchNorm's running statistics")
        for layer in layers:
            layer.train(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.train(True)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if is_empty_batch(batch):
            return self._skip_training_batch()
        with self._running_statistics_for_one_sample(batch):
            return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if is_empty_batch(batch):  # no collective at step time in evaluation: the epoch-end sync still matches
            self._note_skipped_batch("val", "a batch with no sample (all failed to decode) is skipped")
            return
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self._test_set_name(dataloader_idx)
        if is_empty_batch(batch):
            self._note_skipped_batch(name, "a batch with no sample (all failed to decode) is skipped")
            return
        self._shared_step(batch, name)

    @override
    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Returns ``{"index": (B,), "probabilities": (B, C)}`` so predictions can be matched to samples.

        An empty batch (all its samples failed to decode) gives B = 0 rows.
        """
        if is_empty_batch(batch):
            self._note_skipped_batch("predict", "a batch with no sample (all failed to decode) gives no rows")
            outputs = {INDEX: batch[INDEX], PROBABILITIES: torch.zeros(0, self.num_classes, device=self.device)}
            if self.continuous_head is not None:
                outputs[self.continuous_key] = torch.zeros(0, self.continuous_head.out_features, device=self.device)
            return outputs
        logits, continuous = self._outputs(batch)
        if self.debias is not None:
            logits = self.debias.inference_logits(logits, batch)
        outputs = {INDEX: batch[INDEX], PROBABILITIES: self.predict_probabilities(logits.float())}
        if continuous is not None:
            outputs[self.continuous_key] = continuous.float()
        return outputs

    def _shared_step(self, batch: Batch, stage: str) -> torch.Tensor:
        logits, continuous = self._outputs(batch)
        batch_size = logits.shape[0]
        on_step = stage == "train"
        if self.debias is not None and stage == "train":
            loss, terms = self.debias.training_loss(logits, batch, self._batch_clusters(batch), self._elementwise_loss)
            for name, value in terms.items():
                self.log(f"train/debias/{name}", value, on_step=True, on_epoch=True, batch_size=batch_size)
        else:
            if self.debias is not None:
                logits = self.debias.inference_logits(logits, batch)
            loss = self.compute_loss(logits, batch)
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
        target = batch[TARGET].long() if self.task == "multilabel" else batch[TARGET]
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
            if stage == "val":
                self.threshold_curve.update(self.predict_probabilities(scores), target)
        return loss

    def _elementwise_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._elementwise(logits, self._loss_target(target))

    def _loss_target(self, target: torch.Tensor) -> torch.Tensor:
        return target.float() if self.task == "multilabel" else target

    # --- metrics ---------------------------------------------------------------------------------------------------
    def _make_metrics(self, stage: str, per_class: bool) -> MetricCollection:
        if per_class:  # multilabel AP of every class, logged as <stage>/AP/<class name> at epoch end
            per_class_ap = MultilabelAveragePrecision(self.num_classes, average=None)
            return MetricCollection(
                {"AP": ClasswiseWrapper(per_class_ap, labels=self.class_names, prefix=f"{stage}/AP/")}
            )
        if self.task == "multiclass":
            metrics: dict[str, Metric] = {
                "acc": MulticlassAccuracy(self.num_classes, average="micro"),
                "macro_acc": MulticlassAccuracy(self.num_classes, average="macro"),
            }
        else:
            # The macro mean runs over all C classes: a class without a positive sample in the evaluated set has an
            # undefined AP that torchmetrics (like scikit-learn) counts as 0, which lowers mAP
            # (tests/test_module.py checks this against a hand computation).
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
        datamodule = self.trainer.datamodule
        names = datamodule.test_set_names if isinstance(datamodule, NamedTestSets) else None
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
            for name, value in metric.compute().items():
                self.log(name, value, add_dataloader_idx=False)
            metric.reset()

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._create_metrics(["train", "val"])
        elif stage == "validate":
            self._create_metrics(["val"])

    @override
    def on_test_start(self) -> None:
        self._create_metrics(self._test_set_names())

    @override
    def on_train_epoch_end(self) -> None:
        self._log_per_class(["train"])

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_per_class(["val"])
        self._choose_thresholds()

    def _choose_thresholds(self) -> None:
        """Multilabel: per class, the threshold of best validation F1 into ``decision_thresholds`` (all ranks)."""
        curve = self.threshold_curve
        if curve is None or not curve.update_called:
            return
        if not self.trainer.sanity_checking:  # the sanity check's few batches do not choose anything
            with warnings.catch_warnings():  # a class without validation positives keeps the default threshold
                warnings.filterwarnings("ignore", message="No positive samples found in target")
                precision, recall, thresholds = curve.compute()  # synchronised over the ranks by torchmetrics
            chosen = best_f1_thresholds(precision, recall, thresholds)
            self.decision_thresholds.copy_(chosen.to(self.decision_thresholds.device))
            self.thresholds_chosen.fill_(True)
        curve.reset()

    @override
    def on_test_epoch_end(self) -> None:
        self._log_per_class(self._test_set_names())

    # --- optimisation ----------------------------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
