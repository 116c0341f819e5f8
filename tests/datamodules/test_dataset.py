"""uint8 samples normalised and masked in the batch transform equal the CPU float path; the grouped training order."""

import random

import lightning as L
import numpy as np
import pytest
import torch

from ccim_lightning.datamodules.dataset import (
    ImageGroupedSampler,
    collate_skipping_none,
    mask_boxes,
    normalize_batch,
)
from tests.datamodules.test_decode import PERSONS, table_module, write_photo_table

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def photo_root(tmp_path):
    return write_photo_table(tmp_path, PERSONS)


@pytest.mark.parametrize("mask_subject", [True, False])
@pytest.mark.parametrize("reduced_decode", [True, False])
def test_device_side_normalisation_and_masking_equal_the_cpu_path(photo_root, mask_subject, reduced_decode):
    dm = table_module(photo_root, context_size=(48, 64), subject_size=32, reduced_decode=reduced_decode)
    floats = dm.dictionary_dataset(mask_subject)
    uint8 = floats.with_output("uint8")
    sample = uint8[0]
    assert sample["context"].dtype == torch.uint8 and sample["context"].shape == (48, 64, 3)
    assert sample["subject"].shape == (32, 32, 3) and sample["mask_box"].dtype == torch.int64
    indices = range(len(floats))
    cpu = collate_skipping_none([floats[i] for i in indices])
    device = normalize_batch(collate_skipping_none([uint8[i] for i in indices]), MEAN, STD)
    assert set(device) == set(cpu) and "mask_box" not in device
    for key in cpu:
        assert device[key].dtype == cpu[key].dtype and device[key].shape == cpu[key].shape, key
        torch.testing.assert_close(device[key], cpu[key], atol=1e-6, rtol=0)
    assert device["context"].is_contiguous()
    # independent of both: (x / 255 - mean) / std of the uint8 pixels, the box region zero where masked
    pixels = uint8[1]
    expected = (pixels["context"].permute(2, 0, 1).double() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(
        STD
    )[:, None, None]
    x1, y1, x2, y2 = pixels["mask_box"].tolist()
    assert (x2 > x1) == mask_subject
    expected[:, y1:y2, x1:x2] = 0.0
    torch.testing.assert_close(device["context"][1].double(), expected, atol=1e-5, rtol=0)


def test_flipped_training_samples_agree_between_the_paths(photo_root):
    dm = table_module(photo_root, context_size=40, subject_size=24, flip=True)
    dm.setup("fit")
    floats, uint8 = dm.train_dataset, dm.train_dataset.with_output("uint8")
    for i in range(len(floats)):
        for seed in range(3):  # both flip outcomes
            random.seed(seed)
            cpu = collate_skipping_none([floats[i]])
            random.seed(seed)
            device = normalize_batch(collate_skipping_none([uint8[i]]), MEAN, STD)
            for key in cpu:
                torch.testing.assert_close(device[key], cpu[key], atol=1e-6, rtol=0)


def test_normalize_batch_leaves_float_batches_and_checks_shapes():
    batch = {"context": torch.zeros(2, 3, 4, 4), "subject": torch.zeros(2, 3, 2, 2)}
    assert normalize_batch(batch, MEAN, STD) is batch
    assert normalize_batch([1, 2], MEAN, STD) == [1, 2]
    with pytest.raises(ValueError, match=r"context is \(2, 3, 4, 4\) uint8, expected \(B, H, W, 3\)"):
        normalize_batch({"context": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}, MEAN, STD)


class Recorder(L.LightningModule):
    """Keeps every training and validation batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches = []
        self.outputs = set()

    def training_step(self, batch, batch_idx):
        self.batches.append(("train", batch))
        self.outputs.add(self.trainer.train_dataloader.dataset.output)
        return self.weight.sum() + batch["context"].float().mean() * 0

    def validation_step(self, batch, batch_idx):
        self.batches.append(("val", batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_in_a_lightning_run_the_hook_gives_the_float_schema(photo_root):
    dm = table_module(photo_root, context_size=(48, 64), subject_size=32, batch_size=3, flip=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    model = Recorder()
    trainer.fit(model, datamodule=dm)
    assert model.outputs == {"uint8"}  # the loaders of the run hand over uint8
    # after the run, a loader taken by hand (e.g. for dataloaders=, where this hook does not run) is float
    dm.setup("test")
    assert trainer.datamodule is dm and dm.test_dataloader().dataset.output == "float"
    assert dm.dictionary_dataloader().dataset.output == "float"  # the dictionary keeps the CPU path
    assert {stage for stage, _ in model.batches} == {"train", "val"}
    for stage, batch in model.batches:
        assert "mask_box" not in batch and batch["context"].dtype == torch.float32
        split = dm.train_dataset if stage == "train" else dm.val_dataset
        cpu = collate_skipping_none([split[int(i)] for i in batch["index"]])
        for key in cpu:
            torch.testing.assert_close(batch[key], cpu[key], atol=1e-6, rtol=0)
    # outside a trainer (or with device_normalize=False) loaders give the float CPU path
    assert table_module(photo_root).setup("fit") is None
    alone = table_module(photo_root, batch_size=2)
    alone.setup("fit")
    assert next(iter(alone.train_dataloader()))["context"].dtype == torch.float32
    off = table_module(photo_root, batch_size=3, device_normalize=False)
    other = Recorder()
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(other, datamodule=off)  # fmt: skip
    assert other.outputs == {"float"}


def test_grouped_order_keeps_persons_of_an_image_together_and_reshuffles():
    paths = ["a", "b", "a", "c", "b", "a", "d"]
    sampler = ImageGroupedSampler(paths, torch.Generator().manual_seed(0))
    orders = [list(sampler) for _ in range(6)]
    for order in orders:
        assert sorted(order) == list(range(len(paths))) and len(sampler) == len(paths)
        runs = [paths[i] for k, i in enumerate(order) if k == 0 or paths[order[k - 1]] != paths[i]]
        assert len(runs) == len(set(runs))  # each image forms one run
        for image in set(paths):  # persons of an image in table order
            mine = [i for i in order if paths[i] == image]
            assert mine == sorted(mine)
    assert len({tuple(order) for order in orders}) > 1
    torch.manual_seed(5)
    first = list(ImageGroupedSampler(paths))
    torch.manual_seed(5)
    assert list(ImageGroupedSampler(paths)) == first  # seeded from torch's global generator


def test_group_by_image_switch_and_shuffled_training_loader(photo_root):
    dm = table_module(photo_root, batch_size=4)  # 7 persons: no one-sample last batch to drop
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, ImageGroupedSampler)
    plain = table_module(photo_root, batch_size=2, group_by_image=False)
    plain.setup("fit")
    assert isinstance(plain.train_dataloader().sampler, torch.utils.data.RandomSampler)
    assert not isinstance(dm.val_dataloader().sampler, ImageGroupedSampler)
    seen = np.concatenate([batch["index"].numpy() for batch in dm.train_dataloader()])
    assert sorted(seen.tolist()) == list(range(len(dm.train_dataset)))


def test_both_masking_kernels_fill_exactly_the_boxes():
    boxes = torch.tensor([[1, 2, 4, 3], [0, 0, 0, 0], [3, 1, 5, 5], [-1, -2, 2, 1]])
    expected = torch.ones(4, 2, 5, 5)
    for sample, (x1, y1, x2, y2) in zip(expected, boxes.tolist()):  # by hand, clipped at 0
        for y in range(max(y1, 0), y2):
            for x in range(max(x1, 0), x2):
                sample[:, y, x] = -3.0
    for vectorised in (True, False):
        context = torch.ones(4, 2, 5, 5)
        mask_boxes(context, boxes, -3.0, vectorised=vectorised)
        assert torch.equal(context, expected), vectorised
