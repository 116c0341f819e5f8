"""Which classes a checkpoint's stored settings may make us import: the user's config decides, not the file.

LightningCLI merges a ``--ckpt_path`` checkpoint's ``hyper_parameters`` into the config, and jsonargparse imports
every class path it finds there (``class_path: pkg.module.Class``, or a dotted string where a class or callable is
expected); Lightning's ``load_from_checkpoint`` imports the recorded ``_instantiator``. Importing a module runs its
code, so a checkpoint from someone else could choose code to run before anything is checked. :func:`check_class_paths`
allows a class path in a checkpoint only when

* the config the user gave names the same path (their own host, say), or
* it lies in the allow-list: the project's own modules and torch's (:data:`ALLOWED_MODULES`), plus Lightning's own
  instantiator, which LightningCLI records in every checkpoint (:data:`ALLOWED_NAMES`);

and refuses the file otherwise, naming each path, where it sits and which of the two rules it failed. The check reads
strings only: it imports nothing (a dotted string counts as a class path when its top-level package can be found,
which ``importlib.util.find_spec`` tells without running the package). A refusal is a
:class:`~ccim_lightning.checkpoints.CheckpointError`, which the ``ccim`` command prints as one line.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ccim_lightning.checkpoints import CheckpointError

#: Module trees a checkpoint may name without the user's config naming them.
ALLOWED_MODULES: tuple[str, ...] = ("ccim_lightning", "torch")
#: Single names allowed as well: the instantiator LightningCLI records in each checkpoint it writes.
ALLOWED_NAMES: tuple[str, ...] = ("lightning.pytorch.cli.instantiate_module",)
#: Keys whose string value is always an import path.
CLASS_PATH_KEYS: tuple[str, ...] = ("class_path", "_class_path", "_instantiator")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_LISTED = 8


class UntrustedClassPathError(CheckpointError):
    """A checkpoint names classes to import that neither the user's config nor the allow-list contains."""


def _looks_importable(text: str) -> bool:
    """A dotted name whose top-level package exists (found without importing it)."""
    if not _DOTTED.fullmatch(text):
        return False
    try:
        return importlib.util.find_spec(text.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


def class_paths(settings: Any, where: str, dotted: bool = True) -> Iterator[tuple[str, str]]:
    """Yields ``(location, path)`` for every import path inside nested settings (dicts, lists, strings).

    Args:
        settings: Hyper-parameters as a checkpoint stores them (or a config as plain dicts).
        where: The name of ``settings`` in messages, e.g. ``"hyper_parameters"``.
        dotted: Also count any other dotted string whose top-level package exists (jsonargparse imports such a
            string where a class or a callable is expected); False: only the values of :data:`CLASS_PATH_KEYS`.
    """
    if isinstance(settings, Mapping):
        for key, value in settings.items():
            location = f"{where}[{key!r}]"
            if isinstance(value, str) and (str(key) in CLASS_PATH_KEYS or str(key).endswith(".class_path")):
                yield location, value
            else:
                yield from class_paths(value, location, dotted)
    elif isinstance(settings, list | tuple):
        for i, value in enumerate(settings):
            yield from class_paths(value, f"{where}[{i}]", dotted)
    elif dotted and isinstance(settings, str) and _looks_importable(settings):
        yield where, settings


def is_allowed(path: str) -> bool:
    """Whether ``path`` is in the allow-list (:data:`ALLOWED_MODULES` trees, :data:`ALLOWED_NAMES`)."""
    return path in ALLOWED_NAMES or any(path == root or path.startswith(root + ".") for root in ALLOWED_MODULES)


def check_class_paths(stored: Mapping[str, Any], *, source: str, user_config: Any = None) -> None:
    """Refuses a checkpoint whose settings name import paths that neither the user's config nor the allow-list has.

    Args:
        stored: The checkpoint (its ``hyper_parameters`` and ``datamodule_hyper_parameters`` are searched).
        source: The checkpoint's path, for the message.
        user_config: The settings the user gave (plain dicts, lists and strings); every import path in them is
            allowed. None: only the allow-list applies.

    Raises:
        UntrustedClassPathError: Naming each refused path, where it sits in the checkpoint, and the two rules.
    """
    given = {path for _, path in class_paths(user_config, "config")} if user_config is not None else set()
    # The model's settings are what LightningCLI parses (any dotted string may be imported there); the datamodule's
    # are only read back, so only their explicit class paths count (file names such as "code.csv" stay plain).
    found = [
        *class_paths(stored.get("hyper_parameters") or {}, "hyper_parameters"),
        *class_paths(stored.get("datamodule_hyper_parameters") or {}, "datamodule_hyper_parameters", dotted=False),
    ]
    refused = [(location, path) for location, path in found if path not in given and not is_allowed(path)]
    if not refused:
        return
    listed = "; ".join(f"{location} = {path!r}" for location, path in refused[:_LISTED])
    more = f" (and {len(refused) - _LISTED} more)" if len(refused) > _LISTED else ""
    config = "your config" if user_config is not None else "a config (none was given)"
    raise UntrustedClassPathError(
        f"Refused checkpoint {source!r}: its stored settings name classes to import that neither {config} nor the "
        f"allow-list ({', '.join(m + '.*' for m in ALLOWED_MODULES)}) contains: {listed}{more}. Importing runs "
        "code, and a checkpoint's settings do not choose what is imported: pass the config that trained it (its "
        "config.yaml, which names these classes) with --config, or a model config naming them."
    )
