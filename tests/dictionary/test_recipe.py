"""The recipe's steps: settings checked on construction, the run's key, reuse or rebuild of the cache."""

import dataclasses
import json
import logging

import pytest
import torch

from ccim_lightning.dictionary.features import ContextFeatureExtractor
from ccim_lightning.dictionary.recipe import DictionaryRecipe, dictionary_key, load_cached
from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryKey


def _key(**overrides) -> DictionaryKey:
    fields = dict(
        extractor="x",
        weights_digest="w",
        num_prototypes=2,
        mask_subject=True,
        seed=0,
        source="features",
        num_iterations=25,
        pca_dim=None,
        transform="t",
        dataset_fingerprint="f",
    )
    return DictionaryKey(**(fields | overrides))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"source": "clusters"}, "source must be 'features' or 'random', got 'clusters'"),
        ({"num_iterations": 0}, "num_iterations must be an integer >= 1, got 0"),
        ({"pca_dim": -3}, "pca_dim must be an integer >= 1, got -3"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
        ({"num_workers": float("nan")}, r"num_workers must be an integer \(>= 0\), got float nan"),
        ({"seed": 1.5}, r"seed must be an integer \(>= 0\), got float 1.5"),
    ],
)
def test_settings_are_checked_on_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        DictionaryRecipe(**settings)


def test_unchanged_key_reuses_the_cache_and_a_stale_one_rebuilds(tmp_path, caplog):
    path = tmp_path / "z.pt"
    assert load_cached(path, _key()) is None  # no file yet
    ConfounderDictionary.from_clustering(torch.eye(2), [1, 3], _key()).save(path)
    with caplog.at_level(logging.INFO):
        reused = load_cached(path, _key())
    assert reused is not None and reused.key == _key() and "reusing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert load_cached(path, _key(seed=1, transform="u")) is None
    assert "does not match" in caplog.text
    assert "seed: cache has 0, run wants 1" in caplog.text and "transform: cache has 't', run wants 'u'" in caplog.text


def test_the_key_of_a_run_takes_each_setting_from_its_source():
    from ccim_lightning.datamodules import SyntheticContextDataModule

    data = SyntheticContextDataModule(seed=3, train_size=8, val_size=4, test_size=4, image_size=32, subject_size=16)
    data.setup("fit")
    dataset = data.dictionary_dataset(mask_subject=False)
    extractor = ContextFeatureExtractor("test_efficientnet")
    recipe = DictionaryRecipe(extractor="test_efficientnet", mask_subject=False, seed=4, num_iterations=7, pca_dim=5)
    key = dictionary_key(recipe, data, dataset, extractor, num_prototypes=3)
    assert dataclasses.astuple(key)[:8] == ("test_efficientnet", "random-init:test_efficientnet", 3, False, 4,
                                            "features", 7, 5)  # fmt: skip
    assert key.dataset_fingerprint.startswith("n=8;")
    assert key.transform == json.dumps(data.dictionary_signature(), sort_keys=True, default=str)
    # Another data seed: other samples, so another fingerprint and nothing else.
    other = SyntheticContextDataModule(seed=4, train_size=8, val_size=4, test_size=4, image_size=32, subject_size=16)
    other.setup("fit")
    changed = dictionary_key(recipe, other, other.dictionary_dataset(mask_subject=False), extractor, 3)
    assert [name for name, *_ in [r.split(":") for r in key.differences(changed)]] == ["dataset_fingerprint"]


def test_random_source_needs_no_data_and_is_keyed_by_n_and_seed():
    dictionary = DictionaryRecipe(source="random", seed=5).load_or_build(None, 4, 8)
    assert dictionary.key == DictionaryKey.for_random(4, 5) and dictionary.prototypes.shape == (4, 8)


@pytest.mark.parametrize(
    ("num_prototypes", "match"), [(33, "asks for 33 clusters but .* only 32 samples"), (0, "positive")]
)
def test_an_impossible_cluster_count_fails_before_any_feature_is_extracted(monkeypatch, num_prototypes, match):
    from ccim_lightning.datamodules import SyntheticContextDataModule
    from ccim_lightning.dictionary import recipe as recipe_module

    def no_extraction(*args, **kwargs):
        raise AssertionError("the scene CNN was built: the check came too late")

    monkeypatch.setattr(recipe_module, "ContextFeatureExtractor", no_extraction)
    data = SyntheticContextDataModule(train_size=32, val_size=4, test_size=4, image_size=16, subject_size=8)
    with pytest.raises(ValueError, match=rf"{match}.*--model\.init_args\.num_prototypes"):
        DictionaryRecipe(extractor="test_efficientnet").load_or_build(data, num_prototypes, 256)
