"""A ``ccim fit`` checkpoint as a row of the debiasing benchmark (``benchmarks/debias.py --ccim-checkpoint``).

``make demo`` trains CCIM with ``ccim fit --config configs/synthetic.yaml`` and then runs the side-by-side; training
the same model a second time inside the benchmark would double the demo's longest step. Instead the benchmark tests
the demo's ``last.ckpt`` on its own test sets, as the row ``ccim_fit``, after checking that the checkpoint was
trained the way the benchmark trains its ``ccim_dot`` row: the same host, head, optimiser, data and number of steps.
What differs, and the row's description says so: ``ccim fit`` validates every epoch, renders its samples on the fly
(its random flips are drawn in another order) and uses the dictionary it built itself.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict
from typing import Any

from ccim_lightning import CCIMLightningModule
from ccim_lightning.datamodules.base import train_drop_last
from ccim_lightning.datamodules.synthetic import SceneSettings

_HOST = "ccim_lightning.hosts.TwoStreamHost"
_DATA = "ccim_lightning.datamodules.SyntheticContextDataModule"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for the nested dicts of a checkpoint's hyper-parameters."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def expected_model(num_prototypes: int, confounder_dim: int, feature_dim: int) -> dict[str, Any]:
    """The hyper-parameters (dotted paths) of the benchmark's ``ccim_dot`` model, as ``ccim fit`` saves them."""
    defaults = {name: p.default for name, p in inspect.signature(CCIMLightningModule).parameters.items()}
    expected = {
        "_class_path": "ccim_lightning.CCIMLightningModule",
        "backbone.class_path": _HOST,
        "backbone.init_args.subject_encoder": "small_cnn",
        "backbone.init_args.context_encoder": "small_cnn",
        "backbone.init_args.feature_dim": feature_dim,
        "task": "multiclass",
        "num_prototypes": num_prototypes,
        "confounder_dim": confounder_dim,
        "attention": "dot_product",
        "use_prior": True,
        "uniform_attention": False,
        "optimizer.class_path": "torch.optim.AdamW",
        "optimizer.init_args.lr": 1e-3,
        "optimizer.init_args.weight_decay": 0.01,
    }
    for name in ("hidden_dim", "attention_dim", "dropout", "residual_scale", "loss", "debias", "lr_scheduler"):
        expected[name] = defaults[name]
    return expected


def expected_data(seed: int, bias: float, train_size: int, batch_size: int) -> dict[str, Any]:
    """The datamodule hyper-parameters the benchmark's training split of (seed, bias) has."""
    generator = asdict(SceneSettings(seed=seed, bias=bias))
    return {"_class_path": _DATA, **generator, "train_size": train_size, "batch_size": batch_size, "flip": True}


def training_steps(train_size: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of ``epochs`` epochs (one device; the last batch is dropped only when it holds one sample)."""
    if train_drop_last(train_size, batch_size, 1):
        return epochs * (train_size // batch_size)
    return epochs * math.ceil(train_size / batch_size)


def checkpoint_mismatches(
    checkpoint: dict[str, Any], model: dict[str, Any], data: dict[str, Any], steps: int
) -> list[str]:
    """What in ``checkpoint`` differs from the benchmark's run: ``"field: checkpoint X, benchmark Y"`` lines.

    Args:
        checkpoint: A checkpoint written by ``ccim fit`` (``hyper_parameters`` and ``datamodule_hyper_parameters``).
        model: :func:`expected_model`.
        data: :func:`expected_data`.
        steps: :func:`training_steps` of the benchmark's configuration.
    """
    problems = []
    for part, expected in (("hyper_parameters", model), ("datamodule_hyper_parameters", data)):
        saved = checkpoint.get(part)
        if not isinstance(saved, dict):
            problems.append(f"{part}: missing (a checkpoint of `ccim fit` has it; one saved from Python may not)")
            continue
        flat = _flat(saved)
        for name, value in expected.items():
            if name not in flat:
                problems.append(f"{part}.{name}: not in the checkpoint, benchmark {value!r}")
            elif flat[name] != value:
                problems.append(f"{part}.{name}: checkpoint {flat[name]!r}, benchmark {value!r}")
    if checkpoint.get("global_step") != steps:
        problems.append(f"global_step: checkpoint {checkpoint.get('global_step')!r}, benchmark {steps} (the epochs)")
    return problems
