"""The scene CNN that turns subject-masked context images into confounder features.

The paper runs a ResNet-152 pre-trained on Places365 over every training image with the target subject masked, and
keeps the output of the last pooling layer (d = 2048). :class:`ContextFeatureExtractor` is that network for any timm
architecture, built without a classifier so its forward pass returns the pooled features.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from ccim_lightning.weights import load_pretrained_weights

__all__ = ["ContextFeatureExtractor"]

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
