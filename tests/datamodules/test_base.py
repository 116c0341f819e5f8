"""The shared datamodule base: CLI parsing of the shared arguments, the contracts, reports, loaders, hold-outs."""

import csv
import logging
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser
from PIL import Image

from ccim_lightning.datamodules import (
    CAERSDataModule,
    DictionaryDataModule,
    EmoticDataModule,
    GroupWalkDataModule,
    IdentifiedDataset,
    SyntheticContextDataModule,
    TableDataModule,
)
from ccim_lightning.datamodules.base import train_drop_last
from ccim_lightning.datamodules.common import stratified_holdout
from ccim_lightning.datamodules.transforms import ContextTransform
from ccim_lightning.types import BATCH_KEYS, missing_members

SHARED = ("context_size", "subject_size", "flip", "batch_size", "num_workers", "on_bad_sample")


def write_table(path, rows, header=("image", "x1", "y1", "x2", "y2", "label", "split")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def table_root(tmp_path, write_image, splits, label="a"):
    """One 64x48 image per row, box (10, 8, 30, 40), ``splits`` giving each row's split."""
    root = tmp_path / "data"
    rows = []
    for i, split in enumerate(splits):
        write_image(root / f"{i}.png", 64, 48, box=(10, 8, 30, 40))
        rows.append([f"{i}.png", 10, 8, 30, 40, label if i % 2 else "b", split])
    write_table(root / "t.csv", rows)
    return root


def table_datamodule(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 4)
    return TableDataModule(str(root), table="t.csv", class_names=["a", "b"], **kwargs)


# --- CLI: the shared arguments are declared once and reach every datamodule through **kwargs -----------------------
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("CAERSDataModule", []),
        ("EmoticDataModule", []),
        ("TableDataModule", ["--data.init_args.table", "t.csv", "--data.init_args.class_names", "[a, b]"]),
        ("GroupWalkDataModule", []),
    ],
)
def test_the_cli_parser_lists_and_checks_the_shared_arguments(name, extra):
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    base = ["--data", f"ccim_lightning.datamodules.{name}", "--data.init_args.root", "x", *extra]
    config = parser.parse_args([*base, "--data.init_args.batch_size", "4", "--data.init_args.on_bad_sample", "skip"])
    init = config.data.init_args
    assert set(SHARED) <= set(vars(init)) and "train_transform" in vars(init)
    assert (init.batch_size, init.on_bad_sample, init.num_workers) == (4, "skip", 4)
    assert init.subject_size == (96 if name == "CAERSDataModule" else 128)  # CAER-S keeps its own default
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--data.init_args.on_bad_sample", "ignore"])  # typed: only error/skip
    datamodule = parser.instantiate(config).data
    assert datamodule.batch_size == 4 and datamodule.hparams["batch_size"] == 4
    assert datamodule.hparams["on_bad_sample"] == "skip" and "train_transform" not in datamodule.hparams


def test_keyword_arguments_reach_the_base_and_unknown_ones_fail():
    dm = GroupWalkDataModule("x", batch_size=3, context_size=(32, 48), flip=False)
    assert dm.batch_size == 3 and dm.eval_transform.context_size == (32, 48) and not dm.train_transform.flip
    assert dm.task == "multilabel" and dm.num_classes == 4
    with pytest.raises(TypeError, match="batch_sise"):
        CAERSDataModule("x", batch_sise=3)


# --- contracts -------------------------------------------------------------------------------------------------------
def test_every_datamodule_meets_the_dictionary_contract(tmp_path, write_image):
    modules = [
        CAERSDataModule("x"),
        EmoticDataModule("x"),
        GroupWalkDataModule("x"),
        table_datamodule("x"),
        SyntheticContextDataModule(train_size=4, val_size=2, test_size=2),
    ]
    for dm in modules:
        assert isinstance(dm, DictionaryDataModule), missing_members(dm, DictionaryDataModule)
    assert not isinstance(L.LightningDataModule(), DictionaryDataModule)
    assert missing_members(L.LightningDataModule(), DictionaryDataModule) == [
        "batch_size", "class_names", "dictionary_dataset", "dictionary_signature", "num_classes", "num_workers",
        "task",
    ]  # fmt: skip
    dm = table_datamodule(table_root(tmp_path, write_image, ["train"] * 4 + ["test"]), val_fraction=0.5)
    dataset = dm.dictionary_dataset()
    assert isinstance(dataset, IdentifiedDataset) and len(dataset.sample_table()) == len(dataset) == 2
    assert set(BATCH_KEYS) <= set(dataset[0])
    synthetic = modules[-1].dictionary_dataset()
    assert isinstance(synthetic, IdentifiedDataset) and set(BATCH_KEYS) <= set(synthetic[0])


def test_dictionary_signature_names_what_changes_the_context_pixels():
    signature = EmoticDataModule("x", context_size=(200, 300)).dictionary_signature()
    assert signature["context_size"] == [200, 300] and signature["interpolation"] == "bilinear"
    np.testing.assert_allclose(signature["mean"], [0.485, 0.456, 0.406])
    np.testing.assert_allclose(signature["std"], [0.229, 0.224, 0.225])
    assert signature["mask_fill"] == 0.0 and signature["pixels"] == "pil-rgb-v3"
    assert EmoticDataModule("x", use_arrays=True).dictionary_signature()["pixels"].startswith("emotic-arrays")
    other = ContextTransform(224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert CAERSDataModule("x", eval_transform=other).dictionary_signature()["mean"] == [0.5, 0.5, 0.5]
    # the subject size reaches the context pixels only through the reduced decode (it bounds the JPEG reduction)
    full = {"reduced_decode": False}
    assert (
        CAERSDataModule("x", subject_size=64, **full).dictionary_signature()
        == CAERSDataModule("x", **full).dictionary_signature()
    )
    assert CAERSDataModule("x", subject_size=64).dictionary_signature() != CAERSDataModule("x").dictionary_signature()
    assert CAERSDataModule("x", **full).dictionary_signature()["decode"] == "full"
    assert CAERSDataModule("x").dictionary_signature() != CAERSDataModule("x", **full).dictionary_signature()

    def plain(image, box, subject=None):
        raise AssertionError("not called")

    described = CAERSDataModule("x", eval_transform=plain).dictionary_signature()
    assert described["transform"].endswith("plain") and "repr" in described
    synthetic = SyntheticContextDataModule(image_size=48).dictionary_signature()
    assert synthetic["context_size"] == [48, 48] and synthetic["mask_fill"] == 0.0


def test_sample_identities_change_when_an_image_file_changes(tmp_path, write_image):
    root = table_root(tmp_path, write_image, ["train", "train", "val", "test"])
    before = table_datamodule(root).dictionary_dataset().sample_identities()
    path = root / "1.png"
    stat = path.stat()
    assert before[1] == f"1.png|10,8,30,40|{stat.st_size}:{stat.st_mtime_ns}"
    write_image(path, 64, 48, box=(11, 8, 30, 40))  # new content, same name and box
    after = table_datamodule(root).dictionary_dataset().sample_identities()
    assert after[0] == before[0] and after[1] != before[1]


# --- loaders ---------------------------------------------------------------------------------------------------------
def test_drop_last_only_when_the_last_training_batch_would_hold_one_sample():
    # (size, batch, ranks): per-rank ceil(size / ranks) samples (9/2 -> 5, 10/2 -> 5, 13/3 -> 5, 12/3 -> 4,
    # 14/2 -> 7); drop when that leaves a remainder of exactly 1, and never with batches of one
    cases = {(9, 4, 1): True, (10, 4, 1): False, (8, 4, 1): False, (9, 4, 2): True, (10, 4, 2): True,
             (1, 4, 1): False, (5, 1, 1): False, (2, 1, 1): False, (13, 4, 3): True, (12, 4, 3): False,
             (14, 4, 2): False}  # fmt: skip
    assert {case: train_drop_last(*case) for case in cases} == cases


def test_a_one_sample_last_batch_is_dropped_in_training_and_logged_once(tmp_path, write_image, caplog):
    root = table_root(tmp_path, write_image, ["train"] * 9 + ["val", "test"])
    dm = table_datamodule(root)
    dm.setup("fit")
    with caplog.at_level(logging.INFO):
        sizes = [len(batch["index"]) for batch in dm.train_dataloader()]
        again = [len(batch["index"]) for batch in dm.train_dataloader()]
    assert sizes == again == [4, 4]
    assert sum("last batch of one sample" in record.message for record in caplog.records) == 1
    assert [len(batch["index"]) for batch in dm.dictionary_dataloader()] == [4, 4, 1]  # not in the dictionary
    batchnorm = torch.nn.BatchNorm1d(3).train()
    for size in sizes:
        batchnorm(torch.randn(size, 3))  # every training batch is usable
    synthetic = SyntheticContextDataModule(train_size=17, val_size=2, test_size=2, batch_size=8, image_size=16)
    synthetic.setup()
    assert [len(batch["index"]) for batch in synthetic.train_dataloader()] == [8, 8]
    even = table_datamodule(table_root(tmp_path / "even", write_image, ["train"] * 10 + ["val", "test"]))
    even.setup("fit")
    assert [len(batch["index"]) for batch in even.train_dataloader()] == [4, 4, 2]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_images_that_fail_to_decode_in_a_loader_are_counted_in_dropped(tmp_path, write_image, num_workers, caplog):
    root = table_root(tmp_path, write_image, ["test"] * 6)
    for name in ("2.png", "4.png"):  # the headers are fine, decoding fails
        path = root / name
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:300])
    dm = table_datamodule(root, on_bad_sample="skip", num_workers=num_workers, batch_size=2)
    dm.setup("test")
    assert dm.dropped["test"] == {}
    for _ in range(2):  # two epochs meet the same two samples: still counted once each
        seen = sorted(int(i) for batch in dm.test_dataloader() for i in batch["index"])
    assert seen == [0, 1, 3, 5]
    assert dm.dropped["test"] == {"skipped (image fails to decode)": 2}
    with caplog.at_level(logging.WARNING):
        dm.teardown("test")
    assert sum("2 samples skipped so far" in record.message for record in caplog.records) == 1
    assert "Files: 2.png, 4.png" in caplog.text  # named in the summary (the per-file warnings may be another rank's)


# --- reports ---------------------------------------------------------------------------------------------------------
def test_duplicate_rows_and_persons_in_two_splits_are_reported(tmp_path, write_image, caplog):
    root = table_root(tmp_path, write_image, ["train", "train", "val", "test"])
    rows = list(csv.reader((root / "t.csv").open()))[1:]
    rows += [rows[0], ["0.png", 10, 8, 30, 40, "b", "test"], ["0.png", 12, 8, 30, 40, "b", "val"]]
    write_table(root / "t.csv", rows)
    dm = table_datamodule(root)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.dropped["train"] == {"duplicate rows (same image and box; kept)": 1}
    assert dm.dropped["test"] == {"persons also in train (same image and box)": 1}
    assert dm.dropped["val"] == {}  # same image, another box: another person
    assert any(
        "persons also in train" in record.message and "t.csv line 7" in record.message for record in caplog.records
    )


def test_real_emotic_csv_persons_shared_by_train_and_val_are_counted(shared_data):
    import pandas as pd

    from ccim_lightning.datamodules.common import BadSamples, note_overlap
    from ccim_lightning.datamodules.emotic import read_emotic_csv

    frames = {s: pd.read_csv(shared_data / "emotic_csv" / f"{s}.csv") for s in ("train", "val")}
    keys = {s: set(f["Folder"] + "/" + f["Filename"] + "|" + f["BBox"].str.replace(" ", "")) for s, f in frames.items()}
    tables = {s: read_emotic_csv(shared_data / "emotic_csv" / f"{s}.csv") for s in ("train", "val")}
    bad = BadSamples("EMOTIC", "val")
    note_overlap(tables["val"], "val", {"train": tables["train"]}, bad)
    shared = len(keys["train"] & keys["val"])
    assert shared > 0 and bad.counts == {"persons also in train (same image and box)": shared}


def test_an_empty_split_names_the_split_and_the_file(tmp_path, write_image):
    root = tmp_path / "EMOTIC"
    write_image(root / "emotic" / "mscoco" / "images" / "x.jpg")
    header = "Index,Folder,Filename,Image Size,BBox,Categorical_Labels,Continuous_Labels,Gender,Age\n"
    row = '0,mscoco/images,x.jpg,"[64, 48]","[1, 2, 30, 40]",[\'Fear\'],"[1, 2, 3]",Male,Adult\n'
    (root / "emotic_pre").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "emotic_pre" / f"{split}.csv").write_text(header + row)
    (root / "emotic_pre" / "test.csv").write_text(header)
    dm = EmoticDataModule(str(root), num_workers=0)
    with pytest.raises(ValueError, match=r"EMOTIC test: no usable samples in .*emotic_pre/test\.csv \(the split is"):
        dm.setup("test")
    (root / "emotic" / "mscoco" / "images" / "x.jpg").unlink()
    with pytest.raises(ValueError, match=r"EMOTIC train: no usable samples in .*train\.csv.*skipped \(missing image"):
        EmoticDataModule(str(root), num_workers=0, on_bad_sample="skip").setup("fit")


# --- hold-outs -------------------------------------------------------------------------------------------------------
def test_single_row_groups_hold_out_the_rounded_share_of_each_stratum():
    identities = [f"img{i}" for i in range(20)]
    strata = ["a"] * 10 + ["b"] * 7 + ["c"] * 3
    train, val = stratified_holdout(identities, strata, 0.25, seed=3)
    # round half up: 2.5 -> 3, 1.75 -> 2, 0.75 -> 1
    assert Counter(strata[i] for i in val) == {"a": 3, "b": 2, "c": 1}
    assert sorted([*train, *val]) == list(range(20))
    order = np.random.default_rng(0).permutation(20)
    _, shuffled_val = stratified_holdout([identities[i] for i in order], [strata[i] for i in order], 0.25, seed=3)
    assert sorted(identities[order[i]] for i in shuffled_val) == sorted(identities[i] for i in val)


def groupwalk_rows(with_video):
    """6 videos x 4 frames x 2 persons; labels vary within a video."""
    labels = ["Happy", "Sad", "Angry", "Neutral"]
    rows = []
    for video in range(6):
        for frame in range(4):
            image = f"frames/v{video}/{frame:04d}.png"
            for person in range(2):
                row = [image, 5 + 30 * person, 5, 25 + 30 * person, 40, labels[(video + frame + person) % 4], "train"]
                rows.append([*row, f"v{video}"] if with_video else row)
    return rows


@pytest.mark.parametrize("with_video", [False, True])
def test_automatic_validation_keeps_images_and_videos_on_one_side(tmp_path, write_image, with_video):
    root = tmp_path / "gw"
    rows = groupwalk_rows(with_video)
    for image in {row[0] for row in rows}:
        write_image(root / image, 64, 48)
    rows.append(["frames/v0/0000.png", 5, 5, 25, 40, "Happy", "test", "v0"][: 8 if with_video else 7])
    header = ["image", "x1", "y1", "x2", "y2", "label", "split"] + (["video"] if with_video else [])
    write_table(root / "annotations.csv", rows, header)
    for seed in range(5):
        dm = GroupWalkDataModule(str(root), val_fraction=0.25, seed=seed, num_workers=0)
        train, val = dm.table("train"), dm.table("val")
        assert len(train) + len(val) == 48 and len(val) > 0
        assert not set(train.paths) & set(val.paths)  # no frame on both sides
        videos = [{path.split("/")[1] for path in table.paths} for table in (train, val)]
        if with_video:
            assert not videos[0] & videos[1] and len(val) % 8 == 0  # whole videos
    again = GroupWalkDataModule(str(root), val_fraction=0.25, seed=4, num_workers=0)
    assert again.table("val").paths == val.paths
