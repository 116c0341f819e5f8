"""Host backbones: modules that map a batch dict to the fused subject + context feature ``h``.

CCIM sits after a host model's fused feature and before its classifier (docs/concepts/ccim.md, "From the
adjustment to a layer").
Any ``nn.Module`` with ``forward(batch) -> (B, feature_dim)`` and a ``feature_dim`` attribute can be a host;
the classes here are ready-made ones:

* :class:`TwoStreamHost`: a subject stream and a context stream, pooled, concatenated, fused (tiny CNNs by default,
  for demos and tests).
* :class:`EmotNet`: EMOTIC's two-stream baseline (body + image, ``d_h = 256``), the host of most of the paper's
  experiments.
* :class:`CAERNet`: CAER-Net-S (face + face-masked context with spatial attention, adaptive fusion, ``d_h = 128``).

Every stream is a timm model chosen by name (or ``"small_cnn"``), created without a classifier and filled from an
optional local checkpoint through :func:`~ccim_lightning.weights.load_pretrained_weights` (timm/torchvision state
dicts and the Places365 release format). All hosts read the suite's batch schema: ``batch["subject"]`` (the body or
face crop) and ``batch["context"]`` (the whole image with the subject masked out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ccim_lightning.types import CONTEXT, SUBJECT, Batch
from ccim_lightning.weights import load_pretrained_weights

__all__ = [
    "AdaptiveFusion",
    "CAERNet",
    "EmotNet",
    "SpatialAttentionPool",
    "TwoStreamHost",
    "build_encoder",
    "encoder_dim",
    "small_cnn",
]

SMALL_CNN = "small_cnn"


def small_cnn(channels: tuple[int, ...] = (32, 64, 96, 128), pooled: bool = True) -> nn.Module:
    """A four-block strided CNN: fast enough to train on a laptop CPU.

    timm's smallest ImageNet models are several times slower per sample on 64-pixel inputs, which would put the
    demo over its time budget; real runs pick a timm encoder by name instead.

    Args:
        channels: Output channels of each stride-2 conv block.
        pooled: Globally average-pool the last feature map; False keeps it (for hosts that pool it themselves).

    Returns:
        A module mapping (B, 3, H, W) images to (B, channels[-1]) features, or to (B, channels[-1], H/16, W/16)
        feature maps when not ``pooled``, with ``num_features`` set.
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
    if pooled:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    encoder = nn.Sequential(*layers)
    encoder.num_features = in_channels
    return encoder


def build_encoder(name: str, weights: str | None = None, pooled: bool = True) -> nn.Module:
    """Builds an image encoder: the built-in tiny CNN or any timm model, without its classifier.

    Args:
        name: ``"small_cnn"`` for the built-in tiny CNN, otherwise any timm model name. The model is created with
            ``num_classes=0``, so its output is the last stage (plus the model's own pre-logits head, if any).
        weights: Optional local checkpoint (timm/torchvision state dict or the Places365 release format), loaded
            with :func:`~ccim_lightning.weights.load_pretrained_weights`; the file's classifier is not loaded.
        pooled: Globally pool the output to (B, C). False keeps the spatial map (B, C, h, w) (timm
            ``global_pool=""``); that needs a convolutional model (a vision transformer returns tokens instead).

    Returns:
        The encoder; :func:`encoder_dim` gives the width C of its output.
    """
    if name == SMALL_CNN:
        encoder = small_cnn(pooled=pooled)
    else:
        import timm

        kwargs = {} if pooled else {"global_pool": ""}
        encoder = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if weights is not None:
        load_pretrained_weights(encoder, weights)
    return encoder


def encoder_dim(encoder: nn.Module) -> int:
    """Width of what an encoder from :func:`build_encoder` returns (its channels when not pooled).

    timm's ``num_features`` is the width of ``forward_features``; models with a pre-logits head (MobileNetV3's 1x1
    conv, for instance) output ``head_hidden_size`` channels instead, so that is read first.
    """
    # getattr: timm defines head_hidden_size on some models only, and the encoder may be any module
    width = getattr(encoder, "head_hidden_size", None) or getattr(encoder, "num_features", None)
    if not width:
        raise ValueError(
            f"Cannot tell the output width of the encoder {type(encoder).__name__}: it has no `num_features` (or "
            "`head_hidden_size`) attribute. Set one on the module."
        )
    return int(width)


def _fusion_block(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear (no bias: the norm follows) + BatchNorm1d + ReLU: how the hosts fuse their streams into ``h``."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


class TwoStreamHost(nn.Module):
    """A subject stream and a context stream, pooled, concatenated and fused into ``h``.

    The subject stream sees ``batch["subject"]`` (the body or face crop); the context stream sees
    ``batch["context"]`` (the whole image with the subject masked out). Their pooled features are concatenated
    and fused by Linear + BatchNorm1d + ReLU into ``feature_dim`` (the ``d_h`` of docs/concepts/ccim.md).

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
        joint_dim = encoder_dim(self.subject_encoder) + encoder_dim(self.context_encoder)
        self.fusion = _fusion_block(joint_dim, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        """Maps a batch to the fused feature ``h`` of shape (B, feature_dim)."""
        subject = self.subject_encoder(batch[SUBJECT])
        context = self.context_encoder(batch[CONTEXT])
        return self.fusion(torch.cat([subject, context], dim=1))


class EmotNet(TwoStreamHost):
    """EMOT-Net, EMOTIC's two-stream baseline (Kosti et al.) and the paper's main host (``d_h = 256``).

    A body stream over the subject crop (``batch["subject"]``) and an image stream over the context
    (``batch["context"]``), each a timm encoder (ResNet-18 by default), globally pooled, concatenated and fused by
    Linear + BatchNorm1d + ReLU into ``h``. The original's classifier is replaced by the CCIM head (or the baseline
    head with ``attention: none``). The arguments keep the suite's stream names (subject = body, context = image),
    so command-line overrides read the same for every host.

    Args:
        subject_encoder: timm model name of the body stream (or ``"small_cnn"``).
        context_encoder: timm model name of the image stream (or ``"small_cnn"``).
        feature_dim: Width of ``h`` (256 in the paper).
        subject_weights: Optional local checkpoint for the body stream (e.g. an ImageNet ResNet-18).
        context_weights: Optional local checkpoint for the image stream (e.g. ``resnet18_places365.pth.tar``).
    """

    def __init__(
        self,
        subject_encoder: str = "resnet18",
        context_encoder: str = "resnet18",
        feature_dim: int = 256,
        subject_weights: str | None = None,
        context_weights: str | None = None,
    ) -> None:
        super().__init__(subject_encoder, context_encoder, feature_dim, subject_weights, context_weights)


class SpatialAttentionPool(nn.Module):
    """Pools a feature map with a learned spatial attention map (CAER-Net's context attention).

    Two 3x3 convolutions score every position; a softmax over the positions turns the scores into an attention
    map, and the feature map is summed under it, so the pooled feature follows the salient context regions.

    Args:
        channels: Channels of the feature map.
        hidden_dim: Channels of the first scoring convolution.
    """

    def __init__(self, channels: int, hidden_dim: int = 128) -> None:
        super().__init__()
        self.score = nn.Sequential(
            nn.Conv2d(channels, hidden_dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, 1, kernel_size=3, padding=1),
        )

    def attention(self, maps: torch.Tensor) -> torch.Tensor:
        """The attention map (B, h, w) of feature maps (B, C, h, w); each map sums to one."""
        scores = self.score(maps).flatten(1)
        weights = torch.softmax(scores, dim=1, dtype=torch.promote_types(scores.dtype, torch.float32))
        return weights.view(maps.shape[0], *maps.shape[2:])

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Pools feature maps (B, C, h, w) to (B, C) under their attention map."""
        return torch.einsum("bhw,bchw->bc", self.attention(maps).to(maps.dtype), maps)


class AdaptiveFusion(nn.Module):
    """CAER-Net's adaptive fusion: learned per-sample weights of the streams, softmax-normalised across them.

    Each stream's feature is scored by its own small MLP (Linear + ReLU + Linear to one value); a softmax over the
    streams gives their weights; the weighted features are concatenated and fused by Linear + BatchNorm1d + ReLU.

    Args:
        stream_dims: Width of each stream's feature.
        out_dim: Width of the fused feature.
        hidden_dim: Hidden width of the scoring MLPs.
    """

    def __init__(self, stream_dims: Sequence[int], out_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        if len(stream_dims) < 2:
            raise ValueError(f"AdaptiveFusion needs at least two streams, got stream_dims={list(stream_dims)}")
        self.scorers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 1))
            for dim in stream_dims
        )
        self.fusion = _fusion_block(sum(stream_dims), out_dim)

    def stream_weights(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weights (B, S) of the S streams' features (each (B, C_s)); each row sums to one."""
        if len(features) != len(self.scorers):
            raise ValueError(f"AdaptiveFusion has {len(self.scorers)} streams, got {len(features)} features")
        scores = torch.cat([scorer(feature) for scorer, feature in zip(self.scorers, features)], dim=1)
        return torch.softmax(scores, dim=1, dtype=torch.promote_types(scores.dtype, torch.float32))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuses the streams' features (each (B, C_s)) into (B, out_dim)."""
        weights = self.stream_weights(features)
        weighted = [feature * weights[:, i : i + 1].to(feature.dtype) for i, feature in enumerate(features)]
        return self.fusion(torch.cat(weighted, dim=1))


class CAERNet(nn.Module):
    """CAER-Net-S (Lee et al., ICCV 2019), the paper's image host for CAER-S (``d_h = 128``).

    A face stream over the subject crop (``batch["subject"]``, the face in CAER-S), globally pooled, and a context
    stream over the face-masked image (``batch["context"]``) whose feature map is pooled under a learned spatial
    attention map (:class:`SpatialAttentionPool`), merged by adaptive fusion (:class:`AdaptiveFusion`) into ``h``.
    The streams are timm encoders by name (ResNet-18 by default); the context stream must be convolutional (it
    is built with ``global_pool=""`` and must return a (B, C, h, w) map), any timm CNN works. The original's own
    five-layer CNNs are close to ``"small_cnn"``.

    Args:
        subject_encoder: timm model name of the face stream (or ``"small_cnn"``).
        context_encoder: timm CNN name of the context stream (or ``"small_cnn"``).
        feature_dim: Width of ``h`` (128 in the paper).
        subject_weights: Optional local checkpoint for the face stream.
        context_weights: Optional local checkpoint for the context stream (e.g. ``resnet18_places365.pth.tar``).
        attention_dim: Hidden channels of the spatial attention's scoring convolution.
        fusion_hidden_dim: Hidden width of the adaptive fusion's scoring MLPs.
    """

    def __init__(
        self,
        subject_encoder: str = "resnet18",
        context_encoder: str = "resnet18",
        feature_dim: int = 128,
        subject_weights: str | None = None,
        context_weights: str | None = None,
        attention_dim: int = 128,
        fusion_hidden_dim: int = 128,
    ) -> None:
        super().__init__()
        self.context_encoder_name = context_encoder
        self.subject_encoder = build_encoder(subject_encoder, subject_weights)
        self.context_encoder = build_encoder(context_encoder, context_weights, pooled=False)
        subject_dim, context_dim = encoder_dim(self.subject_encoder), encoder_dim(self.context_encoder)
        self.context_attention = SpatialAttentionPool(context_dim, attention_dim)
        self.fusion = AdaptiveFusion((subject_dim, context_dim), feature_dim, fusion_hidden_dim)
        self.feature_dim = feature_dim

    def context_maps(self, context: torch.Tensor) -> torch.Tensor:
        """The context stream's feature maps (B, C, h, w) of context images (B, 3, H, W)."""
        maps = self.context_encoder(context)
        if maps.ndim != 4:
            raise ValueError(
                f"CAERNet's context encoder {self.context_encoder_name!r} returned a {tuple(maps.shape)} tensor, not "
                "a (B, C, h, w) feature map: the spatial attention needs a convolutional timm model (a ResNet, "
                "EfficientNet, ConvNeXt...), not a transformer that returns tokens."
            )
        return maps

    def attention_map(self, batch: Batch) -> torch.Tensor:
        """The context attention map (B, h, w) for a batch (for inspection); each map sums to one."""
        return self.context_attention.attention(self.context_maps(batch[CONTEXT]))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Maps a batch to the fused feature ``h`` of shape (B, feature_dim)."""
        face = self.subject_encoder(batch[SUBJECT])
        context = self.context_attention(self.context_maps(batch[CONTEXT]))
        return self.fusion([face, context])
