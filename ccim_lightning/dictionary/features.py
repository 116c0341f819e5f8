"""The scene CNN that turns subject-masked context images into confounder features, and the loop that runs it.

The paper runs a ResNet-152 pre-trained on Places365 over every training image with the target subject masked, and
keeps the output of the last pooling layer (d = 2048). :class:`ContextFeatureExtractor` is that network for any timm
architecture, built without a classifier so its forward pass returns the pooled features;
:func:`extract_context_features` runs it over a loader (:func:`dictionary_loader`) into :class:`ContextFeatures`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ccim_lightning.sample_index import first_of_each_index
from ccim_lightning.types import CONTEXT, INDEX, SCENE, TARGET
from ccim_lightning.weights import load_pretrained_weights

__all__ = [
    "ContextFeatureExtractor",
    "ContextFeatures",
    "dictionary_loader",
    "extract_context_features",
    "own_rows",
]

log = logging.getLogger(__name__)

#: Seed for the initialisation of a scene CNN without weights, so that ``"random-init:<name>"`` names one network.
RANDOM_INIT_SEED = 0


class ContextFeatureExtractor(nn.Module):
    """A frozen timm CNN mapping context images (B, 3, H, W) to pooled features (B, d), float32.

    The module stays in eval mode with ``requires_grad=False`` parameters: ``train()`` leaves it in eval mode and
    re-freezes it. Running it under ``torch.no_grad()`` or ``torch.inference_mode()`` is the caller's job. It works
    under autocast (the output is cast back to float32) and with ``.to(memory_format=torch.channels_last)``.

    Args:
        model_name: Any timm architecture; the paper uses ``"resnet152"``.
        weights: Local weights file (a state dict or a checkpoint wrapping one, e.g. the Places365 release; see
            :func:`~ccim_lightning.weights.load_pretrained_weights`). ``None`` keeps a random initialisation (seeded
            with :data:`RANDOM_INIT_SEED`), which gives a weak dictionary: a warning is logged.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``global_pool="avg"``); they become part of
            :attr:`name` because they change the features.

    Attributes:
        model: The timm network, built with ``num_classes=0``.
        num_features: Feature size d, the width of the output (2048 for ResNet-152, 512 for ResNet-18); link
            ``confounder_dim`` to it.
        name: ``model_name``, with the ``model_kwargs`` appended when given; stored in the dictionary's metadata.
        weights_digest: SHA-256 of the weights file, or ``"random-init:<model_name>"``.
        weights_path: The weights file, or ``None``.
    """

    def __init__(self, model_name: str = "resnet152", weights: str | os.PathLike | None = None, **model_kwargs: Any):
        super().__init__()
        if "num_classes" in model_kwargs:
            raise ValueError("ContextFeatureExtractor builds its model with num_classes=0; do not pass num_classes.")
        if weights is None:
            # Same random network for the same name and timm version, whatever the global RNG state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
            self.weights_digest = f"random-init:{model_name}"
            self.weights_path = None
            log.warning(
                "The scene CNN %r has random weights: its features give a weak confounder dictionary. The paper "
                "uses a ResNet-152 pre-trained on Places365; pass a local weights file as `weights`.",
                model_name,
            )
        else:
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
            info = load_pretrained_weights(self.model, weights, strict=True, ignore_classifier=True)
            self.weights_digest = info.digest
            self.weights_path = info.path
        # timm's width of the pooled output: ``head_hidden_size`` where a pre-logits layer follows the last stage
        # (e.g. MobileNetV3), else ``num_features``.
        self.num_features: int = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(model_kwargs.items()))
        self.name = f"{model_name}({args})" if args else model_name
        self.train(False)

    @property
    def data_config(self) -> dict[str, Any]:
        """Preprocessing timm expects: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``.

        Places365 checkpoints were trained with the ImageNet mean and std at 224 px, as timm's ResNet defaults.
        """
        return resolve_model_data_config(self.model)

    def train(self, mode: bool = True) -> ContextFeatureExtractor:
        """Keep the extractor frozen: always eval mode, parameters without gradients, whatever ``mode`` says."""
        super().train(False)
        for param in self.parameters():
            param.requires_grad_(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of a batch of (masked, normalised) context images.

        Args:
            images: (B, 3, H, W) images, normalised as :attr:`data_config` says.

        Returns:
            (B, num_features) float32 features.
        """
        return self.model(images).float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}, weights_digest={self.weights_digest!r}"


@dataclass
class ContextFeatures:
    """Scene features of a split's samples.

    Attributes:
        features: (n, d) float32 features.
        indices: (n,) int64 sample index in the split.
        targets: (n,) int64 labels or (n, C) float multi-hot targets, or ``None`` where the batches have none.
        scenes: (n,) int64 true scene ids where the dataset knows them (synthetic data), else ``None``.
    """

    features: torch.Tensor
    indices: torch.Tensor
    targets: torch.Tensor | None = None
    scenes: torch.Tensor | None = None

    def rows(self, rows: torch.Tensor) -> ContextFeatures:
        """The subset of these rows."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return ContextFeatures(self.features[rows], self.indices[rows], pick(self.targets), pick(self.scenes))

    def in_index_order(self) -> ContextFeatures:
        """The rows sorted by sample index, each sample once (a loader that repeats samples counts them once)."""
        return self.rows(torch.from_numpy(first_of_each_index(self.indices)).to(self.indices.device))


def own_rows(local: ContextFeatures, world_size: int, rank: int) -> ContextFeatures:
    """This rank's shard without the DistributedSampler's padding repeats, in index order.

    With ``shuffle=False`` the sampler gives sample ``i`` to rank ``i % world_size``; the repeats it appends to make
    the shards equal belong to another rank (or repeat one of this rank's), so keeping the rows whose index this rank
    owns leaves every sample on exactly one rank, also when decode-time skips made the shards unequal.
    """
    return local.rows(local.indices % world_size == rank).in_index_order()


def dictionary_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, world_size: int = 1, rank: int = 0
) -> DataLoader:
    """A fixed-order loader over ``dataset``, sharded across ranks when ``world_size > 1``.

    The DistributedSampler pads the last shard with repeated samples; :func:`own_rows` removes them by sample index
    (and copes with shards that differ in size once undecodable images are skipped).
    """
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=num_workers,
        # Datasets that can skip undecodable images (on_bad_sample="skip") bring a collate that drops them.
        collate_fn=getattr(dataset, "collate_fn", None),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


@torch.no_grad()
def extract_context_features(
    extractor: ContextFeatureExtractor, loader: DataLoader, device: torch.device, *, progress: bool = True
) -> ContextFeatures:
    """Runs the scene CNN over a loader of samples in the shared batch schema.

    Uses ``batch["context"]`` (the image with the subject filled with zeros, unless the dataset was asked for
    unmasked images), ``batch["index"]`` and, where present, ``target`` and ``scene``. On CUDA it runs in bfloat16
    autocast with channels_last, where convolutions are fastest; features come back as float32.

    Returns:
        The features of the samples this loader yields, on ``device``; empty (0 rows) for an empty shard.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    on_cuda = device.type == "cuda"
    if on_cuda:
        extractor = extractor.to(memory_format=torch.channels_last)
    parts: dict[str, list[torch.Tensor]] = {"features": [], "indices": [], "targets": [], "scenes": []}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("Confounder dictionary: scene features", total=len(loader))
        for batch in loader:
            if CONTEXT not in batch:  # every sample of the batch failed to decode (skip mode): nothing to extract
                bar.advance(task)
                continue
            images = batch[CONTEXT].to(device, non_blocking=True)
            if on_cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_cuda):
                parts["features"].append(extractor(images).float())
            parts["indices"].append(batch[INDEX].to(device).long())
            if TARGET in batch:
                parts["targets"].append(batch[TARGET].to(device))
            if SCENE in batch:
                parts["scenes"].append(batch[SCENE].to(device).long())
            bar.advance(task)
    if not parts["features"]:
        return ContextFeatures(
            torch.zeros(0, extractor.num_features, device=device), torch.zeros(0, dtype=torch.long, device=device)
        )
    cat = lambda name: torch.cat(parts[name]) if parts[name] else None  # noqa: E731
    return ContextFeatures(cat("features"), cat("indices"), cat("targets"), cat("scenes"))
