"""The contracts of ``ccim_lightning.types``: the task check, the batch keys and the Protocol checks."""

import ast
import re
from pathlib import Path

import pytest
from torch import nn

from ccim_lightning import CCIMLightningModule
from ccim_lightning.callbacks.prediction_writer import predictions_frame
from ccim_lightning.datamodules import SyntheticContextDataModule, TableDataModule
from ccim_lightning.debias import ClusterReweighting
from ccim_lightning.types import (
    BATCH_KEYS,
    EXTRA_KEYS,
    Batch,
    ClassifierModel,
    DictionaryDataModule,
    DictionaryModel,
    IdentifiedDataset,
    Sample,
    TabulatedDataset,
    check_task,
    missing_members,
)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_check_task_returns_a_valid_task(task):
    assert check_task(task, where="here") == task


@pytest.mark.parametrize("bad", ["binary", "Multiclass", "", None, 2])
def test_check_task_refuses_a_bad_value_naming_it_and_where_it_came_from(bad):
    with pytest.raises(ValueError) as error:
        check_task(bad, where="SomeModule(task=...)")
    message = str(error.value)
    assert message.startswith("SomeModule(task=...): ") and repr(bad) in message
    assert "'multiclass'" in message and "'multilabel'" in message


@pytest.mark.parametrize(
    ("where", "make"),
    [
        ("CCIMLightningModule(task=...)", lambda: CCIMLightningModule(nn.Identity(), 2, task="binary", feature_dim=4)),
        (
            "TableDataModule(task=...)",
            lambda: TableDataModule("x", "t.csv", ["a", "b"], task="binary"),
        ),
        ("ClusterReweighting.bind", lambda: ClusterReweighting().bind(num_classes=2, task="binary", num_clusters=3)),
        ("predictions_frame", lambda: predictions_frame([0], [[0.5, 0.5]], ["a", "b"], task="binary")),
    ],
)
def test_every_task_check_of_the_package_is_the_one_in_types(where, make):
    with pytest.raises(ValueError, match=rf"^{re.escape(where)}: task must be one of .*'binary'"):
        make()


def test_the_typed_dicts_list_the_batch_keys_and_extras():
    for schema in (Sample, Batch):
        assert schema.__required_keys__ == frozenset(BATCH_KEYS)
        assert schema.__optional_keys__ == frozenset(EXTRA_KEYS)


class _Half:
    """Has some of what the protocols ask for."""

    num_classes = 3
    task = "multiclass"

    def __len__(self):
        return 0

    def sample_table(self):
        return None


@pytest.mark.parametrize(
    ("protocol", "missing"),
    [
        (IdentifiedDataset, ["__getitem__", "sample_identities"]),  # sample_table and __len__ come from the parent
        (TabulatedDataset, []),
        (
            DictionaryDataModule,
            ["batch_size", "class_names", "dictionary_dataset", "dictionary_signature", "num_workers"],
        ),
        (DictionaryModel, ["dictionary_shape", "has_dictionary", "needs_dictionary", "set_dictionary"]),
        (ClassifierModel, ["class_names"]),
    ],
)
def test_missing_members_names_exactly_what_is_missing(protocol, missing):
    half = _Half()
    assert missing_members(half, protocol) == missing
    assert isinstance(half, protocol) == (not missing)


def test_the_shipped_classes_meet_their_protocols():
    model = CCIMLightningModule(nn.Identity(), num_classes=2, feature_dim=4, num_prototypes=3, confounder_dim=5)
    for protocol in (DictionaryModel, ClassifierModel):
        assert isinstance(model, protocol), missing_members(model, protocol)
    assert model.dictionary_shape == (3, 5)
    datamodule = SyntheticContextDataModule(train_size=2, val_size=1, test_size=1)
    assert isinstance(datamodule, DictionaryDataModule)
    assert isinstance(datamodule.dictionary_dataset(), IdentifiedDataset)


def test_types_is_the_bottom_layer():
    source = Path(__file__).parents[1] / "ccim_lightning" / "types.py"
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [None])
    ]
    assert not [name for name in imported if name and name.startswith(("ccim_lightning", "datamodules", "callbacks"))]
