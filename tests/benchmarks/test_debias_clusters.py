"""benchmarks/debias/clusters.py: the minority shares and cell counts by hand, the minority flags from the generator."""

import numpy as np

from benchmarks.debias.clusters import cell_counts, isolated_share, minority_flags
from ccim_lightning.datamodules.synthetic import SceneSettings, SyntheticContextDataset


def test_isolated_share_by_hand():
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    minority = np.array([False, False, True, True, True, False, True, False])
    # group 0: 1/3 minority (not mostly), group 1: 2/3 (mostly), group 2: 1/2 (not more than half).
    # Minority samples 2, 3, 4, 6: only 3 and 4 sit in a mostly-minority group -> 2 / 4.
    assert isolated_share(groups, minority) == 0.5
    assert np.isnan(isolated_share(groups, np.zeros(8, dtype=bool)))


def test_cell_counts_by_hand():
    targets = np.array([0, 0, 1, 1, 1, 2])
    scenes = np.array([1, 1, 0, 2, 2, 0])
    minority = np.array([True, True, True, False, True, True])
    # cells (class, scene) with 3 scenes: (0, 1) x2, (1, 0) x1, (1, 2) x1, (2, 0) x1
    assert sorted(cell_counts(targets, scenes, minority, 3).tolist()) == [1, 1, 1, 2]


def test_minority_flags_follow_the_scenes_dominant_emotion():
    dataset = SyntheticContextDataset("train", 400, SceneSettings(num_classes=4, num_scenes=8, seed=0, bias=0.9))
    targets, scenes, minority = minority_flags(dataset)
    dominant = np.array([dataset.dominant_emotion(s) for s in range(8)])
    assert np.array_equal(minority, dominant[scenes] != targets)
    assert 0.02 < minority.mean() < 0.2  # bias 0.9: about 10% of the samples, less those drawn in their own scenes
