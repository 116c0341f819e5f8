"""The synthetic generator's tasks shaped like CAER-S and EMOTIC, and its continuous scenes (``synthetic_labels``)."""

import numpy as np
import pytest
import torch

from ccim_lightning.datamodules.synthetic import SceneSettings, SyntheticContextDataModule, SyntheticContextDataset
from ccim_lightning.datamodules.synthetic_labels import base_frequencies

N = 20000
EMOTIC_LIKE = {"task": "multilabel", "num_classes": 26, "num_scenes": 16}


def multilabel(split: str = "train", n: int = N, **settings) -> tuple[np.ndarray, np.ndarray]:
    return SyntheticContextDataset(split, n, SceneSettings(**{**EMOTIC_LIKE, **settings})).labels()


def test_old_task_identity_is_unchanged_and_new_tasks_are_named() -> None:
    # Written out: dictionary caches and committed benchmark records are keyed by this exact text.
    old = "synthetic-v2(seed=0,bias=0.9,classes=4,scenes=4,size=64/32,noise=0.4/0.06,distractors=2)"
    assert SceneSettings().identity() == old
    assert SceneSettings(task="multiclass", scene_layout="discrete").identity() == old
    assert (
        SceneSettings(**EMOTIC_LIKE).identity()
        == old.replace("classes=4,scenes=4", "classes=26,scenes=16")[:-1] + ",task=multilabel)"
    )
    assert SceneSettings(scene_layout="continuous").identity() == old[:-1] + ",layout=continuous)"


def test_invalid_task_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        SceneSettings(task="regression")
    with pytest.raises(ValueError, match="scene_layout must be one of"):
        SyntheticContextDataModule(scene_layout="smooth")
    with pytest.raises(ValueError, match="between 2 and 26 for task='multilabel', got 27"):
        SceneSettings(task="multilabel", num_classes=27)
    with pytest.raises(ValueError, match="between 2 and 7 for task='multiclass', got 8"):
        SceneSettings(num_classes=8)
    with pytest.raises(ValueError, match="for task=.multiclass. only"):
        SceneSettings(task="multilabel", scene_layout="continuous")


def test_multilabel_label_counts_long_tail_and_co_occurrence() -> None:
    targets, _ = multilabel()
    assert targets.shape == (N, 26) and targets.dtype == np.float32
    assert set(np.unique(targets)) == {0.0, 1.0}
    counts = targets.sum(1)
    assert counts.min() == 1 and counts.max() == 4
    # drawn: 1-4 labels with P = .45/.3/.15/.1; a repeated draw is kept once, so a few have fewer labels than drawn
    assert 0.45 <= np.mean(counts == 1) <= 0.55 and np.mean(counts >= 3) > 0.1
    # long tail: category 0 the most frequent, the rarest at least 10x rarer, and every category seen
    frequency = targets.mean(0)
    assert frequency.argmax() == 0 and frequency.max() / frequency.min() > 10 and frequency.min() > 0.005
    assert np.corrcoef(np.arange(26), frequency)[0, 1] < -0.7
    # co-occurrence: categories of one group (0-2, 3-5, ...) go together far more often than chance
    together = (targets.T @ targets) / N
    lift = together / np.outer(frequency, frequency)
    same_group = [lift[a, b] for a in range(24) for b in range(a + 1, 26) if a // 3 == b // 3]
    other_group = [lift[a, b] for a in range(24) for b in range(a + 1, 26) if a // 3 != b // 3]
    assert np.median(same_group) > 3 and np.median(other_group) < 1.2


def test_base_frequencies_are_the_written_long_tail() -> None:
    expected = np.array([1 / (c + 1) for c in range(5)])
    assert np.allclose(base_frequencies(5), expected / expected.sum())


def test_multilabel_bias_ties_the_scene_to_the_primary_category_only() -> None:
    # Measured on a sample: P(scene belongs to a present label) and the scene-dependent label prior.
    for bias, split in ((0.9, "train"), (0.9, "test"), (0.0, "train"), (0.9, "test_unbiased")):
        targets, scenes = multilabel(split, bias=bias)
        dominant = scenes % 26  # with 16 scenes, categories 0-15 own one scene each
        present = targets[np.arange(N), dominant] == 1
        prior = targets[:, :16].mean(0)
        conditional = np.array([targets[scenes == s, s].mean() for s in range(16)])
        effective = 0.0 if split == "test_unbiased" else bias
        if effective == 0.0:  # scene independent of the labels: P(y_s | s) = P(y_s)
            assert abs(present.mean() - prior.mean()) < 0.02
            assert np.abs(conditional - prior).max() < 0.05
        else:  # the dominant category is present far more often in its scene
            assert present.mean() > 0.7 and np.all(conditional > prior + 0.2)
    # the label distribution is the same at every bias (bias acts on the scene given the labels)
    assert np.array_equal(multilabel(bias=0.9)[0], multilabel(bias=0.0)[0])


def test_multilabel_samples_carry_multi_hot_targets_and_a_visible_code() -> None:
    settings = SceneSettings(task="multilabel", num_classes=12, image_size=32, subject_size=16, seed=1)
    dataset = SyntheticContextDataset("train", 6, settings)
    targets, scenes = dataset.labels()
    for index, sample in enumerate(dataset.__getitems__(list(range(6)))):
        assert sample["target"].dtype == torch.float32 and sample["target"].shape == (12,)
        assert np.array_equal(sample["target"].numpy(), targets[index]) and sample["scene"] == scenes[index]
    # The labels are in the pixels: two label sets on the same person and scene render different subjects.
    image, subject, box, target, _ = dataset.render(0)
    assert target.shape == (12,) and subject.shape == (3, 16, 16)
    dm = SyntheticContextDataModule(task="multilabel", num_classes=12, train_size=8, val_size=4, test_size=4)
    assert dm.task == "multilabel" and dm.class_names[:2] == ["affection", "anger"] and len(dm.class_names) == 12
    dm.setup()
    batch = next(iter(dm.test_dataloader()[1]))
    assert batch["target"].shape == (4, 12)


def test_label_code_changes_only_the_subject_box() -> None:
    from ccim_lightning.datamodules.synthetic_labels import paint_label_code

    canvas = np.full((1, 3, 20, 20), 0.5, np.float32)
    grid = (np.arange(20, dtype=np.float32) + 0.5)[None]
    boxes = np.array([[4, 2, 14, 18]])
    code = np.zeros((1, 12), np.float32)
    code[0, 0] = 1.0
    paint_label_code(canvas, grid, grid, boxes, code, 12)
    changed = np.argwhere(canvas[0, 0] != 0.5)
    assert len(changed) > 0
    # inside the lower body of the box, in the first cell: x in [4 + 0.1 * 10, 4 + 0.1 * 10 + 0.8 * 10 / 6)
    assert changed[:, 1].min() >= 5 and changed[:, 1].max() <= 6 and changed[:, 0].min() >= 10
    assert np.allclose(canvas[0, :, changed[0, 0], changed[0, 1]], 0.5 + 0.8 * 0.5)  # blended 80% to white


def test_caers_like_has_several_scenes_per_emotion() -> None:
    settings = SceneSettings(num_classes=7, num_scenes=16, bias=0.9)
    targets, scenes = SyntheticContextDataset("train", N, settings).labels()
    assert set(np.unique(targets)) == set(range(7)) and set(np.unique(scenes)) == set(range(16))
    owners = {e: [s for s in range(16) if s % 7 == e] for e in range(7)}
    assert all(2 <= len(owned) <= 3 for owned in owners.values())
    assert abs(np.mean(targets == scenes % 7) - (0.9 + 0.1 / 7)) < 0.01


def test_continuous_scenes_blend_styles_and_follow_the_nearest_scene_type() -> None:
    settings = SceneSettings(scene_layout="continuous", num_scenes=8, bias=1.0, image_size=32, subject_size=16)
    dataset = SyntheticContextDataset("train", N, settings)
    targets, scenes = dataset.labels()
    assert np.all(targets == scenes % 4) and set(np.unique(scenes)) == set(range(8))
    positions = np.array([dataset._draws(i)[0][0] * 8 for i in range(200)])  # the scene uniform, times num_scenes
    assert np.array_equal(scenes[:200], np.floor(positions + 0.5).astype(int) % 8)
    assert np.mean(np.abs(positions - np.round(positions)) > 0.05) > 0.8  # almost never exactly a scene type
    # the unbiased split: scene and emotion independent
    targets, scenes = SyntheticContextDataset("test_unbiased", N, settings).labels()
    assert abs(np.mean(targets == scenes % 4) - 0.25) < 0.02
    # A continuous scene at an integer position renders as the discrete scene type (same draws otherwise).
    discrete = SyntheticContextDataset(
        "train", 40, SceneSettings(num_scenes=8, bias=1.0, image_size=32, subject_size=16)
    )
    blended = SyntheticContextDataset("train", 40, settings)
    one, two = discrete.render(0), blended.render(0)
    assert one[2] == two[2]  # same person box
    assert not np.array_equal(one[0], two[0])  # but a blended background
