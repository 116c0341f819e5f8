"""Tests for ccim_lightning.hosts: shapes, gradients, attention and fusion weights, local weight files."""

import pytest
import timm
import torch

from ccim_lightning import CCIMLightningModule
from ccim_lightning.hosts import (
    AdaptiveFusion,
    CAERNet,
    EmotNet,
    SpatialAttentionPool,
    TwoStreamHost,
    build_encoder,
    encoder_dim,
    small_cnn,
)
from ccim_lightning.weights import WeightsFileError, WeightsMismatchError


def batch(size=2, subject=32, context=64):
    generator = torch.Generator().manual_seed(0)
    return {
        "subject": torch.randn(size, 3, subject, subject, generator=generator),
        "context": torch.randn(size, 3, context, context, generator=generator),
    }


HOSTS = {
    "two_stream_small_cnn": lambda: TwoStreamHost(feature_dim=32),
    "emotnet_timm": lambda: EmotNet(subject_encoder="test_resnet", context_encoder="test_efficientnet"),
    "caernet_timm": lambda: CAERNet(subject_encoder="test_efficientnet", context_encoder="test_resnet"),
    "caernet_small_cnn": lambda: CAERNet(subject_encoder="small_cnn", context_encoder="small_cnn", feature_dim=48),
}
FEATURE_DIMS = {"two_stream_small_cnn": 32, "emotnet_timm": 256, "caernet_timm": 128, "caernet_small_cnn": 48}


@pytest.mark.parametrize("name", list(HOSTS))
def test_hosts_map_a_batch_to_feature_dim_and_train_both_streams(name):
    torch.manual_seed(0)
    host = HOSTS[name]()
    assert host.feature_dim == FEATURE_DIMS[name]
    h = host(batch())
    assert h.shape == (2, host.feature_dim) and h.dtype == torch.float32
    (h * torch.randn_like(h)).sum().backward()
    for stream in (host.subject_encoder, host.context_encoder):
        grads = [p.grad for p in stream.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    # every parameter takes part (DDP would otherwise need find_unused_parameters)
    assert all(p.grad is not None for p in host.parameters())


def test_paper_defaults_are_resnet18_streams_with_the_papers_feature_dims():
    emotnet, caernet = EmotNet(), CAERNet()
    assert emotnet.feature_dim == 256 and caernet.feature_dim == 128
    for host in (emotnet, caernet):
        assert host.subject_encoder.default_cfg["architecture"] == "resnet18"
        assert host.context_encoder.default_cfg["architecture"] == "resnet18"
    # EMOT-Net pools both streams; CAER-Net keeps the context map for its attention
    assert emotnet.context_encoder(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    assert caernet.context_encoder(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_emotnet_is_a_two_stream_host_and_the_module_reads_its_feature_dim():
    host = EmotNet(subject_encoder="small_cnn", context_encoder="small_cnn", feature_dim=24)
    assert isinstance(host, TwoStreamHost)
    module = CCIMLightningModule(host, num_classes=3, num_prototypes=4, confounder_dim=8, attention="none")
    assert module.head.feature_dim == 24
    assert module(batch()).shape == (2, 3)


def test_encoder_width_follows_the_pre_logits_head_of_timm_models():
    # MobileNetV3 has a 1x1 conv after the pooling: its output is head_hidden_size wide, not num_features
    host = TwoStreamHost(subject_encoder="mobilenetv3_small_050", context_encoder="small_cnn", feature_dim=16)
    assert encoder_dim(host.subject_encoder) == 1024 != host.subject_encoder.num_features
    assert host(batch()).shape == (2, 16)


def test_unpooled_encoders_return_feature_maps():
    assert build_encoder("small_cnn", pooled=False)(torch.randn(1, 3, 64, 64)).shape == (1, 128, 4, 4)
    assert build_encoder("test_resnet", pooled=False)(torch.randn(1, 3, 64, 64)).shape == (1, 96, 2, 2)
    assert small_cnn(channels=(8, 16))(torch.randn(1, 3, 16, 16)).shape == (1, 16)


def test_spatial_attention_pools_under_a_normalised_map():
    pool = SpatialAttentionPool(channels=6, hidden_dim=4)
    maps = torch.randn(3, 6, 5, 7)
    attention = pool.attention(maps)
    assert attention.shape == (3, 5, 7)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(3))
    assert (attention >= 0).all()
    expected = (maps * attention[:, None]).sum(dim=(2, 3))
    torch.testing.assert_close(pool(maps), expected)


def test_caernet_attention_map_is_per_context_position():
    host = CAERNet(subject_encoder="small_cnn", context_encoder="small_cnn").eval()
    attention = host.attention_map(batch(context=64))
    assert attention.shape == (2, 4, 4)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(2))


def test_adaptive_fusion_weights_are_a_softmax_over_the_streams():
    fusion = AdaptiveFusion((5, 3), out_dim=4, hidden_dim=6).eval()
    features = [torch.randn(8, 5), torch.randn(8, 3)]
    weights = fusion.stream_weights(features)
    assert weights.shape == (8, 2)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(8))
    scores = torch.cat([scorer(f) for scorer, f in zip(fusion.scorers, features)], dim=1)
    torch.testing.assert_close(weights, scores.softmax(dim=1))
    weighted = torch.cat([features[0] * weights[:, :1], features[1] * weights[:, 1:]], dim=1)
    torch.testing.assert_close(fusion(features), fusion.fusion(weighted))
    with pytest.raises(ValueError, match="at least two streams"):
        AdaptiveFusion((5,), out_dim=4)


def test_caernet_rejects_a_context_encoder_without_feature_maps():
    host = CAERNet(subject_encoder="small_cnn", context_encoder="test_vit")
    with pytest.raises(ValueError, match="test_vit.*convolutional"):
        host(batch(context=64))


# --- weights ----------------------------------------------------------------------------------------------------------
def timm_state_dict(path, arch="test_resnet", num_classes=10):
    """A timm/torchvision-style file: the model's plain state dict, classifier included."""
    state = timm.create_model(arch, num_classes=num_classes).state_dict()
    torch.save(state, path)
    return state


def places365_file(path, arch="test_resnet"):
    """The CSAIL Places365 release layout: checkpoint dict, DataParallel keys, 365-way fc, no num_batches_tracked."""
    state = {
        k: v
        for k, v in timm.create_model(arch, num_classes=365).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    torch.save({"epoch": 90, "arch": arch, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


def assert_loaded(encoder, reference):
    compared = 0
    for key, value in encoder.state_dict().items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
        compared += 1
    assert compared > 10


@pytest.mark.parametrize("host_class", [EmotNet, CAERNet])
def test_streams_load_timm_state_dicts_and_places365_checkpoints(tmp_path, host_class):
    torch.manual_seed(1)
    subject = timm_state_dict(tmp_path / "subject.pth")
    torch.manual_seed(2)
    context = places365_file(tmp_path / "resnet_places365.pth.tar")
    host = host_class(
        subject_encoder="test_resnet",
        context_encoder="test_resnet",
        subject_weights=str(tmp_path / "subject.pth"),
        context_weights=str(tmp_path / "resnet_places365.pth.tar"),
    )
    assert_loaded(host.subject_encoder, subject)
    assert_loaded(host.context_encoder, context)  # CAERNet: the unpooled context stream has the same keys


def test_small_cnn_weights_round_trip(tmp_path):
    source = TwoStreamHost(feature_dim=8)
    torch.save(source.subject_encoder.state_dict(), tmp_path / "small.pth")
    host = CAERNet(
        subject_encoder="small_cnn", context_encoder="small_cnn", context_weights=str(tmp_path / "small.pth")
    )
    assert_loaded(host.context_encoder, source.subject_encoder.state_dict())


def test_wrong_weight_files_are_errors_that_name_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(WeightsFileError, match="notes.txt"):
        EmotNet(subject_encoder="test_resnet", context_encoder="small_cnn", subject_weights=str(text))
    timm_state_dict(tmp_path / "efficientnet.pth", arch="test_efficientnet")
    with pytest.raises(WeightsMismatchError, match="efficientnet.pth"):
        CAERNet(
            subject_encoder="small_cnn",
            context_encoder="test_resnet",
            context_weights=str(tmp_path / "efficientnet.pth"),
        )
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        EmotNet(subject_encoder="small_cnn", context_encoder="small_cnn", context_weights=str(tmp_path / "missing.pth"))
