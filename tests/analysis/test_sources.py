"""Tests for ccim_lightning.analysis.sources: the annotation table reader and the label matrix."""

import numpy as np
import pytest

from ccim_lightning.analysis.sources import label_matrix, read_annotation_table


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


def test_label_matrix_from_class_ids_and_multi_hot_rows():
    matrix, multi_label = label_matrix(np.array([2, 0, 2]), num_classes=4)
    assert not multi_label and matrix.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
    assert label_matrix(np.array([1, 0]))[0].shape == (2, 2)  # C from the largest id
    matrix, multi_label = label_matrix(np.array([[0.9, 0.2], [0.0, 1.0]]))
    assert multi_label and matrix.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match=r"0\.\.3 are outside 0\.\.2"):
        label_matrix(np.array([0, 3]), num_classes=3)
