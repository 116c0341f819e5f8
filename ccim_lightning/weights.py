"""Loading pretrained weights from local checkpoint files.

One loader for every pretrained network in the suite: the scene CNN behind the confounder dictionary
(:class:`~ccim_lightning.dictionary.features.ContextFeatureExtractor`) and the host models' encoders. Nothing is
downloaded: weights come from a local file, in any of these layouts:

* a plain state dict, as written by ``torch.save(model.state_dict(), path)`` from timm or torchvision (timm and
  torchvision ResNets share their key names: ``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``);
* a checkpoint dict that wraps the state dict under ``state_dict``, ``model_state_dict``, ``model`` or ``module``,
  e.g. the Places365 release (``resnet50_places365.pth.tar`` =
  ``{'epoch': ..., 'arch': ..., 'state_dict': {'module.conv1.weight': ...}, 'best_prec1': ...}``).

``module.`` prefixes (``nn.DataParallel``) are stripped. The classifier is not loaded by default
(``ignore_classifier=True``): a feature extractor built with ``num_classes=0`` has none, and a host encoder's new
classifier has a different number of classes anyway.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ccim_lightning.checkpoints import TRUST_ADVICE, archive_damage, refused_globals

__all__ = [
    "LoadedWeights",
    "UnsafeWeightsError",
    "WeightsFileError",
    "WeightsMismatchError",
    "file_digest",
    "load_pretrained_weights",
]

log = logging.getLogger(__name__)

#: Keys under which checkpoint dicts commonly keep the model's state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
#: Prefix added to every key by ``nn.DataParallel`` / ``DistributedDataParallel``.
PARALLEL_PREFIX = "module."
#: Classifier names assumed for models that do not name their own (torchvision: ``fc`` for ResNets,
#: ``classifier`` for most others).
FALLBACK_CLASSIFIER_NAMES = ("fc", "classifier")
_LIST_LIMIT = 10


class WeightsFileError(ValueError):
    """A weights file could not be read or holds no state dict."""


class UnsafeWeightsError(WeightsFileError):
    """A weights file's pickle needs Python globals (possibly code) that a weights-only load refuses."""


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: missing, unexpected or wrongly shaped keys."""


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_pretrained_weights` loaded.

    Attributes:
        path: The weights file.
        digest: SHA-256 of the file (hex); identifies the weights in caches and logs.
        format: Layout detected: ``"state_dict"`` for a plain state dict, ``"checkpoint['<key>']"`` for a state
            dict wrapped in a checkpoint dict; nested wrappers are joined, e.g.
            ``"checkpoint['model']['state_dict']"``.
        stripped_prefix: ``"module."`` if that prefix was stripped from the keys, else ``None``.
        num_loaded: Number of tensors copied into the model.
        dropped_keys: Checkpoint keys of the classifier that were not loaded (``ignore_classifier``).
        missing_keys: Model keys the file did not provide (only possible with ``strict=False``).
        unexpected_keys: File keys the model does not have (only possible with ``strict=False``).
    """

    path: str
    digest: str
    format: str
    stripped_prefix: str | None
    num_loaded: int
    dropped_keys: tuple[str, ...] = ()
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()


def file_digest(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks.

    Args:
        path: The file.
        chunk_size: Bytes read at a time.

    Returns:
        The hex digest (64 characters).
    """
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            sha.update(chunk)
    return sha.hexdigest()


def load_pretrained_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    ignore_classifier: bool = True,
    trust_pickle: bool = False,
) -> LoadedWeights:
    """Load a local weights file into ``model`` in place.

    Args:
        model: The model to fill, e.g. ``timm.create_model("resnet152", num_classes=0)``.
        path: A local file holding a state dict or a checkpoint dict that wraps one (see the module docstring).
        strict: If true, every model key must be provided and every file key used (classifier keys aside when
            ``ignore_classifier``). If false, missing and unexpected keys are logged and returned. Shape mismatches
            are an error either way.
        ignore_classifier: Leave the model's classifier as it is and drop the file's classifier keys. The classifier
            is the module named by timm's ``pretrained_cfg['classifier']`` or found via ``model.get_classifier()``;
            for other models ``fc`` and ``classifier`` are assumed.
        trust_pickle: Files are read with ``torch.load(weights_only=True)``, which only unpickles tensors and plain
            types. If a file needs arbitrary objects and you trust its source, set this to read it with
            ``weights_only=False`` (this can run code stored in the file).

    Returns:
        A :class:`LoadedWeights` record: digest, detected format, numbers of keys loaded and skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeWeightsError: The file needs Python globals a weights-only load refuses (named in the message) and
            ``trust_pickle`` is false.
        WeightsFileError: The file is damaged or truncated (zip CRC-32 checked), not a torch file, or holds no state
            dict.
        WeightsMismatchError: The state dict does not fit the model (the message lists the keys).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"Weights file {str(path)!r} {what}. Weights cannot be downloaded here: download the checkpoint "
            f"elsewhere and pass its local path."
        )
    obj = _read_torch_file(path, trust_pickle=trust_pickle)
    state_dict, fmt = _find_state_dict(obj, path)
    state_dict, stripped = _strip_prefix(state_dict, PARALLEL_PREFIX)

    model_state = model.state_dict()
    classifier = _classifier_names(model) if ignore_classifier else ()
    dropped = tuple(k for k in state_dict if _under(k, classifier))
    file_keys = {k: v for k, v in state_dict.items() if k not in dropped}
    wanted = [k for k in model_state if not _under(k, classifier)]

    # BatchNorm fills in ``num_batches_tracked`` itself for state dicts written before it existed (e.g. Places365).
    missing = [k for k in wanted if k not in file_keys and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in file_keys if k not in model_state]
    shapes = [
        (k, tuple(model_state[k].shape), tuple(v.shape))
        for k, v in file_keys.items()
        if k in model_state and isinstance(v, torch.Tensor) and v.shape != model_state[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        raise WeightsMismatchError(_mismatch_message(path, model, missing, unexpected, shapes, strict))
    if missing or unexpected:
        log.warning(
            "Loaded %s into %s non-strictly: %d model keys missing from the file, %d file keys unused.",
            path,
            type(model).__name__,
            len(missing),
            len(unexpected),
        )

    # getattr: torch sets `_metadata` on the state dicts it makes; a dict built by hand has none
    to_load = _with_metadata(
        {k: v for k, v in file_keys.items() if k in model_state}, getattr(state_dict, "_metadata", None)
    )
    # strict=False: classifier keys and pre-0.4 ``num_batches_tracked`` may legitimately be absent; all other
    # mismatches were reported above.
    model.load_state_dict(to_load, strict=False)

    info = LoadedWeights(
        path=str(path),
        digest=file_digest(path),
        format=fmt,
        stripped_prefix=PARALLEL_PREFIX if stripped else None,
        num_loaded=len(to_load),
        dropped_keys=dropped,
        missing_keys=tuple(missing),
        unexpected_keys=tuple(unexpected),
    )
    log.info(
        "Loaded %d tensors from %s (%s%s, sha256 %s) into %s%s.",
        info.num_loaded,
        path,
        fmt,
        ", 'module.' stripped" if stripped else "",
        info.digest[:12],
        type(model).__name__,
        f"; {len(dropped)} classifier keys not loaded" if dropped else "",
    )
    return info


def _read_torch_file(path: Path, *, trust_pickle: bool) -> object:
    """``torch.load`` on CPU with errors that say what kind of file this is: damaged, unsafe, or not torch at all."""
    damage = archive_damage(path)
    if damage:
        raise WeightsFileError(
            f"Weights file {str(path)!r} {damage}. Download or copy it again and compare its checksum with the "
            "published one."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = refused_globals(path, exc)
        if not names:
            raise WeightsFileError(_not_torch_message(path, exc)) from exc
        if not trust_pickle:
            raise UnsafeWeightsError(
                f"Refused weights file {str(path)!r}: its pickle needs the Python global(s) {', '.join(names)}, and "
                "unpickling a global can run code stored in the file, so it is not read with "
                f"torch.load(weights_only=True). The file is intact but unsafe to open; {TRUST_ADVICE}: weights must "
                "come from trusted sources. If you trust this one (a release with extra objects, such as training "
                "arguments), pass trust_pickle=True, or convert it once to a plain state dict: "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'clean.pth')."
            ) from exc
        log.warning(
            "Reading %s with torch.load(weights_only=False) (trust_pickle=True); it needs %s.", path, ", ".join(names)
        )
    except Exception as exc:  # text, empty file, legacy-format damage: KeyError, RuntimeError, EOFError, ...
        raise WeightsFileError(_not_torch_message(path, exc)) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightsFileError(_not_torch_message(path, exc)) from exc


def _not_torch_message(path: Path, exc: BaseException) -> str:
    return (
        f"Weights file {str(path)!r} could not be read by torch.load: it is not a PyTorch file, or it is damaged or "
        f"truncated ({type(exc).__name__}: {_first_line(exc)}). Pass a file written by torch.save."
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "no message"


def _is_state_dict(obj: object) -> bool:
    """A non-empty dict of tensors by name (``*._extra_state`` entries of any type allowed)."""
    return (
        isinstance(obj, Mapping)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
        and all(
            isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state")) for k, v in obj.items()
        )
    )


def _find_state_dict(obj: object, path: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    """Unwrap a checkpoint dict (possibly nested) down to its state dict."""
    if isinstance(obj, nn.Module):  # only reachable with trust_pickle: a whole pickled model
        return obj.state_dict(), "module"
    fmt = "checkpoint"
    node = obj
    for _ in range(4):
        if _is_state_dict(node):
            return node, ("state_dict" if node is obj else fmt)
        if not isinstance(node, Mapping):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(node.get(k), Mapping | nn.Module)), None)
        if key is None:
            break
        node = node[key]
        if isinstance(node, nn.Module):
            node = node.state_dict()
        fmt += f"[{key!r}]"
    if isinstance(obj, Mapping):
        keys = list(obj)
        found = f"a dict with keys {keys[:_LIST_LIMIT]}{' ...' if len(keys) > _LIST_LIMIT else ''}"
    else:
        found = f"a {type(obj).__name__}"
    raise WeightsFileError(
        f"Weights file {str(path)!r} holds {found}, not a state dict (a dict of tensors) or a checkpoint dict with "
        f"one under {list(WRAPPER_KEYS)}. Save the weights with torch.save(model.state_dict(), path)."
    )


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[OrderedDict, bool]:
    """Remove ``prefix`` from every key that starts with it; the ``_metadata`` attribute is kept, renamed likewise."""
    stripped = any(k.startswith(prefix) for k in state_dict)
    out = OrderedDict((k.removeprefix(prefix), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)  # only on state dicts torch made (see load_pretrained_weights)
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if name == prefix[:-1] else name.removeprefix(prefix), value) for name, value in metadata.items()
        )
    return out, stripped


def _with_metadata(state_dict: Mapping[str, torch.Tensor], metadata: Mapping | None) -> OrderedDict:
    """An ordered copy of ``state_dict`` carrying ``metadata`` (module versions that ``load_state_dict`` reads)."""
    out = OrderedDict(state_dict)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's classifier module(s), as prefixes of their state dict keys."""
    # getattr: timm models carry pretrained_cfg (default_cfg before timm 0.9) and get_classifier; other modules not
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    named = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(named, str):
        return (named,)
    if isinstance(named, (tuple, list)) and named:
        return tuple(named)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                return (name,)
    return FALLBACK_CLASSIFIER_NAMES


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    more = f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return f"{shown}{more}"


def _mismatch_message(
    path: Path,
    model: nn.Module,
    missing: list[str],
    unexpected: list[str],
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    strict: bool,
) -> str:
    lines = [f"Weights file {str(path)!r} does not fit {type(model).__name__}:"]
    if strict and missing:
        lines.append(f"  {len(missing)} missing keys (in the model, not in the file): {_listing(missing)}")
    if strict and unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys (in the file, not in the model): {_listing(unexpected)}")
    if shapes:
        shown = "; ".join(f"{k}: expected {list(e)}, got {list(g)}" for k, e, g in shapes[:_LIST_LIMIT])
        more = f"; ... ({len(shapes) - _LIST_LIMIT} more)" if len(shapes) > _LIST_LIMIT else ""
        lines.append(f"  {len(shapes)} shape mismatches: {shown}{more}")
    lines.append(
        "Check that the file was saved from the same architecture (model name and its arguments); pass "
        "strict=False to load the keys that do fit."
    )
    return "\n".join(lines)
