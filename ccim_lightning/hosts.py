"""Host backbones: modules that map a batch dict to the fused subject + context feature ``h``.

CCIM sits after a host model's fused feature and before its classifier (paper.md, "Training setup").
Any ``nn.Module`` with ``forward(batch) -> (B, feature_dim)`` and a ``feature_dim`` attribute can be a host;
the classes here are ready-made ones.
"""

from __future__ import annotations

import torch
from torch import nn

from ccim_lightning.weights import load_pretrained_weights

SMALL_CNN = "small_cnn"


def small_cnn(channels: tuple[int, ...] = (32, 64, 96, 128)) -> nn.Module:
    """A four-block strided CNN, globally pooled: fast enough to train on a laptop CPU.

    timm's smallest ImageNet models are several times slower per sample on 64-pixel inputs, which would put the
    demo over its time budget; real runs pick a timm encoder by name instead.

    Args:
        channels: Output channels of each stride-2 conv block.

    Returns:
        A module mapping (B, 3, H, W) images to (B, channels[-1]) features, with ``num_features`` set.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    encoder = nn.Sequential(*layers)
    encoder.num_features = in_channels
    return encoder


def build_encoder(name: str, weights: str | None = None) -> nn.Module:
    """Builds a globally pooled image encoder.

    Args:
        name: ``"small_cnn"`` for the built-in tiny CNN, otherwise any timm model name (created without a
            classifier, so its output is the pooled last stage).
        weights: Optional local checkpoint (timm/torchvision state dict or the Places365 release format).

    Returns:
        The encoder, with a ``num_features`` attribute.
    """
    if name == SMALL_CNN:
        encoder = small_cnn()
    else:
        import timm

        encoder = timm.create_model(name, pretrained=False, num_classes=0)
    if weights is not None:
        load_pretrained_weights(encoder, weights)
    return encoder


class TwoStreamHost(nn.Module):
    """A subject stream and a context stream, pooled, concatenated and fused into ``h``.

    The subject stream sees ``batch["subject"]`` (the body or face crop); the context stream sees
    ``batch["context"]`` (the whole image with the subject masked out). Their pooled features are concatenated
    and fused by Linear + BatchNorm1d + ReLU into ``feature_dim`` (the ``d_h`` of paper.md).

    Args:
        subject_encoder: ``"small_cnn"`` or a timm model name for the subject stream.
        context_encoder: ``"small_cnn"`` or a timm model name for the context stream.
        feature_dim: Width of the fused feature ``h``.
        subject_weights: Optional local checkpoint for the subject encoder.
        context_weights: Optional local checkpoint for the context encoder.
    """

    def __init__(
        self,
        subject_encoder: str = SMALL_CNN,
        context_encoder: str = SMALL_CNN,
        feature_dim: int = 256,
        subject_weights: str | None = None,
        context_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.subject_encoder = build_encoder(subject_encoder, subject_weights)
        self.context_encoder = build_encoder(context_encoder, context_weights)
        joint_dim = self.subject_encoder.num_features + self.context_encoder.num_features
        self.fusion = nn.Sequential(
            nn.Linear(joint_dim, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)
        )
        self.feature_dim = feature_dim

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Maps a batch to the fused feature ``h`` of shape (B, feature_dim)."""
        subject = self.subject_encoder(batch["subject"])
        context = self.context_encoder(batch["context"])
        return self.fusion(torch.cat([subject, context], dim=1))
