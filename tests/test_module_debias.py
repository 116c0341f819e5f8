"""CCIMLightningModule with a debiasing method: wiring from YAML/CLI and Python, clusters, checkpoints."""

from pathlib import Path

import lightning as L
import pytest
import torch

from ccim_lightning import CCIMLightningModule
from ccim_lightning.commands.cli import build_cli
from ccim_lightning.debias import CLEF, ClusterReweighting, GroupDRO, ProductOfExperts
from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryKey
from ccim_lightning.hosts import TwoStreamHost

SYNTHETIC = str(Path(__file__).parents[1] / "configs" / "synthetic.yaml")
TINY = [
    "--data.init_args.train_size=96",
    "--data.init_args.val_size=32",
    "--data.init_args.test_size=32",
    "--data.init_args.image_size=32",
    "--data.init_args.subject_size=16",
    "--data.init_args.num_workers=0",
    "--model.init_args.num_prototypes=4",
    "--dictionary.num_iterations=5",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
]


def dictionary_with(assignments, targets, num_prototypes=4, dim=8):
    return ConfounderDictionary.from_clustering(
        torch.randn(num_prototypes, dim),
        torch.bincount(assignments[assignments >= 0], minlength=num_prototypes).clamp(min=1),
        DictionaryKey("x", "y", num_prototypes, True, 0, "features", 25, None, "none", "f"),
        assignments=assignments,
        targets=targets,
    )


def python_model(debias, attention="none"):
    return CCIMLightningModule(
        TwoStreamHost(feature_dim=16), num_classes=3, num_prototypes=4, confounder_dim=8, attention=attention,
        debias=debias,
    )  # fmt: skip


def test_set_dictionary_hands_clusters_and_targets_to_the_method():
    model = python_model(ClusterReweighting(smoothing=0.0, max_weight=None))
    assert model.needs_dictionary and not model.has_dictionary
    assignments = torch.tensor([0, 0, 0, 1, 1, -1])  # the last sample was skipped during the build
    targets = torch.tensor([0, 0, 1, 1, 2, 0])
    model.set_dictionary(dictionary_with(assignments, targets))
    assert model.has_dictionary and torch.equal(model.train_clusters, assignments)
    # w = P(y) / P(y | z) over the five clustered samples, by hand: P(y) = (2/5, 2/5, 1/5).
    # cluster 0: P(y|z) = (2/3, 1/3, 0) -> w(0,0) = (2/5)/(2/3) = 0.6, w(0,1) = (2/5)/(1/3) = 1.2
    # cluster 1: P(y|z) = (0, 1/2, 1/2) -> w(1,1) = 0.8, w(1,2) = 0.4; normalised to mean 1 over the five samples.
    raw = torch.tensor([0.6, 0.6, 1.2, 0.8, 0.4])
    expected = raw / raw.mean()
    weights = model.debias.weights[assignments[:5], targets[:5]]
    torch.testing.assert_close(weights, expected)


def test_batch_clusters_follow_the_sample_index_and_unknown_samples_are_errors():
    model = python_model(ProductOfExperts())
    model.set_dictionary(dictionary_with(torch.tensor([2, 0, 1, -1]), torch.tensor([0, 1, 2, 0])))
    assert model._batch_clusters({"index": torch.tensor([2, 0])}).tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"\[3\] have no dictionary cluster"):
        model._batch_clusters({"index": torch.tensor([3])})
    with pytest.raises(IndexError, match="beyond the 4 training samples"):
        model._batch_clusters({"index": torch.tensor([9])})


def test_random_dictionary_cannot_feed_a_cluster_method():
    model = python_model(GroupDRO(), attention="dot_product")
    with pytest.raises(ValueError, match="random-Z ablation has no clusters"):
        model.set_dictionary(ConfounderDictionary.random(4, 8, seed=0))


def test_loss_without_reduction_is_refused_with_a_method():
    def plain_loss(logits, target):
        return logits.sum()

    with pytest.raises(ValueError, match="no `reduction` attribute"):
        CCIMLightningModule(TwoStreamHost(feature_dim=16), num_classes=3, loss=plain_loss, debias=ClusterReweighting())


# make test keeps a cluster method and CLEF; GroupDRO's and PoE's checkpoint state has its twin in tests/debias/
# (test_state_dict_round_trip_restores_the_statistics), the CLI wiring is the same class_path for every method.
@pytest.mark.parametrize(
    "method",
    ["ClusterReweighting", pytest.param("GroupDRO", marks=pytest.mark.slow),
     pytest.param("ProductOfExperts", marks=pytest.mark.slow), "CLEF"],
)  # fmt: skip
def test_every_method_trains_from_the_cli_and_restores_for_test(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    debias = [f"--model.init_args.debias=ccim_lightning.debias.{method}"]
    fitted = build_cli(["fit", "--config", SYNTHETIC, *TINY, *debias, "--model.init_args.attention=none"])
    model = fitted.model
    assert type(model.debias).__name__ == method
    if model.debias.needs_clusters:  # the dictionary is built for the method even with the baseline head
        assert model.train_clusters.shape == (96,) and model.train_clusters.min() >= 0
    tested = build_cli(["test", "--config", SYNTHETIC, *TINY, *debias, "--model.init_args.attention=none",
                        "--ckpt_path", "last"])  # fmt: skip
    for name, tensor in model.debias.state_dict().items():  # everything the method learned or counted came back
        torch.testing.assert_close(tested.model.debias.state_dict()[name], tensor, msg=name)
    assert torch.equal(tested.model.train_clusters, model.train_clusters)
    assert 0.0 <= float(tested.trainer.callback_metrics["test_unbiased/acc"]) <= 1.0


def test_clef_predicts_from_the_total_indirect_effect():
    torch.manual_seed(0)
    model = python_model(CLEF())
    model.eval()
    batch = {"subject": torch.randn(2, 3, 16, 16), "context": torch.randn(2, 3, 32, 32), "index": torch.arange(2)}
    with torch.no_grad():
        host_logits, _ = model._outputs(batch)
        tie = model.debias.inference_logits(host_logits, batch)
        out = model.predict_step(batch, 0)
    torch.testing.assert_close(out["probabilities"], tie.softmax(-1))
    assert not torch.allclose(tie, host_logits)


def test_debias_combines_with_the_ccim_head(tmp_path):
    from ccim_lightning.callbacks import ConfounderDictionaryCallback
    from ccim_lightning.datamodules import SyntheticContextDataModule
    from ccim_lightning.dictionary.recipe import DictionaryRecipe

    data = SyntheticContextDataModule(seed=1, train_size=64, val_size=16, test_size=16, batch_size=32, image_size=32,
                                      subject_size=16)  # fmt: skip
    model = CCIMLightningModule(TwoStreamHost(feature_dim=16), num_classes=4, num_prototypes=4, confounder_dim=256,
                                debias=ClusterReweighting())  # fmt: skip
    callback = ConfounderDictionaryCallback(DictionaryRecipe(extractor="test_efficientnet", progress=False))
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert model.head.is_dictionary_filled and model.train_clusters.shape == (64,)
    assert "train/debias/mean_weight" in trainer.callback_metrics or any(
        k.startswith("train/debias/") for k in trainer.callback_metrics
    )
