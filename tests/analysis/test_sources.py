"""Tests for ccim_lightning.analysis.sources: the annotation table reader, the nearest-prototype assignment and the
dictionary-file check."""

import numpy as np
import pytest

from ccim_lightning.analysis.sources import check_dictionary_file, nearest_prototype, read_annotation_table


def test_table_reader_parses_list_literals_and_names_missing_columns(tmp_path):
    table = tmp_path / "train.csv"
    table.write_text(
        "Index,Folder,Categorical_Labels\n"
        "0,mscoco/images,\"['Engagement', 'Happiness']\"\n"
        "1,framesdb/images,['Anticipation']\n"
        "2,mscoco/images,\"['Happiness']\"\n"
    )
    data = read_annotation_table(table, "Folder", "Categorical_Labels")
    assert data.multi_label and data.emotion_names == ["Anticipation", "Engagement", "Happiness"]
    assert data.labels.tolist() == [[0, 1, 1], [1, 0, 0], [0, 0, 1]]
    assert data.contexts.tolist() == ["mscoco/images", "framesdb/images", "mscoco/images"]
    with pytest.raises(KeyError, match=r"train\.csv.*'Scene'.*'Index', 'Folder', 'Categorical_Labels'"):
        read_annotation_table(table, "Scene", "Categorical_Labels")


def test_table_reader_single_label_column(tmp_path):
    table = tmp_path / "people.csv"
    table.write_text("scene,label\npark,2\npark,10\nstreet,2\n")
    data = read_annotation_table(table, "scene", "label")
    assert not data.multi_label and data.emotion_names == ["2", "10"]
    assert data.labels.tolist() == [[1, 0], [0, 1], [1, 0]]


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
