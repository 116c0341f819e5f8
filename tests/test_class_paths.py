"""A checkpoint's stored settings never choose what gets imported: the user's config or the allow-list does."""

import sys
from pathlib import Path

import pytest
import torch

from ccim_lightning.class_paths import UntrustedClassPathError, check_class_paths, class_paths, is_allowed
from ccim_lightning.commands.cli import build_cli
from ccim_lightning.inference.predictor import Predictor

CONFIGS = Path(__file__).parents[1] / "configs"

SHIPPED = {
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
    "_class_path": "ccim_lightning.CCIMLightningModule",
    "backbone": {"class_path": "ccim_lightning.hosts.TwoStreamHost", "init_args": {"weights": "weights/test.pth"}},
    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
    "class_names": ["happy", "sad"],
}


def test_what_ccim_fit_writes_passes_without_a_config():
    check_class_paths({"hyper_parameters": SHIPPED}, source="run.ckpt")
    assert is_allowed("torch") and is_allowed("ccim_lightning.debias.GroupDRO")
    assert not is_allowed("torchvision_evil.X") and not is_allowed("ccim_lightning_evil.X")


def test_a_foreign_class_path_is_refused_naming_where_it_sits_and_both_rules():
    stored = {"hyper_parameters": {**SHIPPED, "backbone": {"class_path": "os.system", "init_args": {}}}}
    with pytest.raises(UntrustedClassPathError) as error:
        check_class_paths(stored, source="evil.ckpt", user_config={"class_path": "ccim_lightning.CCIMLightningModule"})
    message = str(error.value)
    assert "Refused checkpoint 'evil.ckpt'" in message
    assert "hyper_parameters['backbone']['class_path'] = 'os.system'" in message
    assert "neither your config nor the allow-list (ccim_lightning.*, torch.*)" in message
    assert "\n" not in message  # one line


def test_the_users_config_allows_its_own_classes():
    stored = {"hyper_parameters": {**SHIPPED, "backbone": {"class_path": "json.JSONDecoder"}}}
    with pytest.raises(UntrustedClassPathError, match="none was given"):
        check_class_paths(stored, source="x.ckpt")
    check_class_paths(
        stored, source="x.ckpt", user_config={"init_args": {"backbone": {"class_path": "json.JSONDecoder"}}}
    )


def test_shorthand_strings_and_lightning_instantiators_count_too():
    # jsonargparse imports a dotted string where a class or callable is expected; Lightning imports _instantiator.
    with pytest.raises(UntrustedClassPathError, match=r"\['debias'\] = 'json\.JSONDecoder'"):
        check_class_paths({"hyper_parameters": {"debias": "json.JSONDecoder"}}, source="x.ckpt")
    with pytest.raises(UntrustedClassPathError, match=r"\['_instantiator'\] = 'subprocess\.run'"):
        check_class_paths({"hyper_parameters": {"_instantiator": "subprocess.run"}}, source="x.ckpt")
    # plain strings that name no importable package, and file names, are not class paths
    assert list(class_paths({"a": "resnet50.a1_in1k", "b": "val/loss", "c": "dot_product"}, "h")) == []


def test_datamodule_settings_count_only_their_explicit_class_paths():
    stored = {"datamodule_hyper_parameters": {"_class_path": "json.JSONDecoder", "table": "code.csv"}}
    with pytest.raises(UntrustedClassPathError) as error:
        check_class_paths(stored, source="x.ckpt")
    assert "datamodule_hyper_parameters['_class_path'] = 'json.JSONDecoder'" in str(error.value)
    assert "code.csv" not in str(error.value)  # stdlib has a `code` module; a table file name is not imported


def hostile_checkpoint(tmp_path, monkeypatch):
    """A checkpoint whose backbone names an installed module that records being imported."""
    (tmp_path / "records_its_import.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Host:\n    feature_dim = 8\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # `loss` is no shape-defining setting: without the check, LightningCLI would merge and import it
    hparams = {key: SHIPPED[key] for key in ("_instantiator", "_class_path")}
    hparams["loss"] = {"class_path": "records_its_import.Host", "init_args": {}}
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": hparams}, path)
    return path


def test_ccim_with_ckpt_path_refuses_before_lightning_imports_anything(tmp_path, monkeypatch):
    path = hostile_checkpoint(tmp_path, monkeypatch)
    with pytest.raises(UntrustedClassPathError, match=r"\['loss'\]\['class_path'\] = 'records_its_import\.Host'"):
        build_cli(["test", "--config", str(CONFIGS / "synthetic.yaml"), "--ckpt_path", str(path)])
    assert not (tmp_path / "imported").exists()
    assert "records_its_import" not in sys.modules


def test_the_predictor_refuses_it_too(tmp_path, monkeypatch):
    path = hostile_checkpoint(tmp_path, monkeypatch)
    with pytest.raises(UntrustedClassPathError, match="none was given"):
        Predictor.from_checkpoint(path)
    assert not (tmp_path / "imported").exists()
