"""Every debiasing method with its default arguments on the synthetic demo data (4 emotions, 4 scenes, 32 clusters)."""

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from ccim_lightning.datamodules.synthetic import SceneSettings, SyntheticContextDataset
from ccim_lightning.debias import CLEF, ClusterReweighting, GroupDRO, ProductOfExperts

NUM_CLUSTERS = 32


@pytest.fixture(scope="module")
def demo():
    dataset = SyntheticContextDataset("train", 48, SceneSettings(seed=0))
    batch = default_collate(dataset.__getitems__(list(range(len(dataset)))))
    # Eight clusters per scene, as a k-means dictionary that recovers the scenes would give.
    clusters = batch["scene"] * 8 + batch["index"] % 8
    return dataset, batch, clusters


@pytest.mark.parametrize("make", [ClusterReweighting, GroupDRO, ProductOfExperts, CLEF])
def test_defaults_train_and_infer_on_the_demo_data(make, demo):
    _, batch, clusters = demo
    torch.manual_seed(0)
    method = make()
    method.bind(num_classes=4, task="multiclass", num_clusters=NUM_CLUSTERS)
    method.fit_clusters(clusters, batch["target"])
    logits = torch.randn(16, 4, requires_grad=True)
    part = {key: value[:16] for key, value in batch.items()}
    loss, terms = method.training_loss(
        logits, part, clusters[:16] if method.needs_clusters else None, nn.CrossEntropyLoss(reduction="none")
    )
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(value.dim() == 0 and torch.isfinite(value) for value in terms.values())
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert method.inference_logits(logits.detach(), part).shape == (16, 4)


def test_reweighting_down_weights_each_scene_s_dominant_emotion():
    dataset = SyntheticContextDataset("train", 400, SceneSettings(seed=0))
    targets, scenes = (torch.as_tensor(a) for a in dataset.labels())
    method = ClusterReweighting()
    method.bind(num_classes=4, task="multiclass", num_clusters=4)
    method.fit_clusters(scenes, targets)  # clusters = the true scenes
    for scene in range(4):
        dominant = dataset.dominant_emotion(scene)
        others = [y for y in range(4) if y != dominant]
        assert method.weights[scene, dominant] < 1 < method.weights[scene, others].min()
