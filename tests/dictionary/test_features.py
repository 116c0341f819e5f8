"""Tests for ccim_lightning.dictionary.features: a frozen timm scene CNN, random or from a local weights file."""

import hashlib
import logging

import pytest
import timm
import torch

from ccim_lightning.dictionary.features import (
    ContextFeatureExtractor,
    ContextFeatures,
    dictionary_loader,
    extract_context_features,
    own_rows,
)


@pytest.fixture(scope="module")
def places_file(tmp_path_factory):
    """A Places365-style checkpoint (of a tiny ResNet) and the reference model it was written from."""
    reference = timm.create_model("test_resnet", num_classes=365).eval()
    # Non-trivial BatchNorm statistics, so that a missed buffer would change the output.
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "test_resnet_places365.pth.tar"
    state = {f"module.{k}": v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 90, "arch": "test_resnet", "state_dict": state, "best_prec1": 54.74}, path)
    return path, reference


def test_random_init_shape_name_digest_and_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ccim_lightning.dictionary.features"):
        extractor = ContextFeatureExtractor("test_resnet")
    assert "random weights" in caplog.text and "Places365" in caplog.text
    assert extractor.weights_digest == "random-init:test_resnet"
    assert extractor.weights_path is None
    assert extractor.name == "test_resnet"
    assert extractor.num_features == timm.create_model("test_resnet", num_classes=0).num_features

    with torch.no_grad():
        features = extractor(torch.randn(3, 3, 32, 32))
    assert features.shape == (3, extractor.num_features)
    assert features.dtype == torch.float32


def test_num_features_is_the_output_width_when_a_pre_logits_layer_follows_the_last_stage():
    extractor = ContextFeatureExtractor("test_mambaout")
    assert extractor.num_features != extractor.model.num_features
    with torch.no_grad():
        assert extractor(torch.randn(1, 3, 32, 32)).shape == (1, extractor.num_features)


def test_random_init_is_the_same_network_whatever_the_global_seed():
    torch.manual_seed(1)
    first = ContextFeatureExtractor("test_resnet")
    torch.manual_seed(2)
    second = ContextFeatureExtractor("test_resnet")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_stays_frozen_in_eval_mode():
    extractor = ContextFeatureExtractor("test_resnet")
    assert not extractor.training
    assert all(not p.requires_grad for p in extractor.parameters())

    parent = torch.nn.Sequential(extractor)
    parent.train()
    extractor.train(True)
    extractor.requires_grad_(True)
    extractor.train()

    assert not extractor.training
    assert all(not m.training for m in extractor.modules())
    assert all(not p.requires_grad for p in extractor.parameters())
    features = extractor(torch.randn(2, 3, 32, 32))  # no no_grad here: nothing to differentiate anyway
    assert not features.requires_grad
    # Eval mode: BatchNorm uses running statistics, so a sample's features do not depend on the batch.
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(extractor(images)[:1], extractor(images[:1]), rtol=1e-4, atol=1e-5)


def test_places_weights_reproduce_the_reference_model(places_file):
    path, reference = places_file
    extractor = ContextFeatureExtractor("test_resnet", weights=path)

    assert extractor.weights_digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.weights_path == str(path)
    assert extractor.num_features == reference.num_features
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
        got = extractor(images)
    torch.testing.assert_close(got, expected)
    random_features = ContextFeatureExtractor("test_resnet")(images)
    assert not torch.allclose(random_features, got)


def test_inference_mode_autocast_and_channels_last(places_file):
    path, _ = places_file
    extractor = ContextFeatureExtractor("test_resnet", weights=path)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        plain = extractor(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = extractor(images)
        extractor.to(memory_format=torch.channels_last)
        channels_last = extractor(images.contiguous(memory_format=torch.channels_last))

    assert mixed.dtype == torch.float32 and channels_last.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0.1, atol=0.1)
    torch.testing.assert_close(channels_last, plain, rtol=1e-4, atol=1e-4)


def test_data_config_and_model_kwargs():
    extractor = ContextFeatureExtractor("test_resnet", global_pool="max")
    config = extractor.data_config
    assert set(config) >= {"input_size", "mean", "std", "interpolation"}
    assert len(config["mean"]) == 3 and len(config["std"]) == 3
    assert extractor.name == "test_resnet(global_pool='max')"
    with pytest.raises(ValueError, match="num_classes=0"):
        ContextFeatureExtractor("test_resnet", num_classes=10)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        ContextFeatureExtractor("test_resnet", weights=tmp_path / "resnet152_places365.pth.tar")


def test_own_rows_drop_the_sampler_padding_and_keep_every_sample_once():
    from torch.utils.data.distributed import DistributedSampler

    # 5 samples over 2 ranks: the sampler gives rank 0 samples 0, 2, 4 and rank 1 samples 1, 3 and a repeat of 0.
    shards = [list(DistributedSampler(range(5), num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3, 0]]
    kept = []
    for rank, shard in enumerate(shards):
        index = torch.tensor(shard)
        local = ContextFeatures(index[:, None].float(), index, targets=index * 10)
        own = own_rows(local, world_size=2, rank=rank)
        assert torch.equal(own.targets, own.indices * 10) and torch.equal(own.features[:, 0].long(), own.indices)
        kept += own.indices.tolist()
    assert sorted(kept) == [0, 1, 2, 3, 4]


def test_own_rows_with_unequal_shards():
    # Rank 1 lost sample 3 to a decode failure: its shard is [1, 0(repeat)], rank 0's is [0, 2, 4].
    local = ContextFeatures(torch.zeros(2, 1), torch.tensor([1, 0]))
    assert own_rows(local, world_size=2, rank=1).indices.tolist() == [1]


def test_in_index_order_keeps_the_first_row_of_each_sample():
    # Sample 2 appears twice (a padding repeat): the first of its rows is kept, and rows come back sorted by index.
    local = ContextFeatures(torch.tensor([[20.0], [0.0], [21.0], [10.0]]), torch.tensor([2, 0, 2, 1]))
    ordered = local.in_index_order()
    assert ordered.indices.tolist() == [0, 1, 2] and ordered.features[:, 0].tolist() == [0.0, 10.0, 20.0]


def test_extraction_gives_every_sample_its_own_features_and_target():
    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {
                "context": torch.full((3, 32, 32), float(i)),
                "index": torch.tensor(i),
                "target": torch.tensor(i % 2),
            }

    extractor = ContextFeatureExtractor("test_efficientnet")
    loader = dictionary_loader(Samples(), batch_size=2, num_workers=0)
    features = extract_context_features(extractor, loader, torch.device("cpu"), progress=False)
    assert features.indices.tolist() == [0, 1, 2, 3, 4] and features.targets.tolist() == [0, 1, 0, 1, 0]
    assert features.scenes is None
    with torch.no_grad():  # reference: the network on each image alone
        alone = torch.cat([extractor(Samples()[i]["context"][None]) for i in range(5)])
    torch.testing.assert_close(features.features, alone, atol=1e-5, rtol=1e-5)
