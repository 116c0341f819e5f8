"""Tests for ccim_lightning.dictionary: the confounder dictionary, its cache file and the dataset fingerprint."""

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ccim_lightning.dictionary.store import (
    ConfounderDictionary,
    DictionaryFileError,
    DictionaryKey,
    UnsafeDictionaryError,
    dataset_fingerprint,
)


def _key(num_prototypes: int = 8, **overrides) -> DictionaryKey:
    fields = {
        "extractor": "resnet152",
        "weights_digest": "ab" * 32,
        "num_prototypes": num_prototypes,
        "mask_subject": True,
        "seed": 7,
        "source": "features",
        "num_iterations": 10,
        "pca_dim": 3,
        "transform": '{"size": 224}',
        "dataset_fingerprint": dataset_fingerprint(f"train:{i}" for i in range(100)),
    }
    return DictionaryKey(**(fields | overrides))


def _clustered(num_prototypes: int = 8, dim: int = 6, **overrides) -> ConfounderDictionary:
    generator = torch.Generator().manual_seed(0)
    kwargs = {
        "inertia": 12.5,
        "assignments": torch.tensor([0, 1, -1, 1, 0]),
        "targets": torch.tensor([2, 0, 0, 1, 1]),
        "extra": {"pca_dim": 256, "niter": 20, "timings": {"cluster_s": 1.5}, "sizes": (1, 2)},
    } | overrides
    counts = torch.arange(1, num_prototypes + 1)
    key = _key(num_prototypes)
    return ConfounderDictionary.from_clustering(
        torch.randn(num_prototypes, dim, generator=generator), counts, key, **kwargs
    )


def _payload(path):
    return torch.load(path, weights_only=True)


def test_from_clustering_prior_is_cluster_share():
    counts = np.array([5, 0, 3, 12])
    centroids = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    z = ConfounderDictionary.from_clustering(centroids, counts, _key(4))
    torch.testing.assert_close(z.prior, torch.tensor([5, 0, 3, 12], dtype=torch.float32) / 20)
    torch.testing.assert_close(z.prototypes, torch.from_numpy(centroids))
    assert z.prior.dtype == z.prototypes.dtype == torch.float32
    assert z.num_prototypes == 4 and z.dim == 3 and z.num_samples == 20
    assert z.source == "features"
    with pytest.raises(ValueError, match="sum to 0"):
        ConfounderDictionary.from_clustering(centroids, np.zeros(4), _key(4))
    with pytest.raises(ValueError, match="source='features'.*'random'"):
        ConfounderDictionary.from_clustering(centroids, counts, DictionaryKey.for_random(4, seed=0))


def test_random_is_seeded_with_uniform_prior():
    a = ConfounderDictionary.random(16, 5, seed=3)
    b = ConfounderDictionary.random(16, 5, seed=3)
    c = ConfounderDictionary.random(16, 5, seed=4)
    torch.manual_seed(123)  # the global RNG plays no part
    d = ConfounderDictionary.random(16, 5, seed=3)

    torch.testing.assert_close(a.prototypes, b.prototypes, rtol=0, atol=0)
    torch.testing.assert_close(a.prototypes, d.prototypes, rtol=0, atol=0)
    assert not torch.equal(a.prototypes, c.prototypes)
    torch.testing.assert_close(a.prior, torch.full((16,), 1 / 16))
    assert a.source == "random" and a.key.seed == 3 and a.num_prototypes == 16 and a.dim == 5
    assert a.key == DictionaryKey.for_random(16, 3) and a.key.extractor == "none"
    scaled = ConfounderDictionary.random(16, 5, seed=3, scale=2.5)
    torch.testing.assert_close(scaled.prototypes, 2.5 * a.prototypes)


def test_save_load_round_trip_keeps_every_field(tmp_path):
    z = _clustered()
    path = tmp_path / "nested" / "dir" / "dictionary.pt"
    assert z.save(path) == path
    assert [p.name for p in path.parent.iterdir()] == ["dictionary.pt"]  # no temporary file left behind

    loaded = ConfounderDictionary.load(path)

    for f in dataclasses.fields(ConfounderDictionary):
        have, want = getattr(loaded, f.name), getattr(z, f.name)
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(have, want, rtol=0, atol=0)
        elif f.name == "extra":
            assert have == {"pca_dim": 256, "niter": 20, "timings": {"cluster_s": 1.5}, "sizes": [1, 2]}
        else:
            assert have == want, f.name
    assert loaded.key == z.key and isinstance(loaded.key, DictionaryKey)
    assert loaded.mismatches(z.key) == []
    payload = _payload(path)
    assert payload["format"] == "ccim-lightning/confounder-dictionary" and payload["version"] == 3
    assert payload["key"] == dataclasses.asdict(z.key)


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "z.pt"
    _clustered(num_prototypes=4).save(path)
    _clustered(num_prototypes=6).save(path)
    assert ConfounderDictionary.load(path).num_prototypes == 6


def test_save_rejects_values_a_weights_only_load_cannot_read(tmp_path):
    z = _clustered(extra={"when": object()})
    with pytest.raises(TypeError, match=r"extra\['when'\]"):
        z.save(tmp_path / "z.pt")
    assert not list(tmp_path.iterdir())
    _clustered(extra={"count": np.int64(3), "ratio": np.float32(0.5)}).save(tmp_path / "z.pt")
    assert ConfounderDictionary.load(tmp_path / "z.pt").extra == {"count": 3, "ratio": 0.5}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_file_is_rejected(tmp_path, damage):
    path = tmp_path / "z.pt"
    _clustered().save(path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}[damage])

    with pytest.raises(DictionaryFileError, match="cannot be read") as excinfo:
        ConfounderDictionary.load(path)
    assert str(path) in str(excinfo.value) and "rebuild" in str(excinfo.value)


class _MakesAFolder:
    """Unpickling this runs ``os.mkdir(folder)``: a stand-in for any code a hostile file could run."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return os.mkdir, (self.folder,)


def write_hostile_dictionary(path, marker):
    """A real dictionary's payload with one value that runs code when unpickled."""
    _clustered().save(path)
    payload = torch.load(path, weights_only=True)
    payload["extra"] = {"note": _MakesAFolder(marker)}
    torch.save(payload, path)
    return path


def test_a_hostile_file_is_refused_as_unsafe_naming_the_globals_in_one_line(tmp_path):
    marker = tmp_path / "code-ran"
    path = write_hostile_dictionary(tmp_path / "z.pt", marker)
    with pytest.raises(UnsafeDictionaryError) as excinfo:
        ConfounderDictionary.load(path)
    message = str(excinfo.value)
    assert message.startswith(
        f"Refused confounder dictionary file {str(path)!r}: its pickle needs the Python global(s)"
    )
    assert f"{os.mkdir.__module__}.mkdir" in message and "damaged" not in message and "\n" not in message
    assert isinstance(excinfo.value, DictionaryFileError)  # callers that catch file errors still catch it
    assert not marker.exists()  # nothing ran


def test_foreign_torch_file_is_rejected(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(DictionaryFileError, match="is not a confounder dictionary") as excinfo:
        ConfounderDictionary.load(path)
    assert str(path) in str(excinfo.value) and "'weight'" in str(excinfo.value)


def _rewrite(path, edit) -> None:
    payload = _payload(path)
    edit(payload)
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        pytest.param(lambda p: p.update(prior=p["prior"] * 2), "prior sums to 2", id="prior_sum"),
        pytest.param(lambda p: p["prior"].__setitem__(0, -p["prior"][0]), "negative", id="negative"),
        pytest.param(lambda p: p["prior"].__setitem__(0, float("nan")), "prior contains NaN", id="nan_prior"),
        pytest.param(
            lambda p: p["prototypes"].__setitem__((0, 0), float("inf")),
            "prototypes contain NaN or infinite",
            id="inf_prototype",
        ),
        pytest.param(lambda p: p.update(prior=p["prior"][:-1]), r"prior must have shape \(8,\)", id="prior_shape"),
        pytest.param(
            lambda p: p.update(prototypes=p["prototypes"][0]),
            r"prototypes must have shape \(N, d\)",
            id="prototype_shape",
        ),
        pytest.param(
            lambda p: p["key"].update(num_prototypes=9),
            "the key says num_prototypes=9 but there are 8",
            id="num_prototypes",
        ),
        pytest.param(lambda p: p["key"].pop("seed"), "missing 1 required positional argument: 'seed'", id="no_field"),
        pytest.param(lambda p: p["key"].update(colour="red"), "unexpected keyword argument 'colour'", id="key_field"),
        pytest.param(lambda p: p["key"].update(seed="7"), "DictionaryKey.seed must be int, got '7'", id="key_type"),
        pytest.param(
            lambda p: p["metadata"].update(colour="red"), r"unknown metadata fields \['colour'\]", id="unknown_field"
        ),
        pytest.param(lambda p: p["key"].update(source="magic"), "source must be one of", id="source"),
        pytest.param(lambda p: p.pop("key"), "no metadata or key dict", id="no_key"),
        pytest.param(lambda p: p["metadata"].pop("num_samples"), r"metadata lacks \['num_samples'\]", id="lacks"),
        pytest.param(lambda p: p.update(prior=p["prior"].double()), "not float32", id="dtype"),
        pytest.param(lambda p: p.pop("prototypes"), r"no tensor under \['prototypes'\]", id="no_tensor"),
    ],
)
def test_inconsistent_content_is_rejected(tmp_path, edit, reason):
    path = tmp_path / "z.pt"
    _clustered().save(path)
    _rewrite(path, edit)

    with pytest.raises(DictionaryFileError, match=reason) as excinfo:
        ConfounderDictionary.load(path)
    assert str(path) in str(excinfo.value) and "Delete it" in str(excinfo.value)


def test_constructor_checks_the_prior():
    with pytest.raises(ValueError, match="prior sums to 0.5"):
        ConfounderDictionary(torch.zeros(2, 3), torch.tensor([0.25, 0.25]), _key(2), num_samples=2)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ConfounderDictionary.load(tmp_path / "absent.pt")


def test_mismatches_name_each_differing_field_with_both_values():
    z = _clustered(num_prototypes=8)
    assert z.mismatches(z.key) == []
    assert z.mismatches(z.key, dim=6, num_samples=36) == []
    wanted = dataclasses.replace(z.key, num_prototypes=256, mask_subject=False)
    assert z.mismatches(wanted, dim=2048) == [
        "num_prototypes: cache has 8, run wants 256",
        "mask_subject: cache has True, run wants False",
        "dim: cache has 6, run wants 2048",
    ]
    assert z.mismatches(wanted, ignore=("num_prototypes",)) == ["mask_subject: cache has True, run wants False"]
    with pytest.raises(KeyError, match="colour"):
        z.mismatches(wanted, ignore=("colour",))


#: A value different from ``_key()``'s for every field of the key.
OTHER_VALUES = {
    "extractor": "resnet18",
    "weights_digest": "cd" * 32,
    "num_prototypes": 16,
    "mask_subject": False,
    "seed": 8,
    "source": "random",
    "num_iterations": 11,
    "pca_dim": None,
    "transform": '{"size": 256}',
    "dataset_fingerprint": "n=1;sha256=00",
}


@pytest.mark.parametrize("name", list(OTHER_VALUES))
def test_every_key_field_is_compared_and_reported_with_both_values(name):
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(DictionaryKey)}  # no field left untested
    have, want = _key(), _key(**{name: OTHER_VALUES[name]})
    assert have.differences(want) == [f"{name}: cache has {getattr(have, name)!r}, run wants {OTHER_VALUES[name]!r}"]
    assert have.differences(_key()) == []


def test_key_is_frozen_and_checks_its_fields():
    key = _key()
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.seed = 1
    with pytest.raises(TypeError, match="DictionaryKey.num_prototypes must be int, got True"):
        _key(num_prototypes=True)
    with pytest.raises(TypeError, match="DictionaryKey.pca_dim must be a positive int or None, got 0"):
        _key(pca_dim=0)
    with pytest.raises(ValueError, match="num_prototypes must be at least 1"):
        _key(num_prototypes=0)
    with pytest.raises(ValueError, match="the key says num_prototypes=8 but there are 2 prototypes"):
        ConfounderDictionary(torch.zeros(2, 3), torch.tensor([0.5, 0.5]), key)


def test_a_previous_format_version_is_refused_with_a_rebuild_hint(tmp_path):
    path = tmp_path / "z.pt"
    _clustered().save(path)
    _rewrite(path, lambda p: p.update(version=2))
    with pytest.raises(DictionaryFileError, match="format version 2, written by an older ccim-lightning") as info:
        ConfounderDictionary.load(path)
    assert str(path) in str(info.value) and "Rebuild it: delete the file" in str(info.value)


def test_dataset_fingerprint():
    ids = [f"images/{i:05d}.jpg" for i in range(50)]
    fingerprint = dataset_fingerprint(ids)

    assert fingerprint.startswith("n=50;sha256=")
    assert dataset_fingerprint(reversed(ids)) == fingerprint  # order-independent
    changed = ids.copy()
    changed[17] = "images/99999.jpg"
    assert dataset_fingerprint(changed) != fingerprint
    assert dataset_fingerprint(ids[:-1]) != fingerprint
    assert dataset_fingerprint(ids + ids[:1]) != fingerprint  # duplicates count
    # Reference: sha256 over the sorted per-identity sha256 digests.
    reference = hashlib.sha256(b"".join(sorted(hashlib.sha256(i.encode()).digest() for i in ids))).hexdigest()
    assert fingerprint == f"n=50;sha256={reference}"
    with pytest.raises(TypeError, match="strings"):
        dataset_fingerprint([1, 2])


def test_assignments_out_of_range_or_misaligned_targets_are_rejected():
    key = _key(2)
    with pytest.raises(ValueError, match="assignments must be cluster ids"):
        ConfounderDictionary.from_clustering(torch.zeros(2, 3), [1, 1], key, assignments=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="targets have 3 rows but there are 2 assignments"):
        ConfounderDictionary.from_clustering(
            torch.zeros(2, 3), [1, 1], key, assignments=torch.tensor([0, 1]), targets=torch.zeros(3)
        )


SMALL = ["--config", "configs/synthetic.yaml", "--data.init_args.train_size", "32", "--data.init_args.val_size", "8",
         "--data.init_args.test_size", "8", "--trainer.max_epochs", "1", "--trainer.logger", "false"]  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        ["build-dictionary", *SMALL, "--out", "{file}"],
        ["fit", *SMALL, "--dictionary.cache", "{file}", "--trainer.default_root_dir", "{folder}"],
        ["bias-report", *SMALL, "--dictionary", "{file}", "--out", "{folder}"],
    ],
    ids=["build-dictionary --out", "fit --dictionary.cache", "bias-report --dictionary"],
)
def test_every_command_reports_a_hostile_dictionary_as_unsafe_in_one_line(tmp_path, monkeypatch, command):
    from ccim_lightning.commands.main import main

    monkeypatch.chdir(Path(__file__).parents[2])  # the configs' relative paths
    marker = tmp_path / "code-ran"
    path = write_hostile_dictionary(tmp_path / "z.pt", marker)
    with pytest.raises(SystemExit) as excinfo:
        main([part.format(file=path, folder=tmp_path / "out") for part in command])
    message = str(excinfo.value.code)
    assert message.startswith("ccim: error: ") and "\n" not in message
    assert f"Refused confounder dictionary file {str(path)!r}" in message and "mkdir" in message
    assert "damaged" not in message and not marker.exists()
