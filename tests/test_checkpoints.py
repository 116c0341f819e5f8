"""Tests of the safe checkpoint loader: every damaged, foreign or unsafe file ends in an error naming it."""

import builtins
import errno
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from ccim_lightning.checkpoints import (
    AtomicCheckpointIO,
    AtomicWriteError,
    CheckpointError,
    UnsafeCheckpointError,
    atomic_write,
    check_checkpoint_finite,
    load_checkpoint,
    refused_globals,
)


class RunsShell:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


class Evaluates:
    def __reduce__(self):
        return (builtins.eval, ("1 + 1",))


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory):
    """A checkpoint written by Lightning itself (loops, optimizer and callback states included)."""
    folder = tmp_path_factory.mktemp("run")
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder
    )
    trainer.fit(BoringModel())
    path = folder / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def fake_checkpoint(path, **extra):
    torch.save(
        {"epoch": 0, "state_dict": {"layer.weight": torch.ones(4, 2), "layer.bias": torch.zeros(4)}, **extra}, path
    )
    return path


def test_loads_a_lightning_checkpoint_on_the_cpu(lightning_checkpoint):
    checkpoint = load_checkpoint(lightning_checkpoint)
    assert {"state_dict", "optimizer_states", "loops", "global_step"} <= set(checkpoint)
    assert checkpoint["global_step"] == 2
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())
    # no error, although ModelCheckpoint's state holds kth_value=inf by design
    check_checkpoint_finite(checkpoint, lightning_checkpoint)


def test_missing_file_and_folder_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"'{re.escape(str(tmp_path))}/nope.ckpt' does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    fake_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(IsADirectoryError, match=rf"'{re.escape(str(tmp_path))}' is a folder, .*it holds last.ckpt"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped", "text", "no_archive_end"])
def test_damaged_files_are_reported_with_their_path(tmp_path, damage):
    data = fake_checkpoint(tmp_path / "good.ckpt").read_bytes()
    path = tmp_path / "bad.ckpt"
    if damage == "empty":
        path.write_bytes(b"")
        match = r"is empty \(0 bytes\)"
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
        match = r"is a truncated or damaged zip archive"
    elif damage == "no_archive_end":
        path.write_bytes(data[:-10])
        match = r"is a truncated or damaged zip archive"
    elif damage == "flipped":  # bytes inside a tensor's data: torch.load alone would read them silently
        with zipfile.ZipFile(tmp_path / "good.ckpt") as archive:
            member = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
        name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
        start = member.header_offset + 30 + name_length + extra_length
        corrupt = bytearray(data)
        corrupt[start : start + 4] = b"\xff\xff\xff\xff"
        path.write_bytes(bytes(corrupt))
        match = r"is damaged: the CRC-32 of its entry '.*data/0' does not match"
    else:
        path.write_text("epoch,loss\n0,1.5\n")
        match = r"could not be read by torch.load: it is not a PyTorch file, or it is damaged"
    with pytest.raises(CheckpointError, match=rf"Checkpoint '{re.escape(str(path))}' {match}"):
        load_checkpoint(path)


def test_foreign_files_are_not_lightning_checkpoints(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, path)
    with pytest.raises(
        CheckpointError, match=rf"'{re.escape(str(path))}' is not a Lightning checkpoint: .*keys conv1.weight .*"
    ):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"holds a list and no 'state_dict'"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("payload", "name", "raw"),
    [
        (RunsShell(), f"{os.system.__module__}.system", False),
        (Evaluates(), "builtins.eval", False),
        (RunsShell(), f"{os.system.__module__}.system", True),
    ],
    ids=["torch.save-os.system", "torch.save-eval", "raw-pickle-protocol-5"],
)
def test_unsafe_pickles_are_refused_and_name_the_global(tmp_path, monkeypatch, payload, name, raw):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    if raw:
        path.write_bytes(pickle.dumps(payload, protocol=5))
    else:
        fake_checkpoint(path, hyper_parameters={"x": payload})
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert f"'{path}'" in message and name in message
    assert "refuses to run code from a file" in message and "people you trust" in message
    assert not (tmp_path / "pwned.txt").exists()  # nothing ran


def test_refused_globals_ignores_torch_and_containers(tmp_path):
    path = fake_checkpoint(tmp_path / "mixed.ckpt", extra={"x": Evaluates()})
    with pytest.raises(pickle.UnpicklingError) as error:
        torch.load(path, weights_only=True)
    assert refused_globals(path, error.value) == ["builtins.eval"]


def test_non_finite_tensor_is_named(tmp_path):
    path = tmp_path / "diverged.ckpt"
    state = {"backbone.w": torch.ones(3), "head.dictionary": torch.tensor([[1.0, float("nan")], [float("inf"), 0.0]])}
    optimizer = {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}
    torch.save({"state_dict": state, "optimizer_states": [optimizer]}, path)
    checkpoint = load_checkpoint(path)
    with pytest.raises(
        CheckpointError,
        match=rf"'{re.escape(str(path))}' .*state_dict\['head.dictionary'\] has 2 NaN or infinite .*2 tensor\(s\)",
    ):
        check_checkpoint_finite(checkpoint, path)
    # optimizer state is searched too, with its key path
    checkpoint["state_dict"]["head.dictionary"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"optimizer_states\[0\]\['state'\]\[0\]\['exp_avg'\] has 1 NaN"):
        check_checkpoint_finite(checkpoint, path)


# ------------------------------------------------------------------------------------------------- atomic writes


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_keeps_the_previous_file_when_the_disk_fills_up(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"good")
    with pytest.raises(AtomicWriteError, match="last.ckpt") as caught:
        with atomic_write(path) as f:
            f.write(b"x" * 4096)  # part of the new file is written, then the file system is full
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC
    assert "previous file is unchanged" in str(caught.value)
    assert path.read_bytes() == b"good"
    assert _hidden(tmp_path) == []  # no partial file beside it


def test_atomic_write_replaces_only_after_a_complete_write(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    with atomic_write(path, "w") as f:
        f.write("a,b\n")
        assert not path.exists()  # the target appears only once the file is complete
    assert path.read_text() == "a,b\n"
    with pytest.raises(ValueError):
        with atomic_write(path, "a"):
            pass


def test_atomic_write_removes_the_temporary_of_a_killed_writer_only(tmp_path):
    path = tmp_path / "d.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".d.pt.{int(dead.stdout)}.tmp"
    live = tmp_path / f".d.pt.{os.getppid()}.tmp"  # a running process's write in progress
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    with atomic_write(path) as f:
        f.write(b"new")
    assert not stale.exists() and live.exists()


class _FullDisk:
    """Pickling it fails the way a full disk fails a write: the save is interrupted after the tensors."""

    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_io_failure_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    good = {"state_dict": {"w": torch.arange(4.0)}}
    io.save_checkpoint(good, path)
    with pytest.raises(AtomicWriteError, match=str(path)):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1 << 16)}, "extra": _FullDisk()}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], good["state_dict"]["w"])
    assert _hidden(tmp_path) == []


_KILLED_WRITER = """
import sys, torch
from ccim_lightning.checkpoints import AtomicCheckpointIO
io = AtomicCheckpointIO()
big = {"state_dict": {"w": torch.ones(1 << 25)}}  # 128 MiB: the kill lands in the middle of the write
print("writing", flush=True)
while True:
    io.save_checkpoint(big, sys.argv[1])
"""


def test_a_writer_killed_mid_checkpoint_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(3.0)}}, path)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in tmp_path.glob(".last.ckpt.*.tmp")):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.arange(3.0))  # whole and unchanged
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
    # The next save removes the killed writer's temporary file.
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(2.0)}}, path)
    assert _hidden(tmp_path) == []


def test_a_full_disk_while_saving_the_dictionary_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from ccim_lightning.dictionary.store import ConfounderDictionary
    from tests.dictionary.test_store import _key

    path = tmp_path / "z.pt"
    old = ConfounderDictionary(torch.zeros(2, 3), torch.tensor([0.5, 0.5]), _key(2))
    old.save(path)
    before = path.read_bytes()

    def fills_the_disk(payload, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(AtomicWriteError, match=re.escape(str(path))):
        ConfounderDictionary(torch.ones(2, 3), torch.tensor([0.5, 0.5]), _key(2)).save(path)
    assert path.read_bytes() == before and _hidden(tmp_path) == []
