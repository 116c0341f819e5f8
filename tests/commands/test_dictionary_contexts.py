"""Tests for ccim_lightning.commands.dictionary_contexts: the nearest-prototype assignment and the dictionary-file
check."""

import numpy as np
import pytest

from ccim_lightning.commands.dictionary_contexts import check_dictionary_file, nearest_prototype


def test_nearest_prototype():
    prototypes = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = np.array([[1.0, 1.0], [9.0, -1.0], [-1.0, 12.0], [6.0, 0.0]])
    assert nearest_prototype(features, prototypes, chunk_size=3).tolist() == [0, 1, 2, 1]


def test_check_dictionary_file_refuses_random_z_and_accepts_clustered(tmp_path):
    import torch

    from ccim_lightning.dictionary.features import ContextFeatures
    from ccim_lightning.dictionary.recipe import DictionaryRecipe, build_from_features
    from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryKey

    random = ConfounderDictionary.random(4, 8, seed=0).save(tmp_path / "random.pt")
    with pytest.raises(ValueError, match=r"random\.pt.*random-Z"):
        check_dictionary_file(random)
    features = ContextFeatures(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), torch.arange(40))
    key = DictionaryKey("x", "none", 4, True, 0, "features", 25, None, "t", "f")
    clustered = build_from_features(DictionaryRecipe(seed=0), features, key).save(tmp_path / "clustered.pt")
    assert check_dictionary_file(clustered).prototypes.shape == (4, 8)
