"""Tests of the procedural context-biased datamodule (``ccim_lightning.datamodules.synthetic``)."""

import numpy as np
import pytest
import torch

from ccim_lightning.datamodules.synthetic import (
    EMOTIONS,
    SceneSettings,
    SyntheticContextDataModule,
    SyntheticContextDataset,
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # written out: an independent reference
SMALL = {"image_size": 32, "subject_size": 16}


@pytest.fixture(scope="module")
def datamodule() -> SyntheticContextDataModule:
    dm = SyntheticContextDataModule(train_size=40, val_size=12, test_size=20, batch_size=8)
    dm.setup("fit")
    return dm


def test_sample_schema(datamodule: SyntheticContextDataModule) -> None:
    sample = datamodule.val_dataset[3]
    assert set(sample) == {"subject", "context", "target", "index", "box", "scene"}
    assert sample["subject"].shape == (3, 32, 32) and sample["subject"].dtype == torch.float32
    assert sample["context"].shape == (3, 64, 64) and sample["context"].dtype == torch.float32
    for key in ("target", "index", "scene"):
        assert sample[key].shape == () and sample[key].dtype == torch.int64
    assert sample["box"].shape == (4,) and sample["box"].dtype == torch.float32
    x1, y1, x2, y2 = sample["box"].tolist()
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
    assert 0 <= sample["target"] < 4 and 0 <= sample["scene"] < 4
    assert datamodule.class_names == list(EMOTIONS[:4]) and datamodule.num_classes == 4
    assert datamodule.task == "multiclass"


def test_normalised_roughly(datamodule: SyntheticContextDataModule) -> None:
    subjects = torch.stack([datamodule.val_dataset[i]["subject"] for i in range(12)])
    assert subjects.mean().abs() < 1.0 and 0.4 < subjects.std() < 2.0
    image, subject, _, _, _ = datamodule.val_dataset.render(0)
    assert image.min() >= 0.0 and image.max() <= 1.0 and subject.shape == (3, 32, 32)
    unmasked = datamodule.dictionary_dataset(mask_subject=False)[0]["context"]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert (unmasked * std + mean).min() > -0.5 and (unmasked * std + mean).max() < 1.5


def test_deterministic_per_seed() -> None:
    a = SyntheticContextDataset("train", 10, SceneSettings(seed=3, **SMALL))
    b = SyntheticContextDataset("train", 10, SceneSettings(seed=3, **SMALL))
    c = SyntheticContextDataset("train", 10, SceneSettings(seed=4, **SMALL))
    for index in (0, 7):
        first, second, other = a[index], b[index], c[index]
        for key in first:
            assert torch.equal(first[key], second[key]), key
        assert not torch.equal(first["context"], other["context"])
    # order of access does not matter, and splits differ
    assert torch.equal(
        a[2]["subject"], SyntheticContextDataset("train", 10, SceneSettings(seed=3, **SMALL))[2]["subject"]
    )
    assert not torch.equal(
        a[2]["context"], SyntheticContextDataset("val", 10, SceneSettings(seed=3, **SMALL))[2]["context"]
    )


def test_datamodule_loaders_are_reproducible() -> None:
    def first_val_batch() -> dict[str, torch.Tensor]:
        dm = SyntheticContextDataModule(seed=5, train_size=8, val_size=8, test_size=8, batch_size=4, **SMALL)
        dm.setup("validate")
        return next(iter(dm.val_dataloader()))

    one, two = first_val_batch(), first_val_batch()
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_subject_box_masked(datamodule: SyntheticContextDataModule) -> None:
    masked, unmasked = datamodule.dictionary_dataset(), datamodule.dictionary_dataset(mask_subject=False)
    for index in range(5):
        sample, plain = masked[index], unmasked[index]
        x1, y1, x2, y2 = sample["box"].long().tolist()
        assert torch.all(sample["context"][:, y1:y2, x1:x2] == 0)
        assert (plain["context"][:, y1:y2, x1:x2] != 0).float().mean() > 0.99
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[y1:y2, x1:x2] = False
        assert torch.equal(sample["context"][:, outside], plain["context"][:, outside])
        assert torch.equal(sample["subject"], plain["subject"])


def test_flip_keeps_subject_context_and_box_consistent() -> None:
    plain = SyntheticContextDataset("train", 4, SceneSettings(**SMALL))
    flipping = SyntheticContextDataset("train", 4, SceneSettings(**SMALL), flip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        reference, sample = plain[1], flipping[1]
        flipped = not torch.equal(sample["context"], reference["context"])
        seen.add(flipped)
        if flipped:
            assert torch.equal(sample["context"], reference["context"].flip(-1))
            assert torch.equal(sample["subject"], reference["subject"].flip(-1))
            x1, y1, x2, y2 = reference["box"].tolist()
            assert sample["box"].tolist() == [32 - x2, y1, 32 - x1, y2]
            x1, y1, x2, y2 = sample["box"].long().tolist()
            assert torch.all(sample["context"][:, y1:y2, x1:x2] == 0)
        else:
            assert torch.equal(sample["subject"], reference["subject"])
        assert sample["target"] == reference["target"]
    assert seen == {True, False}


def test_labels_match_rendered_samples() -> None:
    dataset = SyntheticContextDataset("val", 30, SceneSettings(bias=0.5, **SMALL))
    targets, scenes = dataset.labels()
    samples = dataset.__getitems__(list(range(30)))
    assert [int(s["target"]) for s in samples] == targets.tolist()
    assert [int(s["scene"]) for s in samples] == scenes.tolist()
    assert dataset.labels([3, 7])[0].tolist() == targets[[3, 7]].tolist()
    table = dataset.sample_table()
    assert table["index"].tolist() == list(range(30)) and table["scene"].tolist() == scenes.tolist()


def test_batched_and_single_access_agree() -> None:
    dataset = SyntheticContextDataset("test", 12, SceneSettings(**SMALL))
    batch = dataset.__getitems__([5, 0, 11])
    for index, sample in zip([5, 0, 11], batch):
        single = dataset[index]
        for key in single:
            assert torch.allclose(single[key], sample[key], atol=1e-5), key
        assert sample["index"] == index


@pytest.mark.parametrize("num_classes, num_scenes", [(4, 4), (3, 6)])
def test_bias_semantics(num_classes: int, num_scenes: int) -> None:
    n = 4000
    settings = {"num_classes": num_classes, "num_scenes": num_scenes}
    targets, scenes = SyntheticContextDataset("train", n, SceneSettings(bias=1.0, **settings)).labels()
    assert np.all(targets == scenes % num_classes)
    assert np.bincount(scenes, minlength=num_scenes).min() > n / num_scenes * 0.8

    # bias 0, and the unbiased test split whatever the bias: P(dominant) = 1 / C and scene, emotion independent
    for split, bias in (("train", 0.0), ("test_unbiased", 0.9)):
        targets, scenes = SyntheticContextDataset(split, n, SceneSettings(bias=bias, **settings)).labels()
        assert abs(np.mean(targets == scenes % num_classes) - 1 / num_classes) < 0.03
        joint = np.histogram2d(scenes, targets, bins=(num_scenes, num_classes))[0] / n
        independent = np.outer(np.bincount(scenes) / n, np.bincount(targets) / n)
        assert np.abs(joint - independent).max() < 0.02

    # the biased splits: P(dominant) = bias + (1 - bias) / C
    for split in ("train", "val", "test"):
        targets, scenes = SyntheticContextDataset(split, n, SceneSettings(bias=0.9, **settings)).labels()
        assert abs(np.mean(targets == scenes % num_classes) - (0.9 + 0.1 / num_classes)) < 0.02


def test_bias_only_changes_labels_and_faces() -> None:
    biased = SyntheticContextDataset("train", 8, SceneSettings(bias=1.0, **SMALL))
    unbiased = SyntheticContextDataset("train", 8, SceneSettings(bias=0.0, **SMALL))
    for index in range(8):
        one, two = biased[index], unbiased[index]
        assert one["scene"] == two["scene"] and torch.equal(one["box"], two["box"])
        assert torch.equal(one["context"], two["context"])  # the target's face is masked
        assert torch.equal(one["subject"], two["subject"]) == bool(one["target"] == two["target"])


def test_test_loaders_order_and_predict(datamodule: SyntheticContextDataModule) -> None:
    datamodule.setup("test")
    assert datamodule.test_set_names == ("biased", "unbiased")
    loaders = datamodule.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    assert loaders[0].dataset is datamodule.test_dataset and datamodule.test_dataset.split == "test"
    assert loaders[1].dataset is datamodule.test_unbiased_dataset
    assert (
        datamodule.test_unbiased_dataset.split == "test_unbiased"
        and datamodule.test_unbiased_dataset.settings.bias == 0
    )
    assert datamodule.predict_dataloader().dataset.split == "test_unbiased"


def test_index_field_and_loaders(datamodule: SyntheticContextDataModule) -> None:
    batches = list(datamodule.dictionary_dataloader(batch_size=16))
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(40))
    assert batches[0]["context"].shape == (16, 3, 64, 64)
    assert not datamodule.dictionary_dataset().flip and datamodule.train_dataset.flip
    train = list(datamodule.train_dataloader())
    indices = torch.cat([b["index"] for b in train])
    assert sorted(indices.tolist()) == list(range(40))  # shuffled, nothing dropped
    for index in (0, 11):
        assert datamodule.val_dataset[index]["index"] == index
    with pytest.raises(IndexError):
        datamodule.val_dataset[12]


@pytest.mark.parametrize("bias", [-0.1, 1.5, float("nan")])
def test_invalid_bias(bias: float) -> None:
    with pytest.raises(ValueError, match="bias"):
        SyntheticContextDataModule(bias=bias)


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticContextDataModule(num_classes=len(EMOTIONS) + 1)
    with pytest.raises(ValueError, match="split"):
        SyntheticContextDataset("holdout", 3)
    with pytest.raises(RuntimeError, match="setup"):
        SyntheticContextDataModule().train_dataloader()


def test_scene_settings_identity_and_checks() -> None:
    # The identity is written out: caches and committed benchmark records are keyed by this exact text.
    expected = "synthetic-v2(seed=3,bias=1.0,classes=4,scenes=4,size=64/32,noise=0.4/0.06,distractors=2)"
    assert SceneSettings(seed=3, bias=1).identity() == expected
    dataset = SyntheticContextDataset("train", 2, SceneSettings(seed=3, bias=1))
    assert dataset.sample_identities() == [f"{expected}:train:0", f"{expected}:train:1"]
    unbiased = SyntheticContextDataset("test_unbiased", 1, SceneSettings(seed=3, bias=1))
    assert unbiased.settings.bias == 0.0 and "bias=0.0" in unbiased.sample_identities()[0]
    dm = SyntheticContextDataModule(seed=3, num_scenes=6, image_size=32, subject_size=16, train_size=4)
    assert dm.settings == SceneSettings(seed=3, num_scenes=6, image_size=32, subject_size=16)
    dm.setup("fit")
    assert dm.train_dataset.settings is dm.settings and dm.dictionary_signature()["context_size"] == [32, 32]
    with pytest.raises(TypeError, match="SceneSettings, got int 3"):
        SyntheticContextDataset("train", 10, 3)
    for bad, field in ((dict(seed=-1), "seed"), (dict(image_size=8), "image_size"), (dict(pixel_noise=-1), "noise")):
        with pytest.raises(ValueError, match=field):
            SceneSettings(**bad)
        with pytest.raises(ValueError, match=field):
            SyntheticContextDataModule(**bad)
