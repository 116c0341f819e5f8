"""The scene CNN that turns subject-masked context images into confounder features, and the loop that runs it.

The paper keeps the last pooling layer's output (d = 2048) of a Places365 ResNet-152 over every training image with
the subject masked; :class:`ContextFeatureExtractor` is that network for any timm architecture.
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

__all__ = ["ContextFeatureExtractor", "ContextFeatures", "dictionary_loader", "extract_context_features", "own_rows"]

log = logging.getLogger(__name__)

#: Seed for the initialisation of a scene CNN without weights, so that ``"random-init:<name>"`` names one network.
RANDOM_INIT_SEED = 0


class ContextFeatureExtractor(nn.Module):
    """A frozen timm CNN (always eval mode, no gradients) mapping context images (B, 3, H, W) to features (B, d).

    The output is float32, also under autocast; ``torch.no_grad()`` is the caller's job.

    Args:
        model_name: Any timm architecture; the paper uses ``"resnet152"``.
        weights: Local weights file (:func:`~ccim_lightning.weights.load_pretrained_weights`); ``None`` keeps the
            random initialisation seeded with :data:`RANDOM_INIT_SEED` (a weak dictionary, warned).
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``global_pool="avg"``); part of :attr:`name`.

    Attributes:
        model: The timm network, built with ``num_classes=0``.
        num_features: Feature size d (2048 for ResNet-152); link ``confounder_dim`` to it.
        name: ``model_name`` with the ``model_kwargs`` appended; part of the dictionary's key.
        weights_digest: SHA-256 of the weights file, or ``"random-init:<model_name>"``.
        weights_path: The weights file, or ``None``.
    """

    def __init__(self, model_name: str = "resnet152", weights: str | os.PathLike | None = None, **model_kwargs: Any):
        super().__init__()
        if "num_classes" in model_kwargs:
            raise ValueError("ContextFeatureExtractor builds its model with num_classes=0; do not pass num_classes.")
        # Same random network for the same name and timm version, whatever the global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
        self.weights_digest, self.weights_path = f"random-init:{model_name}", None
        if weights is None:
            log.warning(
                "The scene CNN %r has random weights: its features give a weak confounder dictionary. The paper "
                "uses a ResNet-152 pre-trained on Places365; pass a local weights file as `weights`.",
                model_name,
            )
        else:
            info = load_pretrained_weights(self.model, weights, strict=True, ignore_classifier=True)
            self.weights_digest, self.weights_path = info.digest, info.path
        # timm's width of the pooled output: ``head_hidden_size`` where a pre-logits layer follows the last stage
        # (e.g. MobileNetV3), else ``num_features``.
        self.num_features: int = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(model_kwargs.items()))
        self.name = f"{model_name}({args})" if args else model_name
        self.train(False)

    @property
    def data_config(self) -> dict[str, Any]:
        """The preprocessing timm expects (``input_size``, ``mean``, ``std``, ...); Places365 weights use ImageNet's."""
        return resolve_model_data_config(self.model)

    def train(self, mode: bool = True) -> ContextFeatureExtractor:
        """Keep the extractor frozen: always eval mode, parameters without gradients, whatever ``mode`` says."""
        super().train(False)
        for param in self.parameters():
            param.requires_grad_(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_features) float32 features of (B, 3, H, W) images normalised as :attr:`data_config` says."""
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

    With ``shuffle=False`` the sampler gives sample ``i`` to rank ``i % world_size``: keeping the rows this rank owns
    leaves every sample on exactly one rank, also when decode-time skips made the shards unequal.
    """
    return local.rows(local.indices % world_size == rank).in_index_order()


def dictionary_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, world_size: int = 1, rank: int = 0
) -> DataLoader:
    """A fixed-order loader over ``dataset``, sharded across ranks (padding repeats: see :func:`own_rows`)."""
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
    )


@torch.no_grad()
def extract_context_features(
    extractor: ContextFeatureExtractor, loader: DataLoader, device: torch.device, *, progress: bool = True
) -> ContextFeatures:
    """Runs the scene CNN over the ``context`` images of a loader, keeping ``index`` and any ``target``/``scene``.

    On CUDA it runs in bfloat16 autocast with channels_last, where convolutions are fastest.

    Returns:
        The features of the samples this loader yields, on ``device``; empty (0 rows) for an empty shard.
    """
    from rich.progress import track

    on_cuda = device.type == "cuda"
    if on_cuda:
        extractor = extractor.to(memory_format=torch.channels_last)
    parts: dict[str, list[torch.Tensor]] = {"features": [], "indices": [], "targets": [], "scenes": []}
    for batch in track(loader, "Confounder dictionary: scene features", disable=not progress):
        if CONTEXT not in batch:  # every sample of the batch failed to decode (skip mode): nothing to extract
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
    if not parts["features"]:
        return ContextFeatures(
            torch.zeros(0, extractor.num_features, device=device), torch.zeros(0, dtype=torch.long, device=device)
        )
    cat = lambda name: torch.cat(parts[name]) if parts[name] else None  # noqa: E731
    return ContextFeatures(cat("features"), cat("indices"), cat("targets"), cat("scenes"))
