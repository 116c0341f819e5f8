"""The one place where ccim-lightning reads a private Lightning API; ``tests/test_compat.py`` fails when it changes.

``CCIMLightningModule`` must know whether LightningCLI is instantiating it: then its ``backbone``/``loss`` arguments
are configs (``class_path`` + ``init_args``) that belong in the checkpoint's hyper-parameters, while from Python
they are live modules that must not be pickled into every checkpoint. Lightning exposes this only through the
context variable that its CLI instantiator sets around the model's ``__init__``.
"""

from __future__ import annotations

try:
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - a Lightning without it: every call counts as a Python call
    _given_hyperparameters = None


def instantiated_by_cli() -> bool:
    """Whether the current ``__init__`` runs inside LightningCLI's model instantiation."""
    return _given_hyperparameters is not None and _given_hyperparameters.get() is not None
