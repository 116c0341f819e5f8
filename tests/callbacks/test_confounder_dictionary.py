import logging

import lightning as L
import pytest
import torch

from ccim_lightning import CCIMLightningModule, ContextFeatureExtractor
from ccim_lightning.callbacks import ConfounderDictionaryCallback
from ccim_lightning.datamodules import SyntheticContextDataModule
from ccim_lightning.dictionary.features import ContextFeatures
from ccim_lightning.dictionary.recipe import DictionaryRecipe, build_from_features
from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryFileError, DictionaryKey
from ccim_lightning.hosts import TwoStreamHost

EXTRACTOR = "test_efficientnet"  # timm's tiny test model: 256-d features, fast on CPU
DIM = 256


def tiny_data(**kwargs):
    settings = dict(
        seed=3, bias=0.9, train_size=96, val_size=32, test_size=32, batch_size=32, image_size=32, subject_size=16
    )
    settings.update(kwargs)
    return SyntheticContextDataModule(**settings)


def tiny_model(attention="dot_product", num_prototypes=6, confounder_dim=DIM):
    return CCIMLightningModule(
        TwoStreamHost(feature_dim=16),
        num_classes=4,
        num_prototypes=num_prototypes,
        confounder_dim=confounder_dim,
        attention=attention,
    )


def fit(tmp_path, model, data, callback, **kwargs):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **kwargs,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def independent_features(data, mask_subject=True):
    """The scene CNN's features of every train sample, computed here without the callback's code."""
    data.setup("fit")
    dataset = data.dictionary_dataset(mask_subject=mask_subject)
    extractor = ContextFeatureExtractor(EXTRACTOR)
    with torch.no_grad():
        images = torch.stack([dataset[i]["context"] for i in range(len(dataset))])
        return extractor(images)


def test_builds_dictionary_whose_prior_weighted_mean_is_the_feature_mean(tmp_path):
    callback = ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, progress=False))
    model = tiny_model()
    fit(tmp_path, model, tiny_data(), callback)
    head = model.head
    assert bool(head.dictionary_filled)
    assert head.prior.sum().item() == pytest.approx(1.0, abs=1e-5)
    counts = torch.tensor(callback.last_dictionary.extra["cluster_sizes"], dtype=torch.float32)
    assert counts.sum() == 96
    assert torch.allclose(head.prior, counts / 96)
    # Centroids are their members' means and priors their shares, so sum_i P_i z_i is the mean of all features.
    features = independent_features(tiny_data())
    assert torch.allclose((head.prior[:, None] * head.dictionary).sum(0), features.mean(0), atol=1e-4, rtol=1e-4)
    assert 0.0 <= callback.last_dictionary.extra["scene_nmi"] <= 1.0
    assert 0.0 < callback.last_dictionary.extra["scene_purity"] <= 1.0


def test_cluster_statistics_against_hand_counts():
    from sklearn.metrics import normalized_mutual_info_score

    # Two tight blobs of 4 points; scenes 0,0,0,1 in the first and 1,1,1,1 in the second: purity (3 + 4) / 8.
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    features = centres.repeat_interleave(4, dim=0) + 0.01 * torch.randn(8, 2, generator=g)
    scenes = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    gathered = ContextFeatures(features, torch.arange(8), targets=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), scenes=scenes)
    key = DictionaryKey("x", "y", 2, True, 0, "features", 25, None, "t", "f")
    dictionary = build_from_features(DictionaryRecipe(seed=0), gathered, key)
    assert dictionary.key == key
    assert dictionary.extra["scene_purity"] == pytest.approx(7 / 8)
    blob = [0, 0, 0, 0, 1, 1, 1, 1]
    assert dictionary.extra["scene_nmi"] == pytest.approx(normalized_mutual_info_score(scenes, blob), abs=1e-6)
    assert sorted(dictionary.extra["cluster_sizes"]) == [4, 4]
    assert torch.allclose(dictionary.prior, torch.tensor([0.5, 0.5]))
    # Each sample's cluster, in index order: the first four share one cluster, the last four the other.
    a = dictionary.assignments.tolist()
    assert len(set(a[:4])) == 1 and len(set(a[4:])) == 1 and a[0] != a[4]
    assert dictionary.targets.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_unmasked_dictionary_uses_unmasked_images(tmp_path):
    callback = ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, mask_subject=False, progress=False))
    model = tiny_model()
    fit(tmp_path, model, tiny_data(), callback)
    masked = independent_features(tiny_data(), mask_subject=True).mean(0)
    unmasked = independent_features(tiny_data(), mask_subject=False).mean(0)
    weighted = (model.head.prior[:, None] * model.head.dictionary).sum(0)
    assert torch.allclose(weighted, unmasked, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(weighted, masked, atol=1e-4, rtol=1e-4)


def test_random_dictionary_is_seeded_with_uniform_prior(tmp_path):
    models = []
    for _ in range(2):
        model = tiny_model()
        fit(
            tmp_path,
            model,
            tiny_data(),
            ConfounderDictionaryCallback(DictionaryRecipe(source="random", seed=5, progress=False)),
        )
        models.append(model)
    assert torch.equal(models[0].head.dictionary, models[1].head.dictionary)
    assert torch.allclose(models[0].head.prior, torch.full((6,), 1 / 6))


def test_filled_dictionary_is_not_rebuilt(tmp_path, caplog):
    model = tiny_model()
    prototypes, prior = torch.randn(6, DIM), torch.full((6,), 1 / 6)
    model.head.set_dictionary(prototypes, prior)
    with caplog.at_level(logging.INFO):
        fit(
            tmp_path,
            model,
            tiny_data(),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor="no_such_model", progress=False)),
        )
    assert torch.equal(model.head.dictionary, prototypes)
    assert "already filled" in caplog.text


def test_baseline_head_needs_no_dictionary(tmp_path, caplog):
    model = tiny_model(attention="none")
    with caplog.at_level(logging.INFO):
        fit(
            tmp_path,
            model,
            tiny_data(),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor="no_such_model", progress=False)),
        )
    assert not bool(model.head.dictionary_filled)
    assert "not needed" in caplog.text


def test_confounder_dim_mismatch_is_a_clear_error(tmp_path):
    model = tiny_model(confounder_dim=100)
    with pytest.raises(ValueError, match="confounder_dim: 256"):
        fit(
            tmp_path,
            model,
            tiny_data(),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, progress=False)),
        )


def test_datamodule_without_dictionary_dataset_is_a_clear_error(tmp_path):
    data = tiny_data()
    data.setup("fit")
    model = tiny_model()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, progress=False))],
    )
    with pytest.raises(TypeError, match="dictionary_dataset.*lacks"):
        trainer.fit(model, train_dataloaders=data.train_dataloader())


def test_cache_is_reused_when_it_matches_and_rebuilt_when_it_does_not(tmp_path, caplog, monkeypatch):
    cache = tmp_path / "dictionary.pt"
    first = tiny_model()
    fit(
        tmp_path,
        first,
        tiny_data(),
        ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=str(cache), progress=False)),
    )
    assert cache.exists()
    saved = ConfounderDictionary.load(cache)
    assert saved.num_prototypes == 6 and saved.key.extractor == EXTRACTOR and saved.num_samples == 96

    import ccim_lightning.dictionary.recipe as module

    def no_extraction(*args, **kwargs):
        raise AssertionError("a matching cache must not be rebuilt")

    monkeypatch.setattr(module, "extract_context_features", no_extraction)
    second = tiny_model()
    with caplog.at_level(logging.INFO):
        fit(
            tmp_path,
            second,
            tiny_data(),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=str(cache), progress=False)),
        )
    assert "reusing" in caplog.text
    assert torch.equal(second.head.dictionary, first.head.dictionary)
    monkeypatch.undo()

    caplog.clear()
    third = tiny_model()
    with caplog.at_level(logging.INFO):  # another data seed: other samples, so the cache is stale
        fit(
            tmp_path,
            third,
            tiny_data(seed=4),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=str(cache), progress=False)),
        )
    assert "does not match" in caplog.text and "dataset_fingerprint" in caplog.text


def test_damaged_cache_is_an_error_not_silently_used(tmp_path):
    cache = tmp_path / "dictionary.pt"
    cache.write_bytes(b"not a dictionary")
    with pytest.raises(DictionaryFileError, match="dictionary.pt"):
        fit(
            tmp_path,
            tiny_model(),
            tiny_data(),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=str(cache), progress=False)),
        )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_iterations": 3}, "num_iterations"),
        ({"pca_dim": 8}, "pca_dim"),
        ({"seed": 1}, "seed"),
    ],
)
def test_cache_key_covers_the_clustering_settings(tmp_path, caplog, change, field):
    cache = str(tmp_path / "dictionary.pt")
    fit(
        tmp_path,
        tiny_model(),
        tiny_data(),
        ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=cache)),
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        callback = ConfounderDictionaryCallback(
            DictionaryRecipe(extractor=EXTRACTOR, cache=cache, progress=False, **change)
        )
        fit(tmp_path, tiny_model(), tiny_data(), callback)
    assert "does not match" in caplog.text and f"{field}:" in caplog.text


def test_cache_key_covers_the_dictionary_transform(tmp_path, caplog):
    cache = str(tmp_path / "dictionary.pt")
    # image_size changes the scene CNN's input but not the samples' identities (same seed, same scenes).
    fit(
        tmp_path,
        tiny_model(),
        tiny_data(),
        ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=cache)),
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        fit(
            tmp_path,
            tiny_model(),
            tiny_data(image_size=40),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=cache)),
        )
    assert "does not match" in caplog.text and "transform:" in caplog.text


def test_cache_path_that_is_a_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "cache_dir"
    folder.mkdir()
    with pytest.raises(DictionaryFileError, match="is a folder"):
        fit(
            tmp_path,
            tiny_model(),
            tiny_data(),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=str(folder))),
        )


def test_read_only_cache_folder_fails_before_extracting(tmp_path, monkeypatch):
    import os

    import ccim_lightning.dictionary.recipe as module
    import ccim_lightning.dictionary.store as store

    def no_extraction(*args, **kwargs):
        raise AssertionError("extraction must not start when the cache cannot be written")

    monkeypatch.setattr(module, "extract_context_features", no_extraction)
    monkeypatch.setattr(store.os, "access", lambda path, mode: False)  # root may write anywhere: fake read-only
    assert os.access(tmp_path, os.W_OK) is False
    with pytest.raises(DictionaryFileError, match="not writable"):
        cache = str(tmp_path / "sub" / "d.pt")
        fit(
            tmp_path,
            tiny_model(),
            tiny_data(),
            ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=cache)),
        )


def test_stale_temporary_files_of_a_killed_save_are_removed(tmp_path):
    cache = tmp_path / "d.pt"
    stale = tmp_path / ".d.pt.999999999.tmp"  # no such process
    stale.write_bytes(b"half a file")
    fit(
        tmp_path,
        tiny_model(),
        tiny_data(),
        ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, cache=str(cache))),
    )
    assert cache.exists() and not stale.exists()


def test_build_records_each_training_samples_cluster_in_the_model(tmp_path):
    callback = ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR, progress=False))
    model = tiny_model()
    fit(tmp_path, model, tiny_data(), callback)
    clusters = model.train_clusters
    assert clusters.shape == (96,) and clusters.min() >= 0 and clusters.max() < 6
    # Independent check: each prototype is the mean of the features of the samples recorded in its cluster.
    features = independent_features(tiny_data())
    for k in clusters.unique().tolist():
        member_mean = features[clusters == k].mean(0)
        assert torch.allclose(model.head.dictionary[k], member_mean, atol=1e-4, rtol=1e-4)
    data = tiny_data()
    data.setup("fit")
    labels = torch.tensor([int(data.dictionary_dataset()[i]["target"]) for i in range(96)])
    assert torch.equal(callback.last_dictionary.targets, labels)


def test_model_without_the_dictionary_members_is_an_error_naming_them(tmp_path):
    class PlainModel(L.LightningModule):
        needs_dictionary = True  # has one of the four members only

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    callback = ConfounderDictionaryCallback(DictionaryRecipe(extractor=EXTRACTOR))
    with pytest.raises(TypeError, match=r"PlainModel lacks \['dictionary_shape', 'has_dictionary', 'set_dictionary'\]"):
        callback.on_fit_start(None, PlainModel())


def test_callback_refuses_anything_but_a_recipe():
    with pytest.raises(TypeError, match="takes a DictionaryRecipe, got dict"):
        ConfounderDictionaryCallback({"extractor": EXTRACTOR})
    assert ConfounderDictionaryCallback().recipe == DictionaryRecipe()
