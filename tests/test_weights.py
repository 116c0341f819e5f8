"""Tests for ccim_lightning.weights: every checkpoint layout is written here from small random models."""

import argparse
import builtins
import hashlib
import logging
import os
import pickle
import struct
import zipfile

import pytest
import timm
import torch
import torchvision

from ccim_lightning.weights import (
    LoadedWeights,
    UnsafeWeightsError,
    WeightsFileError,
    WeightsMismatchError,
    file_digest,
    load_pretrained_weights,
)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_state_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    state = model.state_dict()
    compared = 0
    for key, value in state.items():
        if key.startswith(skip) or key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
        compared += 1
    assert compared > 0


def _places_style_file(path, *, legacy: bool = False, arch: str = "test_resnet") -> dict[str, torch.Tensor]:
    """A file laid out like the CSAIL Places365 release: DataParallel keys, 365-way fc, no num_batches_tracked."""
    source = timm.create_model(arch, num_classes=365)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    checkpoint = {
        "epoch": 90,
        "arch": arch,
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "best_prec1": 54.74,
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return state


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_places365_checkpoint_into_feature_extractor(tmp_path, legacy):
    path = tmp_path / "resnet18_places365.pth.tar"
    reference = _places_style_file(path, legacy=legacy, arch="resnet18")
    model = timm.create_model("resnet18", num_classes=0)

    info = load_pretrained_weights(model, path)

    _assert_state_equal(model, reference)
    assert isinstance(info, LoadedWeights)
    assert info.format == "checkpoint['state_dict']"
    assert info.stripped_prefix == "module."
    assert set(info.dropped_keys) == {"fc.weight", "fc.bias"}
    assert info.num_loaded == len(reference) - 2
    assert info.digest == _sha256(path)
    assert info.missing_keys == () and info.unexpected_keys == ()


def test_torchvision_state_dict_into_timm_model_with_classifier(tmp_path):
    source = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model("resnet18", num_classes=1000)

    info = load_pretrained_weights(model, path, ignore_classifier=False)

    _assert_state_equal(model, source.state_dict())
    assert info.format == "state_dict"
    assert info.stripped_prefix is None
    assert info.dropped_keys == ()


def test_ignore_classifier_keeps_the_models_own_head(tmp_path):
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model("test_resnet", num_classes=7)
    head_before = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}

    load_pretrained_weights(model, path)

    _assert_state_equal(model, source.state_dict(), skip=("fc.",))
    for key, value in model.get_classifier().state_dict().items():
        torch.testing.assert_close(value, head_before[key], rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model", "module", "nested"])
def test_timm_test_model_state_dict_in_any_wrapper(tmp_path, wrapper):
    source = timm.create_model("test_resnet", num_classes=5)
    state = source.state_dict()
    if wrapper == "nested":
        payload, expected_format = {"model": {"state_dict": state}, "step": 3}, "checkpoint['model']['state_dict']"
    else:
        payload, expected_format = {wrapper: state, "optimizer": {"lr": 0.1}}, f"checkpoint[{wrapper!r}]"
    path = tmp_path / "test_resnet.ckpt"
    torch.save(payload, path)
    model = timm.create_model("test_resnet", num_classes=5)

    info = load_pretrained_weights(model, path, ignore_classifier=False)

    _assert_state_equal(model, state)
    assert info.format == expected_format
    assert info.num_loaded == len(state)


def test_plain_timm_test_model_state_dict_with_head_fc(tmp_path):
    source = timm.create_model("test_convnext", num_classes=4)
    path = tmp_path / "test_convnext.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model("test_convnext", num_classes=0)

    info = load_pretrained_weights(model, path)

    _assert_state_equal(model, source.state_dict())
    assert info.format == "state_dict"
    assert set(info.dropped_keys) == {"head.fc.weight", "head.fc.bias"}


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    model = timm.create_model("test_resnet", num_classes=0)

    with pytest.raises(WeightsMismatchError) as excinfo:
        load_pretrained_weights(model, path)

    message = str(excinfo.value)
    assert str(path) in message
    n_missing = len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    assert f"{n_missing} missing keys" in message
    assert "unexpected keys" in message
    assert "conv1.0.weight" in message and "patch_embed.proj.weight" in message
    assert "more)" in message  # long lists are cut


def test_shape_mismatch_names_key_and_shapes_even_when_not_strict(tmp_path):
    model = timm.create_model("test_resnet", num_classes=0)
    state = model.state_dict()
    state["conv1.0.weight"] = torch.zeros(16, 3, 5, 5)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)

    for strict in (True, False):
        with pytest.raises(
            WeightsMismatchError, match=r"conv1\.0\.weight: expected \[16, 3, 3, 3\], got \[16, 3, 5, 5\]"
        ):
            load_pretrained_weights(model, path, strict=strict)


def test_classifier_is_checked_when_not_ignored(tmp_path):
    path = tmp_path / "places.pth.tar"
    _places_style_file(path)
    width = timm.create_model("test_resnet").num_features

    with pytest.raises(WeightsMismatchError, match=r"unexpected keys .*fc\.weight"):
        load_pretrained_weights(timm.create_model("test_resnet", num_classes=0), path, ignore_classifier=False)
    with pytest.raises(WeightsMismatchError, match=rf"fc\.weight: expected \[10, {width}\], got \[365, {width}\]"):
        load_pretrained_weights(timm.create_model("test_resnet", num_classes=10), path, ignore_classifier=False)


def test_non_strict_loads_what_fits_and_reports_the_rest(tmp_path, caplog):
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    del state["layer4.0.bn2.weight"]
    state["extra.weight"] = torch.ones(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = timm.create_model("test_resnet", num_classes=0)

    with pytest.raises(WeightsMismatchError, match=r"1 missing keys .*layer4\.0\.bn2\.weight"):
        load_pretrained_weights(model, path)
    with caplog.at_level(logging.WARNING, logger="ccim_lightning.weights"):
        info = load_pretrained_weights(model, path, strict=False)

    assert info.missing_keys == ("layer4.0.bn2.weight",)
    assert info.unexpected_keys == ("extra.weight",)
    torch.testing.assert_close(model.conv1[0].weight, state["conv1.0.weight"], rtol=0, atol=0)
    assert "non-strictly" in caplog.text


def test_missing_file_says_it_cannot_be_downloaded(tmp_path):
    path = tmp_path / "resnet152_places365.pth.tar"
    with pytest.raises(FileNotFoundError, match="cannot be downloaded") as excinfo:
        load_pretrained_weights(timm.create_model("test_resnet"), path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("kind", ["text", "truncated", "empty", "flipped", "legacy_truncated"])
def test_unreadable_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    state = timm.create_model("test_resnet").state_dict()
    match = "not a PyTorch file, or it is damaged"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:1000])
        match = "is a truncated or damaged zip archive"
    elif kind == "flipped":  # bytes changed inside the last tensor's data: torch.load alone reads them silently
        torch.save(state, path)
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as archive:
            member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.header_offset)
        name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
        start = member.header_offset + 30 + name_length + extra_length
        data[start : start + 4] = b"\x7f\x7f\x7f\x7f"
        path.write_bytes(bytes(data))
        match = r"is damaged: the CRC-32 of its entry '.*' does not match"
    elif kind == "legacy_truncated":
        torch.save(state, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(b"")

    with pytest.raises(WeightsFileError, match=match) as excinfo:
        load_pretrained_weights(timm.create_model("test_resnet"), path)
    assert str(path) in str(excinfo.value)
    assert not isinstance(excinfo.value, UnsafeWeightsError) and "Refused" not in str(excinfo.value)


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


class _Evaluates:
    def __reduce__(self):
        return (builtins.eval, ("1 + 1",))


@pytest.mark.parametrize(
    ("payload", "name", "layout"),
    [
        (_RunsShell(), f"{os.system.__module__}.system", "zip"),
        (_Evaluates(), "builtins.eval", "zip"),
        (_RunsShell(), f"{os.system.__module__}.system", "legacy"),
        (_RunsShell(), f"{os.system.__module__}.system", "raw_pickle"),
    ],
    ids=["os.system", "eval", "legacy-format", "raw-pickle"],
)
def test_malicious_file_is_refused_as_unsafe_not_damaged(tmp_path, monkeypatch, payload, name, layout):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    content = {"state_dict": timm.create_model("test_resnet").state_dict(), "extra": payload}
    if layout == "raw_pickle":
        path.write_bytes(pickle.dumps(content, protocol=5))
    else:
        torch.save(content, path, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(UnsafeWeightsError) as excinfo:
        load_pretrained_weights(timm.create_model("test_resnet"), path)
    message = str(excinfo.value)
    assert message.startswith(f"Refused weights file '{path}'") and name in message
    assert "trusted sources" in message and "damaged" not in message
    assert not (tmp_path / "pwned.txt").exists()  # nothing ran


def test_file_without_a_state_dict(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "resnet18"}, path)
    with pytest.raises(WeightsFileError, match=r"holds a dict with keys \['epoch', 'arch'\], not a state dict"):
        load_pretrained_weights(timm.create_model("test_resnet"), path)


def test_pickled_objects_need_trust(tmp_path):
    source = timm.create_model("test_resnet")
    path = tmp_path / "with_args.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": source.state_dict()}, path)

    with pytest.raises(WeightsFileError, match="trust_pickle=True") as excinfo:
        load_pretrained_weights(timm.create_model("test_resnet"), path)
    assert "argparse.Namespace" in str(excinfo.value)

    model = timm.create_model("test_resnet")
    info = load_pretrained_weights(model, path, trust_pickle=True, ignore_classifier=False)
    _assert_state_equal(model, source.state_dict())
    assert info.format == "checkpoint['state_dict']"


def test_file_digest_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 5000)
    assert file_digest(path) == _sha256(path)
    assert file_digest(path, chunk_size=7) == _sha256(path)
