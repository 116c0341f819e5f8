"""Reading Lightning checkpoints safely, with errors that name the file.

Checkpoints are pickles, and unpickling can run any code the file's author chose. :func:`load_checkpoint` always
reads with ``torch.load(weights_only=True)``, which builds only tensors and plain containers and refuses every other
Python global, whatever the installed torch's default. Every way a file can fail becomes a :class:`CheckpointError`
(or ``FileNotFoundError`` / ``IsADirectoryError``) that names the path and says what to do:

* missing, a folder, empty;
* damaged or truncated: not a complete zip archive, or an archive member whose CRC-32 does not match (torch itself
  reads flipped bytes in tensor data without noticing);
* foreign: loadable, but no Lightning checkpoint (no ``state_dict`` mapping);
* unsafe (:class:`UnsafeCheckpointError`): the pickle needs globals such as ``os.system``; the message names them.

:func:`check_checkpoint_finite` then names the first tensor holding NaN or inf, so that a checkpoint of a diverged run
is not tested or resumed from as if it were sound. :func:`refused_globals` and
:func:`archive_damage` are shared with :mod:`ccim_lightning.weights`.

Writing: :func:`atomic_write` is the one way the package replaces a file (checkpoints through
:class:`AtomicCheckpointIO`, predictions, the dictionary cache): a failed or killed write never leaves a partial
file nor loses the previous good one.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from typing_extensions import override

__all__ = [
    "AtomicCheckpointIO",
    "AtomicWriteError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "archive_damage",
    "atomic_write",
    "check_checkpoint_finite",
    "load_checkpoint",
    "refused_globals",
    "remove_stale_temporaries",
]

_LISTED = 8
"""How many keys, files or globals a message lists."""

# Globals a weights-only load accepts (or that only rebuild tensors and plain containers); everything else found in a
# refused file is reported. Only used to word messages: the refusal itself is torch's.
_PLAIN_MODULES = ("torch", "collections", "_codecs")
_PLAIN_BUILTINS = {"set", "frozenset", "bytearray", "bytes", "slice", "complex", "int", "float", "bool", "str"}
_SCAN_BYTES = 1 << 26
"""How much of a legacy-format (non-zip) file the scan for globals reads."""
_NAMED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")

TRUST_ADVICE = "checkpoints and weights files are pickles: use only files from people you trust"


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: damaged, truncated, foreign, unsafe, or holding non-finite tensors."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle needs Python globals that a weights-only load refuses to run."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a Lightning checkpoint on the CPU with ``torch.load(weights_only=True)``.

    Args:
        path: A ``.ckpt`` file written by Lightning (``Trainer.save_checkpoint`` or ``ModelCheckpoint``).

    Returns:
        The checkpoint dict; it has a ``state_dict`` mapping.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder (the message lists the ``.ckpt`` files in it).
        UnsafeCheckpointError: The file needs Python globals a weights-only load refuses (named in the message).
        CheckpointError: The file is empty, damaged or truncated, not a PyTorch file, or not a Lightning checkpoint.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist; check the path (and --ckpt_path).")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.ckpt"))
        inside = f"; it holds {_listing(found)}" if found else " and holds no .ckpt file"
        raise IsADirectoryError(f"Checkpoint {str(path)!r} is a folder, not a checkpoint file{inside}. Pass the file.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is empty (0 bytes): the save was interrupted. Use another one."
        )
    damage = archive_damage(path)
    if damage:
        raise CheckpointError(f"Checkpoint {str(path)!r} {damage}. Copy it again or use another checkpoint.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = refused_globals(path, exc)
        if names:
            raise UnsafeCheckpointError(
                f"Refused checkpoint {str(path)!r}: its pickle needs the Python global(s) {', '.join(names)}, and "
                "unpickling a global can run code stored in the file. ccim-lightning loads checkpoints with "
                f"torch.load(weights_only=True) and refuses to run code from a file; {TRUST_ADVICE}. If the file is "
                "your own, keep plain values (numbers, strings, lists, dicts) in its hyper-parameters."
            ) from exc
        raise CheckpointError(_unreadable(path, exc)) from exc
    except Exception as exc:  # KeyError, RuntimeError, EOFError ... from a file that is no torch file
        raise CheckpointError(_unreadable(path, exc)) from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a Lightning checkpoint: it holds {_describe(checkpoint)} and no "
            "'state_dict'. Pass a .ckpt file written by Lightning (ModelCheckpoint or Trainer.save_checkpoint); "
            "pretrained weights of a backbone go to the host's weights argument instead."
        )
    return checkpoint


def check_checkpoint_finite(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raises if a floating-point tensor of the model (``state_dict``) or the optimizers has NaN or inf.

    Callback and scheduler states are not searched: they hold infinities by design (``ModelCheckpoint``'s
    ``kth_value``, ``ReduceLROnPlateau``'s initial ``best``).

    Args:
        checkpoint: A dict from :func:`load_checkpoint`.
        path: The file it came from, for the message.

    Raises:
        CheckpointError: Naming the first non-finite tensor (weights and buffers first, then optimizer state), its
            count of bad values, and how many tensors are bad.
    """
    first, first_count, bad_tensors = None, 0, 0
    searched = {
        "state_dict": checkpoint.get("state_dict", {}),
        "optimizer_states": checkpoint.get("optimizer_states", []),
    }
    for key, tensor in _tensors(searched, ""):
        if not tensor.is_floating_point() and not tensor.is_complex():
            continue
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            bad_tensors += 1
            if first is None:
                first, first_count = key, count
    if first is not None:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds non-finite values: {first} has {first_count} NaN or infinite value(s) "
            f"({bad_tensors} tensor(s) affected in all). It was saved from a run whose training diverged, or it is "
            "damaged; use an earlier checkpoint, and look for the cause (learning rate, inputs) before training on."
        )


def refused_globals(path: str | os.PathLike, exc: BaseException) -> list[str]:
    """The Python globals that made a weights-only ``torch.load`` of ``path`` fail, or an empty list.

    The file's pickle(s) are scanned without running them (:mod:`pickletools`) for every global outside torch and
    plain containers; where the scan finds none, the global named in torch's message is taken.

    Args:
        path: The file that failed to load.
        exc: The ``pickle.UnpicklingError`` of the weights-only load.

    Returns:
        ``module.name`` strings in the order the pickle uses them, without duplicates (at most 8).
    """
    scanned = [name.replace("__builtin__.", "builtins.", 1) for name in _scan_globals(Path(path))]
    names = [name for name in scanned if not _is_plain(name)]
    if not names:  # the scan could not read the pickle: fall back on the name in torch's message
        names = [name for name in _NAMED_GLOBAL.findall(str(exc)) if not _is_plain(name)]
    return list(dict.fromkeys(names))[:_LISTED]


def archive_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with a zip-format torch file, or None: truncated, or an entry whose CRC-32 does not match.

    Reads the whole file once. Files in the legacy (pre-1.6) format, or that are no zip at all, give None: torch.load
    reports on those.

    Args:
        path: The file.

    Returns:
        A phrase such as ``"is a truncated or damaged zip archive (...)"``, to follow the file's name, or None.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        size = os.path.getsize(path)
        return f"is a truncated or damaged zip archive ({size} bytes; {exc}): an interrupted save or copy"
    if broken is not None:
        return f"is damaged: the CRC-32 of its entry {broken!r} does not match its data (bytes changed after saving)"
    return None


def _unreadable(path: Path, exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (
        f"Checkpoint {str(path)!r} could not be read by torch.load: it is not a PyTorch file, or it is damaged "
        f"({type(exc).__name__}: {lines[0] if lines else 'no message'}). Pass a .ckpt file written by Lightning."
    )


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        return f"a dict with keys {_listing(keys)}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _listing(items: list[str]) -> str:
    more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _tensors(node: object, key: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with its key path such as ``state_dict['fc.weight']``."""
    if isinstance(node, torch.Tensor):
        yield key, node
    elif isinstance(node, Mapping):
        for name, value in node.items():
            yield from _tensors(value, f"{key}[{name!r}]" if key else str(name))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _tensors(value, f"{key}[{i}]")


def _is_plain(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return attribute in _PLAIN_BUILTINS
    return any(module == m or module.startswith(m + ".") for m in _PLAIN_MODULES)


def _scan_globals(path: Path) -> list[str]:
    """``module.name`` of every global the file's pickle(s) reference; reading opcodes runs nothing."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        else:  # the legacy format: pickles first, then raw storages
            with open(path, "rb") as f:
                streams = [f.read(_SCAN_BYTES)]
    except (OSError, zipfile.BadZipFile):
        return []
    names: list[str] = []
    for data in streams:
        names.extend(_pickle_globals(data))
    return names


def _pickle_globals(data: bytes) -> list[str]:
    """Globals of the pickles concatenated in ``data`` (the legacy torch format writes several in a row)."""
    names: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        start = stream.tell()
        memo: dict[int, object] = {}
        pushed: list[object] = []  # the last two stack pushes, enough to resolve STACK_GLOBAL's two strings
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    module, name = str(arg).split(" ", 1)
                    names.append(f"{module}.{name}")
                    pushed.append(None)
                elif opcode.name == "STACK_GLOBAL":
                    if len(pushed) == 2 and all(isinstance(part, str) for part in pushed):
                        names.append(".".join(map(str, pushed)))
                    pushed.append(None)
                elif opcode.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                else:
                    pushed.append(arg if isinstance(arg, str) else None)
                del pushed[:-2]
        except (ValueError, IndexError):  # not (or no longer) a pickle, such as the raw storages that follow
            break
        if stream.tell() <= start:
            break
    return names


class AtomicWriteError(OSError):
    """Writing a file failed; the previous file at that path, if any, is unchanged and no partial file is left."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file beside ``path`` that replaces ``path`` only once it is completely on disk.

    The temporary file (``.<name>.<pid>.tmp``) lies in the target's own folder, so the final ``os.replace`` is a
    rename within one file system: atomic, whereas a temporary folder elsewhere would need a copy that a kill or
    a full disk leaves half done. It is flushed and fsynced before the rename, and the folder after it, so a
    power loss leaves the old file or the new one. Any failure (a full disk, an exception of the writer, a
    ``KeyboardInterrupt``) removes the temporary file, keeps the previous file, and is raised as
    :class:`AtomicWriteError` naming the file (other exceptions of the writer are raised as they are). A process
    killed mid-write leaves only its ``.tmp`` file, never a truncated ``path``. Parent folders are created.

    Args:
        path: The file to write.
        mode: ``"wb"`` or ``"w"``.
        **open_kwargs: More arguments of :func:`open` (``encoding``, ``newline``).

    Yields:
        The open temporary file.

    Raises:
        AtomicWriteError: The write, flush, fsync or rename failed (``errno`` kept); the message names ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        kept = "the previous file is unchanged" if path.exists() else "nothing was written there"
        raise AtomicWriteError(
            error.errno,
            f"Could not write {str(path)!r} ({error.strerror or error}); {kept} and no partial file is left. "
            "Free space on its file system or choose another folder.",
        ) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files of :func:`atomic_write` for ``path`` whose writing process is gone (was killed).

    Args:
        path: The target file.

    Returns:
        The files deleted.
    """
    path = Path(path)
    removed = []
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name.removeprefix(f".{path.name}.").removesuffix(".tmp")
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable; file systems that cannot fsync a folder (some network ones) skip it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose saves to local paths go through :func:`atomic_write`.

    A kill, a full disk or any error during a checkpoint save then leaves the previous ``last.ckpt`` (or best)
    intact and no truncated file; Lightning's own save writes the target in place. Remote (fsspec) paths are saved
    by Lightning as before. Plug it in with ``Trainer(plugins=[AtomicCheckpointIO()])``; ``ccim`` does.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path) as f:
            torch.save(checkpoint, f)
