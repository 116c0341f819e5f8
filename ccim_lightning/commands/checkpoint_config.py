"""``--ckpt_path`` before LightningCLI reads it: ``last`` resolved, the file loaded weights-only, checked.

LightningCLI replaces the model config by a checkpoint's hyper-parameters; these checks run first, so a checkpoint
trained with other shape-defining settings stops with both values named instead of loading into another model.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ccim_lightning.checkpoints import check_checkpoint_finite, load_checkpoint
from ccim_lightning.class_paths import check_class_paths
from ccim_lightning.commands.errors import CommandError

log = logging.getLogger(__name__)

#: Model settings that change the shape of the weights: a checkpoint and the config must agree on them.
SHAPE_FIELDS = (
    "backbone",
    "attention",
    "num_prototypes",
    "confounder_dim",
    "feature_dim",
    "hidden_dim",
    "attention_dim",
    "task",
    "debias",
    "continuous_loss",
)
#: Filled from the datamodule at instantiation, so None in the parsed config: never compared.
LINKED_FIELDS = ("num_classes", "task", "class_names")


class CheckpointConfigMismatch(ValueError):
    """``--ckpt_path`` holds a model whose shape-defining settings differ from the config's."""


def find_last_checkpoint(root: Path) -> Path:
    """``last.ckpt`` of the most recent run under ``root`` (what ``--ckpt_path last`` means); says which it took.

    Raises:
        CommandError: No run under ``root`` has one.
    """
    candidates = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CommandError(
            f"--ckpt_path last: no run under {str(root)!r} has a checkpoints/last.ckpt; train one with "
            "`ccim fit` first or give the checkpoint's path."
        )
    log.info("--ckpt_path last: %s (the newest of %d runs under %s)", candidates[-1], len(candidates), root)
    return candidates[-1]


def _plain(value: Any) -> Any:
    """A parsed config value as plain dicts and lists, without jsonargparse's bookkeeping keys."""
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        value = as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("_instantiator", "_class_path")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_checkpoint_matches_config(ckpt_path: str, user_model: Any) -> dict[str, Any]:
    """Stops when the checkpoint's shape-defining model settings differ from the config's; logs the others.

    Args:
        ckpt_path: The ``--ckpt_path`` file.
        user_model: The model section the user's config and overrides gave (before the checkpoint's merge).

    Returns:
        The checkpoint, loaded weights-only.

    Raises:
        CheckpointConfigMismatch: Naming every differing shape-defining field with both values.
    """
    checkpoint = load_checkpoint(ckpt_path)  # weights-only; every failure names the file
    check_checkpoint_finite(checkpoint, ckpt_path)
    check_class_paths(checkpoint, source=ckpt_path, user_config=_plain(user_model))  # before LightningCLI imports
    saved = checkpoint.get("hyper_parameters") or {}
    if not saved:
        return checkpoint
    user = _plain(user_model)
    given = user.get("init_args", {}) if isinstance(user, dict) else {}
    saved = _plain(saved)
    differing = {k for k in given.keys() & saved.keys() if given[k] != saved[k] and k not in LINKED_FIELDS}
    shape = sorted(differing & set(SHAPE_FIELDS))
    if shape:
        lines = "\n".join(f"  {k}: config {given[k]!r}, checkpoint {saved[k]!r}" for k in shape)
        raise CheckpointConfigMismatch(
            f"The checkpoint {ckpt_path} was trained with other model settings than the config gives:\n{lines}\n"
            "Use the run's own config (the config.yaml LightningCLI saved next to its logs) or pass the "
            "checkpoint's values as overrides (e.g. --model.init_args.attention none)."
        )
    if differing:
        log.info(
            "--ckpt_path %s: the checkpoint's model settings replace the config's for %s.",
            ckpt_path,
            ", ".join(f"{k} ({given[k]!r} -> {saved[k]!r})" for k in sorted(differing)),
        )
    return checkpoint


def check_checkpoint_filename(filename: str | None, auto_insert_metric_name: bool) -> None:
    """Refuses a ``--checkpoint.filename`` whose metric names would put a ``/`` into the checkpoint's file name.

    With ``auto_insert_metric_name`` (Lightning's default), ``{val/acc}`` becomes ``val/acc=0.91``: a sub-folder
    ``val`` and a file ``acc=0.91.ckpt``.

    Raises:
        CommandError: Naming the field and giving a filename that works.
    """
    if not filename or not auto_insert_metric_name:
        return
    slashed = [name for name in re.findall(r"\{([^{}:!]+)", filename) if "/" in name]
    if slashed:
        name = slashed[0].strip()
        raise CommandError(
            f"--checkpoint.filename {filename!r}: the metric name {name!r} would be written into the file name, and "
            "its '/' would make a sub-folder. Turn the automatic name off and write the name yourself, e.g. "
            f"--checkpoint.auto_insert_metric_name false --checkpoint.filename "
            f"'epoch={{epoch}}-{name.replace('/', '_')}={{{name}:.4f}}'."
        )
