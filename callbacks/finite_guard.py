"""Stops training at the first non-finite loss or gradient, before the optimizer step can spoil the weights.

A NaN or infinite loss propagates into every weight at the next optimizer step; from then on the run only produces
NaN, and ``ModelCheckpoint`` saves those weights as ``last.ckpt`` (and, since NaN compares false, often keeps them as
``best``). :class:`FiniteLossGuard` raises instead, from Lightning's hooks:

* ``on_before_backward`` receives the loss: a non-finite loss stops the run before its backward pass and its optimizer
  step, so the weights (and every checkpoint) stay those of the last good step;
* ``on_before_optimizer_step``: a finite loss whose gradients overflowed stops the run before the step as well
  (skipped under a ``GradScaler``, where inf gradients are expected: the scaler skips that step itself);
* ``on_train_batch_end`` (``check_parameters=True``): a finite step that still overflowed a weight.

The error names the logged losses that are not finite (``train/loss``, ``train/vad_loss``, ...), the epoch,
``batch_idx`` and global step, and the batch's sample ``index`` values, so the offending samples can be looked at.
Raising ends ``Trainer.fit``: ``ModelCheckpoint`` saves only at the end of a batch, epoch or validation, which never
comes. A ``ModelCheckpoint(save_on_exception=True)`` would save the current state on the exception and replace
``last.ckpt`` with it (BatchNorm's running statistics may already hold the bad batch, the weights too after a bad
step): for the guard's own error the guard turns that save off (``on_exception`` runs before the checkpoint
callbacks, which Lightning keeps last) and turns it back on at the next ``setup``, so the files on disk stay those of
the last finite step, as its message says. (``OnExceptionCheckpoint`` writes its own file, never ``last.ckpt``.)

Each check reads one value back from the device per step (the progress bar does the same for the loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from typing_extensions import override

from ccim_lightning.types import INDEX

__all__ = ["FiniteLossGuard", "NonFiniteTrainingError"]

_LISTED = 16
"""How many sample indices and names a message lists."""


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight."""


class FiniteLossGuard(Callback):
    """Raises :class:`NonFiniteTrainingError` at the first non-finite training loss, gradient or weight.

    Args:
        check_gradients: Also check, before each optimizer step, that the gradients are finite (one norm over all
            of them). Skipped while a ``GradScaler`` (``precision="16-mixed"``) handles overflow.
        check_parameters: Also check, after each training batch, that the trainable weights are finite.
        index_key: Batch key of the samples' positions in their split, listed in the message.
    """

    def __init__(self, check_gradients: bool = True, check_parameters: bool = True, index_key: str = INDEX) -> None:
        super().__init__()
        self.check_gradients = check_gradients
        self.check_parameters = check_parameters
        self.index_key = index_key
        self._batch: Any = None
        self._batch_idx = -1
        self._held_back: list[ModelCheckpoint] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for checkpoint in self._held_back:  # a later run saves on its exceptions again
            checkpoint.save_on_exception = True
        self._held_back = []

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, NonFiniteTrainingError):
            return
        # The state now holds non-finite values: a save on this exception would replace the last finite last.ckpt.
        self._held_back = [
            cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_on_exception
        ]
        for checkpoint in self._held_back:
            checkpoint.save_on_exception = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        losses = _non_finite_metrics(trainer.callback_metrics)
        named = ", ".join(losses) if losses else f"the loss returned by training_step ({_value(loss)})"
        raise NonFiniteTrainingError(
            f"Training loss is not finite: {named}, {self._where(trainer)}. The run was stopped before the backward "
            "pass and the optimizer step, so the weights and checkpoints are those of the last finite step. Look "
            "at these samples' inputs and targets (NaN/inf or out-of-range values), then at the learning rate; "
            "Trainer(detect_anomaly=True) finds the operation that produced it."
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.check_gradients or _scales_gradients(trainer):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or math.isfinite(float(torch.nn.utils.get_total_norm(grads))):
            return
        names = [name for name, p in pl_module.named_parameters() if p.grad is not None and not _finite(p.grad)]
        if not names:  # finite gradients whose norm overflows float32; any overflowing weight is caught after the step
            return
        raise NonFiniteTrainingError(
            f"Gradients are not finite although the loss is ({_logged(trainer)}), {self._where(trainer)}: "
            f"{_listing(names)}. The run was stopped before the optimizer step, so the weights and checkpoints are "
            "those of the last finite step. Clip the gradients (Trainer(gradient_clip_val=...)), lower the learning "
            "rate, or look at these samples."
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.check_parameters:
            return
        params = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        if not params or math.isfinite(float(torch.nn.utils.get_total_norm(params))):
            return
        names = [name for name, p in pl_module.named_parameters() if p.requires_grad and not _finite(p.detach())]
        if not names:  # finite weights whose norm overflows float32
            return
        raise NonFiniteTrainingError(
            f"Weights are not finite after the optimizer step ({_logged(trainer)}), {self._where(trainer)}: "
            f"{_listing(names)}. Training stops before a checkpoint saves them. Lower the learning rate or clip "
            "the gradients (Trainer(gradient_clip_val=...))."
        )

    def _where(self, trainer: pl.Trainer) -> str:
        where = f"at epoch {trainer.current_epoch}, batch_idx {self._batch_idx} (global step {trainer.global_step})"
        index = self._batch.get(self.index_key) if isinstance(self._batch, Mapping) else None
        if isinstance(index, torch.Tensor):
            values = index.detach().flatten().tolist()
            more = f", ... ({len(values)} in all)" if len(values) > _LISTED else ""
            where += f", batch samples {self.index_key}={values[:_LISTED]}{more}"
        return where


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _value(tensor: torch.Tensor) -> str:
    return str(tensor.detach().flatten()[0].item()) if tensor.numel() else "empty"


def _non_finite_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """``name=value`` of the logged values that are not finite (``*_step`` forks shown under their own name)."""
    found = {}
    for name, value in metrics.items():
        if name.endswith("_epoch") or name.startswith(("val", "test")):  # earlier aggregates, not this step
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not _finite(value):
            found[name.removesuffix("_step")] = _value(value)
    return [f"{name}={value}" for name, value in found.items()]


def _logged(trainer: pl.Trainer) -> str:
    """``name=value`` of the training values logged so far, ``*_step`` forks shown once under their own name."""
    values = {}
    for name, value in trainer.callback_metrics.items():
        if name.startswith("train") and not name.endswith("_epoch") and isinstance(value, torch.Tensor):
            if value.numel() == 1:
                values[name.removesuffix("_step")] = f"{float(value):.6g}"
    shown = [f"{name}={value}" for name, value in values.items()]
    return ", ".join(shown[:_LISTED]) if shown else "no training loss logged"


def _listing(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _scales_gradients(trainer: pl.Trainer) -> bool:
    """Whether a GradScaler runs: it expects overflowing gradients now and then and skips those steps itself."""
    plugin = trainer.precision_plugin
    return isinstance(plugin, MixedPrecision) and plugin.scaler is not None
