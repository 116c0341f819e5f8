"""LastLayerRetraining: the refit's rule against scikit-learn, and that it helps the minority group of planted data."""

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ccim_lightning import CCIMLightningModule
from ccim_lightning.callbacks import ConfounderDictionaryCallback, LastLayerRetraining
from ccim_lightning.callbacks.last_layer import CHECKPOINT_KEY, refit_linear
from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryKey


def test_refit_matches_weighted_l2_logistic_regression_of_scikit_learn():
    # sum_i w_i CE_i + lambda / 2 ||W||^2 with sum w = 1 is scikit-learn's C sum_i s_i CE_i + 1/2 ||W||^2 with
    # s = w and C = 1 / lambda (the intercept unpenalised in both).
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=generator)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=generator) > 0).long() + (x[:, 1] > 1).long()
    w = torch.rand(60, generator=generator) + 0.1
    w = w / w.sum()
    weight, bias = refit_linear(x, y, w, torch.zeros(3, 3), torch.zeros(3), 0.05, 500)
    x64, w64 = x.double().numpy(), w.double().numpy()
    reference = LogisticRegression(C=1 / 0.05, tol=1e-12, max_iter=10_000).fit(x64, y.numpy(), sample_weight=w64)
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=2e-4)
    # The intercepts are defined up to a common shift (the softmax ignores it): compare the probabilities.
    ours = torch.softmax(x.double() @ weight.T + bias, dim=1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(x64), atol=1e-5)


# --- planted spurious feature ------------------------------------------------------------------------------------
class PlantedDataset(Dataset):
    """x = (core, spurious): core = (2y - 1) + N(0, 1) is weakly predictive; spurious = (2a - 1) + N(0, 0.1) is an
    almost noiseless attribute a that equals y with probability ``agreement``."""

    def __init__(self, size, agreement, seed):
        generator = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (size,), generator=generator)
        flip = torch.rand(size, generator=generator) > agreement
        self.a = torch.where(flip, 1 - self.y, self.y)
        core = (2 * self.y - 1).float() + torch.randn(size, generator=generator)
        spurious = (2 * self.a - 1).float() + 0.1 * torch.randn(size, generator=generator)
        self.x = torch.stack([core, spurious], dim=1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "target": self.y[i], "index": torch.tensor(i)}


class PlantedData(L.LightningDataModule):
    num_classes, task, class_names, batch_size, num_workers = 2, "multiclass", ["0", "1"], 64, 0

    def __init__(self):
        super().__init__()
        self.train = PlantedDataset(800, 0.95, seed=0)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def dictionary_dataset(self, mask_subject=True):
        return self.train


class LinearHost(nn.Module):
    feature_dim = 2

    def forward(self, batch):
        return batch["x"]


def planted_dictionary(data):
    # The dictionary's clusters are the attribute a (what a scene k-means finds): two prototypes.
    key = DictionaryKey("x", "y", 2, True, 0, "features", 25, None, "none", "f")
    prototypes = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    counts = torch.bincount(data.train.a, minlength=2)
    return ConfounderDictionary.from_clustering(prototypes, counts, key, assignments=data.train.a,
                                                targets=data.train.y)  # fmt: skip


def minority_accuracy(model, dataset):
    with torch.no_grad():
        model.eval()
        predicted = model({"x": dataset.x}).argmax(dim=1)
    minority = dataset.a != dataset.y
    return float((predicted[minority] == dataset.y[minority]).float().mean())


@pytest.mark.parametrize("groups", ["coarse", "prototypes"])
def test_refit_beats_the_trained_layer_on_the_minority_group(groups, tmp_path):
    torch.manual_seed(0)
    data = PlantedData()
    builder = ConfounderDictionaryCallback()
    builder.last_dictionary = planted_dictionary(data)  # what the builder would have made; the model needs none
    model = CCIMLightningModule(LinearHost(), num_classes=2, num_prototypes=2, confounder_dim=2, attention="none",
                                hidden_dim=8, dropout=0.0)  # fmt: skip
    refit = LastLayerRetraining(groups=groups, weight_decay=1e-3)
    trainer = L.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[builder])  # fmt: skip
    trainer.fit(model, datamodule=data)
    test = PlantedDataset(2000, 0.5, seed=1)  # balanced: half of it is the minority group
    before = minority_accuracy(model, test)
    trained_fc = model.head.fc.weight.detach().clone()

    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[builder, refit])  # fmt: skip
    trainer.fit(model, datamodule=data)  # no epoch: on_fit_end refits the layer of the trained model
    after = minority_accuracy(model, test)
    assert before < 0.5 and after > before + 0.2, (before, after)
    assert refit.record["filled_groups"] == 4 and refit.record["samples"] == 800
    assert not torch.equal(model.head.fc.weight, trained_fc)

    # The checkpoint saved after the refit carries the refit layer and the record.
    checkpoint = torch.load(tmp_path / "last_layer_refit.ckpt", weights_only=False)
    torch.testing.assert_close(checkpoint["state_dict"]["head.fc.weight"], model.head.fc.weight)
    assert checkpoint[CHECKPOINT_KEY]["groups"] == groups
    restored = CCIMLightningModule.load_from_checkpoint(tmp_path / "last_layer_refit.ckpt", backbone=LinearHost())
    assert minority_accuracy(restored, test) == pytest.approx(after)


def test_refit_needs_the_dictionary_callback(tmp_path):
    data = PlantedData()
    model = CCIMLightningModule(LinearHost(), num_classes=2, num_prototypes=2, confounder_dim=2, attention="none")
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=[LastLayerRetraining()])  # fmt: skip
    with pytest.raises(RuntimeError, match="add ConfounderDictionaryCallback"):
        trainer.fit(model, datamodule=data)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="'prototypes', 'coarse' or 'aligned'"):
        LastLayerRetraining(groups="scenes")
    with pytest.raises(ValueError, match="weight_decay"):
        LastLayerRetraining(weight_decay=-1)
