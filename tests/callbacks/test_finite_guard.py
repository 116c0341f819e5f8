"""FiniteLossGuard: training that turns non-finite stops with the loss, batch and samples named, and no checkpoint
holds the bad weights."""

import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ccim_lightning.callbacks.finite_guard import FiniteLossGuard, NonFiniteTrainingError


class Samples(Dataset):
    """Eight samples as dicts with their ``index``; one of them may carry an infinite input."""

    def __init__(self, bad_index=None, target_scale=1.0):
        self.x = torch.linspace(-1, 1, 8 * 3).reshape(8, 3)
        self.target_scale = target_scale
        if bad_index is not None:
            self.x[bad_index, 1] = float("inf")

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.target_scale * self.x[i].sum(0, keepdim=True), "index": torch.tensor(i)}


class Tiny(L.LightningModule):
    """Linear regression logging train/loss (and a second loss, as CCIM's train/vad_loss)."""

    def __init__(self, lr=0.1, nan_grad_at_step=None):
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.extra = nn.Parameter(torch.zeros(1))
        self.lr = lr
        self.nan_grad_at_step = nan_grad_at_step

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.layer(batch["x"]), batch["y"])
        if self.global_step == self.nan_grad_at_step:
            side = torch.sqrt(self.extra.square()).sum()  # value 0, gradient 0/0 = NaN
        else:
            side = 0.0 * self.extra.sum()
        self.log("train/vad_loss", loss, on_step=True, on_epoch=True)
        self.log("train/loss", loss + side, on_step=True, on_epoch=True)
        return loss + side

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(tmp_path, model, data, guard=True):
    torch.manual_seed(0)
    model.layer.reset_parameters()  # the same start in every test
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, FiniteLossGuard()] if guard else [checkpoint],
    )
    trainer.fit(model, DataLoader(data, batch_size=2, shuffle=False))
    return trainer


def checkpoints_are_finite(folder):
    """Every saved checkpoint's weights are finite; returns the global step of last.ckpt."""
    for path in folder.glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), path.name
    return torch.load(folder / "last.ckpt", weights_only=True)["global_step"]


def test_without_the_guard_last_ckpt_holds_nan_weights(tmp_path):
    """Why the guard exists: ModelCheckpoint saves whatever the weights are."""
    fit(tmp_path, Tiny(), Samples(bad_index=7), guard=False)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert not torch.isfinite(state["layer.weight"]).all()


def test_infinite_loss_stops_before_the_step_and_names_loss_batch_and_samples(tmp_path):
    # sample 7 is in the fourth batch (batch_idx 3, global step 3) of the first epoch
    with pytest.raises(NonFiniteTrainingError) as error:
        fit(tmp_path, Tiny(), Samples(bad_index=7))
    message = str(error.value)
    assert re.search(r"not finite: train/vad_loss=(nan|inf), train/loss=(nan|inf), at", message)
    assert "epoch 0, batch_idx 3 (global step 3)" in message and "index=[6, 7]" in message
    assert checkpoints_are_finite(tmp_path) == 3  # the last good step, nothing after it


def test_nan_gradients_of_a_finite_loss_stop_before_the_step_and_name_the_parameter(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match=r"Gradients are not finite .*train/loss=\d.*global step 2\)"):
        fit(tmp_path, Tiny(nan_grad_at_step=2), Samples())
    with pytest.raises(NonFiniteTrainingError, match=r"index=\[4, 5\]: extra\. The run was stopped"):
        fit(tmp_path / "again", Tiny(nan_grad_at_step=2), Samples())
    assert checkpoints_are_finite(tmp_path) == 2


def test_weights_that_overflow_in_the_step_stop_before_a_checkpoint_saves_them(tmp_path):
    # finite loss and gradients (|gradient| > 100), but lr * gradient exceeds float32: inf weights in the first step
    with pytest.raises(NonFiniteTrainingError, match=r"Weights are not finite .*global step 1\).*layer.weight"):
        fit(tmp_path, Tiny(lr=1e38), Samples(target_scale=1000.0))
    assert not list(tmp_path.glob("*.ckpt"))


def test_finite_training_is_left_alone(tmp_path):
    trainer = fit(tmp_path, Tiny(), Samples())
    assert trainer.global_step == 8 and checkpoints_are_finite(tmp_path) == 8


def test_save_on_exception_does_not_replace_the_last_finite_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2, save_on_exception=True)
    guard = FiniteLossGuard()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[guard, checkpoint])  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match="checkpoints are those of the last finite step"):
        trainer.fit(Tiny(), DataLoader(Samples(bad_index=7), batch_size=2, shuffle=False))
    # Saved at step 2; the guard stopped step 3 (a save on the exception would have written step 3's state).
    assert checkpoints_are_finite(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert checkpoint.save_on_exception is False
    # A later run with these callbacks saves on its own exceptions again.
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[guard, checkpoint])  # fmt: skip
    trainer.fit(Tiny(), DataLoader(Samples(), batch_size=2))
    assert checkpoint.save_on_exception is True
