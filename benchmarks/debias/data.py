"""The data of the debiasing study: the run's sizes and the synthetic splits, rendered once per seed."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from benchmarks.debias.tasks import TASKS
from ccim_lightning.datamodules import SyntheticContextDataModule
from ccim_lightning.datamodules.synthetic import SceneSettings, SyntheticContextDataset


@dataclass
class RunConfig:
    """What all runs of one invocation share."""

    train_size: int = 4000
    test_size: int = 5000
    batch_size: int = 64
    epochs: int = 4
    feature_dim: int = 128
    checkpoint: str | None = None  # ``--ccim-checkpoint``: the ``ccim fit`` checkpoint tested as row ``ccim_fit``
    task: str = "default"  # ``--task``: a name of ``tasks.TASKS`` (generator overrides)

    def data_kwargs(self, seed: int, bias: float, val_size: int = 1) -> dict:
        """``SyntheticContextDataModule`` keyword arguments of one data setting.

        ``val_size`` is 1 (validation is not run) except for the rows that select their epoch on validation.
        """
        return {
            "seed": seed,
            "bias": bias,
            "train_size": self.train_size,
            "val_size": val_size,
            "test_size": self.test_size,
            "batch_size": self.batch_size,
            "num_workers": 0,
            **TASKS[self.task],
        }


# --- data --------------------------------------------------------------------------------------------------------


class RenderedSplit(Dataset):
    """A split of ``SyntheticContextDataset`` rendered once into memory, with the datamodule's random flips.

    Args:
        source: The split (``flip=False``), rendered in batches through its ``__getitems__``.
        flip: Flip a sample horizontally with probability 1/2 (subject, context and box), drawn from the torch RNG
            as ``SyntheticContextDataset`` does.
    """

    def __init__(self, source: SyntheticContextDataset, flip: bool = False) -> None:
        samples = []
        for start in range(0, len(source), 500):
            samples += source.__getitems__(list(range(start, min(start + 500, len(source)))))
        self.tensors = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        self.flip = flip
        self.image_size = int(self.tensors["context"].shape[-1])

    def __len__(self) -> int:
        return int(self.tensors["index"].shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {key: value[index] for key, value in self.tensors.items()}
        if self.flip and torch.rand(()) < 0.5:
            sample["context"] = sample["context"].flip(-1)
            sample["subject"] = sample["subject"].flip(-1)
            x1, y1, x2, y2 = sample["box"].tolist()
            sample["box"] = torch.tensor([self.image_size - x2, y1, self.image_size - x1, y2], dtype=torch.float32)
        return sample


class RenderedDataModule(SyntheticContextDataModule):
    """``SyntheticContextDataModule`` over pre-rendered splits; ``dictionary_dataset`` is inherited.

    Args:
        splits: ``{"train", "val", "test", "test_unbiased"}`` -> rendered splits.
        **kwargs: ``SyntheticContextDataModule`` arguments of the training split.
    """

    def __init__(self, splits: dict[str, Dataset], **kwargs) -> None:
        super().__init__(**kwargs)
        self._splits = splits
        self.sample_weights: torch.Tensor | None = None

    def train_dataloader(self) -> DataLoader:
        """Shuffled, or drawn with replacement by ``sample_weights`` when they are set (the resampling variant)."""
        if self.sample_weights is None:
            return super().train_dataloader()
        sampler = WeightedRandomSampler(self.sample_weights.double(), len(self.train_dataset), replacement=True)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler)

    def setup(self, stage: str | None = None) -> None:
        self.train_dataset = self._splits["train"]
        self.val_dataset = self._splits["val"]
        self.test_dataset = self._splits["test"]
        self.test_unbiased_dataset = self._splits["test_unbiased"]


class DataCache:
    """The rendered splits of the current seed (training splits per bias, biased test sets per bias).

    Switching to another seed drops the previous one's splits (memory stays at one seed's data).
    """

    def __init__(self) -> None:
        self.seed: int | None = None
        self.splits: dict[tuple, Dataset] = {}

    def _split(self, config: RunConfig, seed: int, bias: float, split: str, val_size: int = 1) -> Dataset:
        if seed != self.seed:
            self.seed, self.splits = seed, {}
        key = (bias if split != "test_unbiased" else None, split, val_size if split == "val" else None)
        if key not in self.splits:
            start = time.perf_counter()
            plain = SyntheticContextDataModule(**config.data_kwargs(seed, bias, val_size))
            plain.setup()
            source = {
                "train": plain.dictionary_dataset(mask_subject=True),
                "val": plain.val_dataset,
                "test": plain.test_dataset,
                "test_unbiased": plain.test_unbiased_dataset,
            }[split]
            self.splits[key] = RenderedSplit(source, flip=split == "train" and plain.hparams.flip)
            print(f"  rendered {split} seed={seed} bias={bias:g} in {time.perf_counter() - start:.0f} s", flush=True)
        return self.splits[key]

    def test_sets(self, config: RunConfig, seed: int, bias: float) -> tuple[Dataset, Dataset]:
        """The biased (at ``bias``) and the unbiased test set of ``seed``, without rendering a training split."""
        return self._split(config, seed, bias, "test"), self._split(config, seed, bias, "test_unbiased")

    def datamodule(self, config: RunConfig, seed: int, setting) -> RenderedDataModule:
        """Training split at the setting's training bias; test sets at its ``bias`` (the oracle's are biased).

        Args:
            config: The sizes.
            seed: The data seed.
            setting: A ``debias.Setting`` (its ``data_bias`` and ``bias`` are read).
        """
        splits = {
            "train": self._split(config, seed, setting.data_bias, "train"),
            "val": self._split(config, seed, setting.data_bias, "val", setting.val_size),
            "test": self._split(config, seed, setting.bias, "test"),
            "test_unbiased": self._split(config, seed, setting.bias, "test_unbiased"),
        }
        return RenderedDataModule(splits, **config.data_kwargs(seed, setting.data_bias, setting.val_size))


def generator_settings(task: str = "default") -> str:
    """The synthetic generator's version and settings of ``task`` except seed and bias (stored with every run)."""
    return re.sub(r"seed=[^,]*,bias=[^,]*,", "", SceneSettings(**TASKS[task]).identity())
