"""One contract over every shipped datamodule: each loader's batches have exactly the documented keys, dtypes, shapes.

The schema is written out here (not read from ``ccim_lightning.types``) so that a change to it must be made twice,
knowingly. Every datamodule runs on tiny data the test writes; sizes are non-square so a swapped height and width
shows.
"""

import pytest
import torch
from torch.utils.data import DataLoader

from ccim_lightning.datamodules import (
    CAERSDataModule,
    EmoticDataModule,
    GroupWalkDataModule,
    SyntheticContextDataModule,
    TableDataModule,
)
from ccim_lightning.datamodules.base import PersonDataModule
from ccim_lightning.datamodules.caers import CLASSES as CAERS_CLASSES
from ccim_lightning.datamodules.dataset import collate_skipping_none
from ccim_lightning.types import BATCH_KEYS, EXTRA_KEYS, MASK_BOX
from tests.datamodules.test_base import groupwalk_rows, table_root, write_table
from tests.datamodules.test_emotic import write_emotic

SUBJECT_HW, CONTEXT_HW = (24, 16), (40, 56)
SHARED = {"subject_size": SUBJECT_HW, "context_size": CONTEXT_HW, "batch_size": 3, "num_workers": 0}


def caers(tmp_path, write_image):
    root = tmp_path / "CAER-S"
    lines = []
    for split, count in (("train", 4), ("test", 2)):
        for label, folder in enumerate(CAERS_CLASSES):
            for number in range(count):
                write_image(root / split / folder / f"{number}.png", 80, 60, box=(20, 10, 60, 50))
                lines.append(f"{split}/{folder}/{number}.png,{label},20,10,60,50")
    (root / "faces.txt").write_text("\n".join(lines) + "\n")
    return CAERSDataModule(str(root), face_boxes=str(root / "faces.txt"), val_fraction=0.25, **SHARED)


def emotic(tmp_path, write_image):
    return EmoticDataModule(str(write_emotic(tmp_path / "EMOTIC", write_image, forms=("mat",))), **SHARED)


def groupwalk(tmp_path, write_image):
    root = tmp_path / "gw"
    rows = groupwalk_rows(with_video=False)
    rows += [[image, *box, label, "test"] for image, *box, label, _ in rows[:4]]
    for image in {row[0] for row in rows}:
        write_image(root / image, 64, 48)
    write_table(root / "annotations.csv", rows)
    return GroupWalkDataModule(str(root), val_fraction=0.25, **SHARED)


def table(tmp_path, write_image):
    root = table_root(tmp_path, write_image, ["train"] * 6 + ["val"] * 2 + ["test"] * 2)
    return TableDataModule(str(root), table="t.csv", class_names=["a", "b"], **SHARED)


def synthetic(tmp_path, write_image):
    return SyntheticContextDataModule(
        image_size=CONTEXT_HW[0], subject_size=SUBJECT_HW[0], train_size=5, val_size=4, test_size=4, batch_size=3
    )


#: maker, the extras its batches carry, (subject, context) sizes.
CASES = {
    "caers": (caers, set(), (SUBJECT_HW, CONTEXT_HW)),
    "emotic": (emotic, {"vad"}, (SUBJECT_HW, CONTEXT_HW)),
    "groupwalk": (groupwalk, set(), (SUBJECT_HW, CONTEXT_HW)),
    "table": (table, set(), (SUBJECT_HW, CONTEXT_HW)),
    "synthetic": (synthetic, {"scene"}, ((SUBJECT_HW[0],) * 2, (CONTEXT_HW[0],) * 2)),
}


def expected_spec(batch_size, task, num_classes, sizes):
    """The documented schema: key -> (dtype, shape) for a batch of ``batch_size`` samples."""
    (hs, ws), (hc, wc) = sizes
    target = (torch.int64, (batch_size,)) if task == "multiclass" else (torch.float32, (batch_size, num_classes))
    return {
        "subject": (torch.float32, (batch_size, 3, hs, ws)),
        "context": (torch.float32, (batch_size, 3, hc, wc)),
        "target": target,
        "index": (torch.int64, (batch_size,)),
        "box": (torch.float32, (batch_size, 4)),
        "vad": (torch.float32, (batch_size, 3)),
        "scene": (torch.int64, (batch_size,)),
    }


def check_batch(batch, datamodule, extras, sizes, split_size, where):
    assert set(batch) == {"subject", "context", "target", "index", "box"} | extras, where
    batch_size = batch["index"].shape[0]
    assert 1 <= batch_size <= datamodule.batch_size, where
    spec = expected_spec(batch_size, datamodule.task, datamodule.num_classes, sizes)
    for key, value in batch.items():
        assert (value.dtype, tuple(value.shape)) == spec[key], f"{where}: {key}"
    index, target, box = batch["index"], batch["target"], batch["box"]
    assert index.min() >= 0 and index.max() < split_size and len(set(index.tolist())) == batch_size, where
    if datamodule.task == "multiclass":
        assert target.min() >= 0 and target.max() < datamodule.num_classes, where
    else:
        assert set(target.unique().tolist()) <= {0.0, 1.0}, where
    assert (box[:, 0] <= box[:, 2]).all() and (box[:, 1] <= box[:, 3]).all(), where


def loaders(datamodule):
    """Every loader a run takes, by name: train, val, each test set, predict, and the dictionary's."""
    tests = datamodule.test_dataloader()
    tests = tests if isinstance(tests, list) else [tests]
    named = {"train": datamodule.train_dataloader(), "val": datamodule.val_dataloader()}
    named.update({f"test[{i}]": loader for i, loader in enumerate(tests)})
    named["predict"] = datamodule.predict_dataloader()
    dictionary = datamodule.dictionary_dataset()
    named["dictionary"] = DataLoader(dictionary, batch_size=datamodule.batch_size, collate_fn=collate_skipping_none)
    return named


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_loader_gives_exactly_the_documented_batch(name, tmp_path, write_image):
    make, extras, sizes = CASES[name]
    assert extras <= set(EXTRA_KEYS)
    datamodule = make(tmp_path, write_image)
    datamodule.setup("fit")
    datamodule.setup("test")
    for loader_name, loader in loaders(datamodule).items():
        where = f"{name} {loader_name}"
        batch = next(iter(loader))
        check_batch(batch, datamodule, extras, sizes, len(loader.dataset), where)
        sample = loader.dataset[0]  # one sample: the same keys, the batch's entries without the leading B
        assert set(sample) == set(batch), where
        assert all(sample[key].shape == batch[key].shape[1:] for key in sample), where


@pytest.mark.parametrize("name", sorted(name for name, case in CASES.items() if case[0] is not synthetic))
def test_the_device_path_gives_the_same_batch_once_normalised(name, tmp_path, write_image):
    make, extras, sizes = CASES[name]
    datamodule = make(tmp_path, write_image)
    assert isinstance(datamodule, PersonDataModule)
    datamodule.setup("fit")
    raw = next(
        iter(DataLoader(datamodule.val_dataset.with_output("uint8"), batch_size=3, collate_fn=collate_skipping_none))
    )
    assert raw["context"].dtype == torch.uint8 and MASK_BOX in raw
    batch = datamodule.on_after_batch_transfer(raw, 0)  # the hook Lightning calls on the device
    check_batch(batch, datamodule, extras, sizes, len(datamodule.val_dataset), f"{name} uint8 -> device hook")
    expected = next(iter(datamodule.val_dataloader()))
    for key in batch:
        torch.testing.assert_close(batch[key], expected[key], atol=1e-5, rtol=0, msg=key)


def test_the_written_schema_is_the_one_types_documents():
    assert set(BATCH_KEYS) == {"subject", "context", "target", "index", "box"}
    assert set(EXTRA_KEYS) == {"vad", "scene"}
