import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ccim_lightning import CCIMLightningModule


class MeanPoolHost(nn.Module):
    """A tiny host: pooled subject and context colours through a linear layer."""

    def __init__(self, feature_dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(6, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, batch):
        pooled = torch.cat([batch["subject"].mean(dim=(2, 3)), batch["context"].mean(dim=(2, 3))], dim=1)
        return self.proj(pooled)


class RandomBatches(Dataset):
    def __init__(self, n: int, num_classes: int, multilabel: bool, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.subject = torch.randn(n, 3, 8, 8, generator=g)
        self.context = torch.randn(n, 3, 12, 12, generator=g)
        if multilabel:
            self.target = (torch.rand(n, num_classes, generator=g) < 0.4).float()
            self.target[0] = 1.0  # every class has a positive
        else:
            self.target = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self):
        return len(self.target)

    def __getitem__(self, i):
        return {"subject": self.subject[i], "context": self.context[i], "target": self.target[i], "index": i}


def make_module(task="multiclass", num_classes=3, attention="dot_product", **kwargs):
    module = CCIMLightningModule(
        MeanPoolHost(),
        num_classes=num_classes,
        task=task,
        num_prototypes=5,
        confounder_dim=7,
        attention=attention,
        **kwargs,
    )
    if attention != "none":
        g = torch.Generator().manual_seed(1)
        module.head.set_dictionary(torch.randn(5, 7, generator=g), torch.full((5,), 0.2))
    return module


def test_feature_dim_is_read_from_the_backbone_or_must_be_given():
    assert make_module().head.w_h.shape[0] == 16
    with pytest.raises(ValueError, match="feature_dim"):
        CCIMLightningModule(nn.Identity(), num_classes=3)
    module = CCIMLightningModule(nn.Identity(), num_classes=3, feature_dim=4, attention="none")
    assert module.head.w_h.shape[0] == 4


def test_invalid_task_and_class_names_are_rejected():
    with pytest.raises(ValueError, match="task"):
        make_module(task="regression")
    with pytest.raises(ValueError, match="class_names"):
        make_module(class_names=["a", "b"])


def test_default_losses_match_torch_functional():
    batch = next(iter(DataLoader(RandomBatches(8, 3, multilabel=False), batch_size=8)))
    module = make_module().eval()
    logits = module(batch)
    assert torch.allclose(module.compute_loss(logits, batch), nn.functional.cross_entropy(logits, batch["target"]))
    batch = next(iter(DataLoader(RandomBatches(8, 4, multilabel=True), batch_size=8)))
    module = make_module(task="multilabel", num_classes=4).eval()
    logits = module(batch)
    expected = nn.functional.binary_cross_entropy_with_logits(logits, batch["target"])
    assert torch.allclose(module.compute_loss(logits, batch), expected)


def test_custom_loss_replaces_the_default():
    batch = next(iter(DataLoader(RandomBatches(8, 3, multilabel=False), batch_size=8)))
    module = make_module(loss=nn.CrossEntropyLoss(label_smoothing=0.3)).eval()
    logits = module(batch)
    expected = nn.functional.cross_entropy(logits, batch["target"], label_smoothing=0.3)
    assert torch.allclose(module.compute_loss(logits, batch), expected)


def test_predict_step_returns_probabilities_with_the_sample_index():
    batch = next(iter(DataLoader(RandomBatches(6, 3, multilabel=False), batch_size=6)))
    out = make_module().eval().predict_step(batch, 0)
    assert torch.equal(out["index"], batch["index"])
    assert torch.allclose(out["probabilities"].sum(dim=1), torch.ones(6))
    batch = next(iter(DataLoader(RandomBatches(6, 4, multilabel=True), batch_size=6)))
    out = make_module(task="multilabel", num_classes=4).eval().predict_step(batch, 0)
    assert out["probabilities"].shape == (6, 4)
    assert ((out["probabilities"] > 0) & (out["probabilities"] < 1)).all()


def _trainer(tmp_path, **kwargs):
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_validation_metrics_match_scikit_learn_multiclass(tmp_path):
    data = RandomBatches(40, 3, multilabel=False)
    module = make_module().eval()
    results = _trainer(tmp_path).validate(module, DataLoader(data, batch_size=16))[0]
    with torch.no_grad():
        predictions = module(data[:40]).argmax(dim=1).numpy()
    target = data.target.numpy()
    assert results["val/acc"] == pytest.approx(accuracy_score(target, predictions), abs=1e-6)
    per_class = [np.mean(predictions[target == c] == c) for c in range(3)]
    assert results["val/macro_acc"] == pytest.approx(np.mean(per_class), abs=1e-6)


def test_validation_map_and_per_class_ap_match_scikit_learn(tmp_path):
    data = RandomBatches(50, 4, multilabel=True)
    module = make_module(task="multilabel", num_classes=4, class_names=["a", "b", "c", "d"]).eval()
    results = _trainer(tmp_path).validate(module, DataLoader(data, batch_size=16))[0]
    with torch.no_grad():
        scores = module(data[:50]).numpy()
    target = data.target.numpy()
    expected = average_precision_score(target, scores, average=None)
    assert results["val/mAP"] == pytest.approx(expected.mean(), abs=1e-5)
    for name, value in zip("abcd", expected):
        assert results[f"val/AP/{name}"] == pytest.approx(value, abs=1e-5)


def test_map_counts_a_class_without_positives_as_zero(tmp_path):
    # Class "d" has no positive sample in the evaluated set: its AP is undefined and counts as 0 in the mean over
    # all four classes (what the module's docstring and the docs say), not left out.
    data = RandomBatches(50, 4, multilabel=True)
    data.target[:, 3] = 0
    module = make_module(task="multilabel", num_classes=4, class_names=["a", "b", "c", "d"]).eval()
    with pytest.warns(UserWarning, match="No positive samples"):
        results = _trainer(tmp_path).validate(module, DataLoader(data, batch_size=16))[0]
    with torch.no_grad():
        scores = module(data[:50]).numpy()
    target = data.target.numpy()
    first_three = [average_precision_score(target[:, c], scores[:, c]) for c in range(3)]
    assert results["val/AP/d"] == 0.0
    assert results["val/mAP"] == pytest.approx(sum(first_three) / 4, abs=1e-5)


def test_fit_updates_head_and_backbone_but_not_the_dictionary(tmp_path):
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader = DataLoader(RandomBatches(32, 3, multilabel=False), batch_size=8)
    _trainer(tmp_path, max_epochs=1).fit(module, loader)
    after = module.state_dict()
    assert torch.equal(before["head.dictionary"], after["head.dictionary"])
    assert torch.equal(before["head.prior"], after["head.prior"])
    for name in ("backbone.proj.weight", "head.w_h", "head.w_g", "head.causal_intervention.query.weight"):
        assert not torch.equal(before[name], after[name]), name


def test_checkpoint_round_trip_keeps_dictionary_and_hyperparameters(tmp_path):
    module = make_module(attention="additive", residual_scale=0.5)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, DataLoader(RandomBatches(16, 3, multilabel=False), batch_size=8))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = CCIMLightningModule.load_from_checkpoint(path, backbone=MeanPoolHost())
    assert restored.hparams.attention == "additive"
    assert restored.hparams.residual_scale == 0.5
    assert "backbone" not in restored.hparams  # a live module is not pickled into hparams
    assert bool(restored.head.dictionary_filled)
    assert torch.equal(restored.head.dictionary, module.head.dictionary)
    assert torch.equal(restored.head.prior, module.head.prior)
    batch = RandomBatches(4, 3, multilabel=False)[:4]
    with torch.no_grad():
        assert torch.allclose(restored.eval()(batch), module.eval()(batch))


def test_reduce_on_plateau_monitors_validation_loss():
    from functools import partial

    module = make_module(lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=1))
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["monitor"] == "val/loss"


def test_continuous_targets_add_a_regression_output_and_its_loss(tmp_path):
    from ccim_lightning.losses import EmoticContinuousLoss

    class WithVAD(RandomBatches):
        def __getitem__(self, i):
            vad = torch.tensor([float("nan") if i == 0 else 5.0, 3.0 + i % 3, 7.0])
            return {**super().__getitem__(i), "vad": vad}

    data = WithVAD(8, 4, multilabel=True)
    module = make_module(
        task="multilabel", num_classes=4, continuous_loss=EmoticContinuousLoss(), continuous_weight=0.5
    )
    results = _trainer(tmp_path).validate(module, DataLoader(data, batch_size=8))[0]
    batch = next(iter(DataLoader(data, batch_size=8)))
    module.eval()  # as during validation
    with torch.no_grad():
        features = module.head.forward_features(module.backbone(batch))
        logits = module.head.forward_head(features)
        vad = features @ module.continuous_head.weight.T + module.continuous_head.bias
    classification = nn.functional.binary_cross_entropy_with_logits(logits, batch["target"])
    continuous = EmoticContinuousLoss()(vad, batch["vad"])
    assert results["val/vad_loss"] == pytest.approx(float(continuous), rel=1e-4)
    assert results["val/loss"] == pytest.approx(float(classification + 0.5 * continuous), rel=1e-4)
    out = module.predict_step(batch, 0)
    assert torch.allclose(out["vad"], vad, atol=1e-5)


def test_raw_uint8_pixels_are_a_clear_error():
    module = make_module().eval()
    batch = {"context": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "subject": torch.zeros(2, 3, 8, 8)}
    with pytest.raises(TypeError, match="on_after_batch_transfer"):
        module(batch)


def test_head_options_pass_through_with_the_heads_defaults():
    import inspect

    from ccim_lightning.head import HEAD_OPTIONS, ContextualCausalIntervention

    head = inspect.signature(ContextualCausalIntervention).parameters
    module = inspect.signature(CCIMLightningModule).parameters
    for name in HEAD_OPTIONS:
        assert name in head and name in module, name
        if head[name].default is not inspect.Parameter.empty:
            assert module[name].default == head[name].default, name
    # every option really reaches the head (not a default of the head's own)
    given = {"num_prototypes": 7, "confounder_dim": 5, "attention": "additive", "hidden_dim": 12, "attention_dim": 9,
             "dropout": 0.25, "residual_scale": 0.7, "use_prior": False, "uniform_attention": True}  # fmt: skip
    assert set(given) == set(HEAD_OPTIONS)
    model = CCIMLightningModule(nn.Identity(), num_classes=3, feature_dim=4, **given)
    dropouts = {m.p for m in model.head.classifier.modules() if isinstance(m, nn.Dropout)}
    assert dropouts == {0.25}
    for name, value in given.items():
        if name != "dropout":
            assert getattr(model.head, name) == value, name
