"""Batches that decode-time skips (``on_bad_sample="skip"``) left empty or with one sample: the run goes on."""

import logging

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ccim_lightning import CCIMLightningModule
from ccim_lightning.datamodules.dataset import collate_skipping_none, is_empty_batch


class BatchNormHost(nn.Module):
    """Pooled colours through a linear layer and a BatchNorm1d (which refuses one sample in training)."""

    def __init__(self, feature_dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(6, feature_dim)
        self.norm = nn.BatchNorm1d(feature_dim)
        self.feature_dim = feature_dim

    def forward(self, batch):
        pooled = torch.cat([batch["subject"].mean(dim=(2, 3)), batch["context"].mean(dim=(2, 3))], dim=1)
        return self.norm(self.proj(pooled))


class SometimesUndecodable(Dataset):
    """Random samples; those in ``bad`` come back as ``None``, as a skip-mode dataset returns an undecodable one."""

    def __init__(self, n: int, bad: set[int], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.subject = torch.randn(n, 3, 4, 4, generator=g)
        self.context = torch.randn(n, 3, 6, 6, generator=g)
        self.target = torch.randint(0, 3, (n,), generator=g)
        self.bad = bad

    def __len__(self):
        return len(self.target)

    def __getitem__(self, i):
        if i in self.bad:
            return None
        return {"subject": self.subject[i], "context": self.context[i], "target": self.target[i], "index": i}


def loader(dataset, batch_size):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping_none)


def make_module():
    return CCIMLightningModule(BatchNormHost(), num_classes=3, attention="none")


def trainer(tmp_path, **kwargs):
    options = dict(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return L.Trainer(**options, **kwargs)


def test_a_batch_whose_samples_all_failed_is_the_empty_batch_not_an_error():
    batch = collate_skipping_none([None, None])
    assert is_empty_batch(batch) and batch["index"].dtype == torch.int64
    assert not is_empty_batch(collate_skipping_none([None, {"index": torch.tensor(3)}]))


def test_one_sample_training_batch_uses_running_statistics_and_leaves_them_unchanged(caplog):
    module = make_module().train()
    norm = module.backbone.norm
    norm.running_mean.fill_(0.5)
    before = (norm.running_mean.clone(), norm.running_var.clone())
    batch = collate_skipping_none([None, SometimesUndecodable(4, set())[1], None])
    assert batch["index"].tolist() == [1]
    seen = []
    norm.register_forward_hook(lambda layer, inputs, output: seen.append((inputs[0].detach(), output.detach())))
    with caplog.at_level(logging.WARNING):
        loss = module.training_step(batch, 0)  # plain BatchNorm would raise "Expected more than 1 value per channel"
    loss.backward()
    assert torch.isfinite(loss) and module.backbone.proj.weight.grad.abs().sum() > 0
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert norm.training  # back in training mode for the next batch
    # by hand: the sample normalised with the running statistics
    ((features, normalised),) = seen
    expected = (features - before[0]) / torch.sqrt(before[1] + norm.eps) * norm.weight.detach() + norm.bias.detach()
    torch.testing.assert_close(normalised, expected)
    assert module.skipped_batches == {"train: a one-sample training batch uses BatchNorm's running statistics": 1}
    assert "one-sample training batch" in caplog.text
    module.training_step(collate_skipping_none([SometimesUndecodable(4, set())[i] for i in (0, 1)]), 1)
    assert not torch.equal(norm.running_mean, before[0])  # two samples: batch statistics, as usual


def test_fit_validate_and_predict_go_on_past_empty_and_one_sample_batches(tmp_path):
    bad = {1, 2, 4, 5}  # batch size 3 in training: [0, -, -], [3, -, -]...; batch size 1 elsewhere: empty batches
    data = SometimesUndecodable(9, bad)
    module = make_module()
    trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0).fit(module, loader(data, 3), loader(data, 1))
    assert module.skipped_batches["train: a one-sample training batch uses BatchNorm's running statistics"] == 2
    assert module.skipped_batches["val: a batch with no sample (all failed to decode) is skipped"] == 4

    scores = trainer(tmp_path).validate(module, loader(data, 1), verbose=False)[0]
    predictions = trainer(tmp_path).predict(module, loader(data, 1))
    index = torch.cat([p["index"] for p in predictions])
    probabilities = torch.cat([p["probabilities"] for p in predictions])
    assert index.tolist() == [0, 3, 6, 7, 8] and probabilities.shape == (5, 3)
    # the validation accuracy is over the decoded samples only (scikit-learn on the predicted rows)
    expected = accuracy_score(data.target[index].numpy(), probabilities.argmax(1).numpy())
    assert scores["val/acc"] == pytest.approx(expected)


def test_an_empty_training_batch_is_skipped_in_one_process():
    module = make_module().train()
    assert module.training_step(collate_skipping_none([None]), 0) is None  # Lightning: no backward, no step
    assert module.skipped_batches == {"train: a training batch with no sample (all failed to decode) is skipped": 1}
    predicted = module.predict_step(collate_skipping_none([None]), 0)
    assert predicted["index"].shape == (0,) and predicted["probabilities"].shape == (0, 3)
    assert np.isfinite(predicted["probabilities"].numpy()).all()
