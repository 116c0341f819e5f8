"""Prepared data: equal pixels per datamodule, keys that rebuild or refuse, batch flips, clear errors, DDP writers."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ccim_lightning.datamodules import dataset as dataset_module
from ccim_lightning.datamodules.dataset import collate_skipping_none, normalize_batch
from ccim_lightning.datamodules.emotic import EmoticDataModule
from ccim_lightning.datamodules.prepared import (
    FLIP_WIDTH,
    PreparedDataError,
    PreparedPersonDataset,
    flip_batch,
)
from tests.datamodules.test_caers import caers_root  # noqa: F401 (fixture)
from tests.datamodules.test_caers import datamodule as caers_module
from tests.datamodules.test_dataset import Recorder
from tests.datamodules.test_decode import PERSONS, photo, table_module, write_photo_table
from tests.datamodules.test_emotic import write_emotic
from tests.datamodules.test_table import datamodule as groupwalk_module
from tests.datamodules.test_table import groupwalk_root  # noqa: F401 (fixture)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WRITER_JOB = Path(__file__).with_name("prepared_writer_job.py")


@pytest.fixture
def photo_root(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    return write_photo_table(root, PERSONS)


def no_decoding(monkeypatch):
    """Any image decode from now on fails the test: prepared reads must not decode."""

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded while reading prepared data")

    monkeypatch.setattr(dataset_module, "load_rgb", refuse)
    monkeypatch.setattr(dataset_module, "decode_reduced", refuse)


def samples(dataset):
    return [dataset[i] for i in range(len(dataset))]


def assert_same_samples(prepared, plain):
    """Every sample of ``prepared`` equals ``plain`` (a dataset or a list of its samples), key by key, exactly."""
    assert len(prepared) == len(plain)
    for i in range(len(plain)):
        expected, got = plain[i], prepared[i]
        assert set(got) == set(expected), i
        for key in expected:
            assert got[key].dtype == expected[key].dtype, (i, key)
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, equal_nan=True, msg=f"{i} {key}")


def modules(name, root, tmp_path, **kwargs):
    """The plain datamodule and the same one with prepared_dir (sizes chosen to exercise the reduced decode)."""
    kwargs = {"context_size": (48, 64), "subject_size": 32, "num_workers": 0, "batch_size": 4, **kwargs}
    make = {
        "emotic": lambda **kw: EmoticDataModule(str(root), annotation_format="csv", **kw),
        "caers": lambda **kw: caers_module(root, val_fraction=0.25, **kw),
        "groupwalk": lambda **kw: groupwalk_module(root, val_fraction=0.3, **kw),
        "table": lambda **kw: table_module(root, **kw),
    }[name]
    return make(**kwargs), make(prepared_dir=str(tmp_path / "prepared"), **kwargs)


@pytest.fixture
def roots(tmp_path, write_image, caers_root, groupwalk_root, photo_root):  # noqa: F811
    return {
        "emotic": write_emotic(tmp_path / "EMOTIC", write_image, forms=("csv",)),
        "caers": caers_root,
        "groupwalk": groupwalk_root,
        "table": photo_root,
    }


@pytest.mark.parametrize("name", ["emotic", "caers", "groupwalk", "table"])
def test_prepared_samples_equal_the_on_the_fly_evaluation_samples(name, roots, tmp_path, monkeypatch):
    plain, prepared = modules(name, roots[name], tmp_path)
    prepared.prepare_data()
    expected = {}
    for split in ("train", "val", "test"):
        for mask_subject in (True, False):
            floats = plain.make_dataset(split, plain.eval_transform, mask_subject)
            expected[split, mask_subject] = (samples(floats), samples(floats.with_output("uint8")))
    dictionary = samples(plain.dictionary_dataset(False))
    no_decoding(monkeypatch)  # from here on, only prepared reads
    for (split, mask_subject), (floats, uint8) in expected.items():
        got = prepared.make_dataset(split, prepared.eval_transform, mask_subject)
        assert isinstance(got, PreparedPersonDataset)
        assert_same_samples(got, floats)  # float path: normalised and masked in the worker
        assert_same_samples(got.with_output("uint8"), uint8)  # uint8, before normalisation
    # the dictionary reads the prepared pixels too, and its cache key does not change
    assert isinstance(prepared.dictionary_dataset(), PreparedPersonDataset)
    assert_same_samples(prepared.dictionary_dataset(False), dictionary)
    assert prepared.dictionary_dataset().sample_identities() == plain.dictionary_dataset().sample_identities()
    assert prepared.dictionary_signature() == plain.dictionary_signature()


def folders(root):
    return sorted(path.name for path in Path(root).iterdir() if not path.name.startswith("."))


def test_changed_sizes_decoding_or_images_give_a_new_folder_never_the_stale_one(photo_root, tmp_path, caplog):
    plain, prepared = modules("table", photo_root, tmp_path)
    prepared.prepare_data()
    first = folders(tmp_path / "prepared")
    assert len(first) == 3 and {name.split("-")[0] for name in first} == {"train", "val", "test"}
    # another context size, or another decode rule: new folders, equal to their own on-the-fly samples
    for change in ({"context_size": 40}, {"reduced_decode": False}, {"subject_size": 24}):
        plain, prepared = modules("table", photo_root, tmp_path, **change)
        caplog.clear()
        with caplog.at_level("INFO", logger="ccim_lightning.datamodules.prepared"):
            prepared.setup("fit")  # one process, no prepare_data: setup builds what is missing
        assert "differs in pixels." in caplog.text, change
        assert_same_samples(prepared.val_dataset, plain.make_dataset("val", plain.eval_transform, True))
    assert len(folders(tmp_path / "prepared")) == 3 + 3 * 2  # train and val per change
    # normalisation is not part of the key: other mean/std reuse the folders
    before = folders(tmp_path / "prepared")
    _, other_norm = modules("table", photo_root, tmp_path)
    other_norm.eval_transform.mean = other_norm.train_transform.mean = (0.5, 0.5, 0.5)
    other_norm.setup("fit")
    assert folders(tmp_path / "prepared") == before
    # a re-encoded image (new content, size and mtime): rebuilt, and the samples are the new pixels
    image = photo_root / PERSONS[1][0]
    photo(np.random.default_rng(7), *PERSONS[1][1]).save(image, quality=60)
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    plain, prepared = modules("table", photo_root, tmp_path)
    caplog.clear()
    with caplog.at_level("INFO", logger="ccim_lightning.datamodules.prepared"):
        prepared.setup("fit")
    assert "differs in data (image files or annotations)" in caplog.text
    assert_same_samples(
        prepared.dictionary_dataset().with_output("uint8"), plain.dictionary_dataset().with_output("uint8")
    )


def test_a_folder_whose_manifest_disagrees_is_refused_with_the_reason(photo_root, tmp_path):
    _, prepared = modules("table", photo_root, tmp_path)
    prepared.prepare_data()
    train = next((tmp_path / "prepared").glob("train-*"))
    manifest = json.loads((train / "manifest.json").read_text())
    manifest["key"]["pixels"]["context_size"] = [99, 99]
    (train / "manifest.json").write_text(json.dumps(manifest))
    _, again = modules("table", photo_root, tmp_path)
    with pytest.raises(PreparedDataError, match=r"built for other settings.*pixels\.context_size.*refusing"):
        again.setup("fit")


def test_missing_damaged_or_misplaced_prepared_data_are_clear_errors(photo_root, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PreparedDataError, match="a_file exists and is not a folder"):
        table_module(photo_root, prepared_dir=str(tmp_path / "a_file"))
    # under DDP ranks only read: a missing folder names what to run
    _, prepared = modules("table", photo_root, tmp_path)
    with pytest.raises(PreparedDataError, match=r"no prepared data for TableDataModule val.*prepare_data\(\)"):
        prepared.prepared_split("val", build=False)
    prepared.prepare_data()
    context = next((tmp_path / "prepared").glob("val-*")) / "context.npy"
    context.write_bytes(context.read_bytes()[:100])  # an interrupted copy
    _, again = modules("table", photo_root, tmp_path)
    with pytest.raises(PreparedDataError, match=r"context\.npy unreadable.*delete .* and run again"):
        again.setup("fit")
    # a transform that cannot be prepared, train and eval transforms that differ in more than flip, EMOTIC arrays
    with pytest.raises(PreparedDataError, match="ContextTransform-style"):
        table_module(photo_root, prepared_dir=str(tmp_path / "p"), eval_transform=lambda image, box: {})
    with pytest.raises(PreparedDataError, match="differ in more than flip"):
        from ccim_lightning.datamodules import ContextTransform

        table_module(photo_root, prepared_dir=str(tmp_path / "p"), train_transform=ContextTransform(100, 64, True))
    with pytest.raises(ValueError, match="drop prepared_dir or use_arrays"):
        EmoticDataModule(str(tmp_path), use_arrays=True, prepared_dir=str(tmp_path / "p"))


def test_a_sample_that_failed_to_decode_is_skipped_and_counted_as_before(photo_root, tmp_path):
    (photo_root / "wide.jpg").write_bytes((photo_root / "wide.jpg").read_bytes()[:2000])  # header reads, decode fails
    _, prepared = modules("table", photo_root, tmp_path, on_bad_sample="skip")
    prepared.setup("fit")
    manifest = json.loads(next((tmp_path / "prepared").glob("train-*/manifest.json")).read_text())
    assert manifest["skipped"] == 1
    samples = [prepared.train_dataset[i] for i in range(len(prepared.train_dataset))]
    assert sum(sample is None for sample in samples) == 1
    assert prepared.dropped["train"]["skipped (image fails to decode)"] == 1


def test_flip_batch_mirrors_pixels_box_and_mask_box_together(photo_root, tmp_path, monkeypatch):
    plain, prepared = modules("table", photo_root, tmp_path, flip=True)
    prepared.setup("fit")
    train = prepared.train_dataset.with_output("uint8")
    assert train.augment and not prepared.val_dataset.augment
    batch = collate_skipping_none([train[i] for i in range(len(train))])
    widths = torch.tensor([float(size[0]) for size in plain.table("train").sizes])
    torch.testing.assert_close(batch[FLIP_WIDTH], widths)
    flipped = flip_batch({key: value.clone() for key, value in batch.items()}, probability=1.0)
    assert FLIP_WIDTH not in flipped
    assert torch.equal(flipped["subject"], batch["subject"].flip(2))
    assert torch.equal(flipped["context"], batch["context"].flip(2))
    x1, y1, x2, y2 = batch["box"].unbind(1)  # written out: x -> W - x, the two x ends swapped
    torch.testing.assert_close(flipped["box"], torch.stack([widths - x2, y1, widths - x1, y2], 1))
    m1, n1, m2, n2 = batch["mask_box"].unbind(1)
    assert torch.equal(flipped["mask_box"], torch.stack([64 - m2, n1, 64 - m1, n2], 1))
    # the normalised, masked result equals the on-the-fly training transform when it flips
    monkeypatch.setattr("random.random", lambda: 0.0)
    plain.setup("fit")
    expected = collate_skipping_none([plain.train_dataset[i] for i in range(len(train))])
    got = normalize_batch(flipped, MEAN, STD)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    # half of them by default, from the given generator; unflipped ones are untouched
    generator = torch.Generator().manual_seed(0)
    chosen = torch.rand(len(train), generator=torch.Generator().manual_seed(0)) < 0.5
    half = flip_batch({key: value.clone() for key, value in batch.items()}, generator=generator)
    for i, flip in enumerate(chosen.tolist()):
        assert torch.equal(half["context"][i], batch["context"][i].flip(1) if flip else batch["context"][i])
    assert flip_batch({"context": torch.zeros(2, 3, 4, 4)}) is not None  # no key: unchanged


def test_in_a_lightning_run_batches_are_flipped_and_normalised_on_the_device(photo_root, tmp_path):
    _, prepared = modules("table", photo_root, tmp_path, flip=True, batch_size=3)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    model = Recorder()
    trainer.fit(model, datamodule=prepared)
    assert model.outputs == {"uint8"}
    boxes = {}
    for stage, batch in model.batches:
        assert FLIP_WIDTH not in batch and "mask_box" not in batch and batch["context"].dtype == torch.float32
        if stage == "train":
            for index, box in zip(batch["index"].tolist(), batch["box"].tolist()):
                boxes.setdefault(index, set()).add(tuple(box))
    assert any(len(seen) == 2 for seen in boxes.values())  # some person seen flipped and unflipped


@pytest.mark.slow
def test_two_processes_writing_one_shared_folder_at_once_give_one_complete_copy(photo_root, tmp_path):
    """Two gloo ranks, each a node's writer (prepare_data_per_node) on one shared disk, released together."""
    out = tmp_path / "prepared"
    result = subprocess.run(
        [sys.executable, str(WRITER_JOB), str(photo_root), str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(folders(out)) == 3 and not [p for p in out.iterdir() if p.name.startswith(".")]  # no leftovers
    plain, prepared = modules("table", photo_root, tmp_path)
    prepared.setup("fit")
    assert_same_samples(prepared.dictionary_dataset(), plain.dictionary_dataset())
    for rank in (0, 1):
        assert (out.parent / f"rank{rank}.ok").read_text() == str(len(plain.table("train")))
