"""A ``ccim fit`` checkpoint as a row of the debiasing benchmark (``python -m benchmarks.debias --ccim-checkpoint``).

``make demo`` trains CCIM with ``ccim fit --config configs/synthetic.yaml`` and then runs the side-by-side; training
the same model a second time inside the benchmark would double the demo's longest step. Instead the benchmark tests
the demo's ``last.ckpt`` on its own test sets, as the row ``ccim_fit``, after checking that the checkpoint was
trained the way the benchmark trains its ``ccim_dot`` row: the same host, head, optimiser, data and number of steps.
What differs, and the row's description says so: ``ccim fit`` validates every epoch, renders its samples on the fly
(its random flips are drawn in another order) and uses the dictionary it built itself.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

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


def expected_run(seed: int, epochs: int, extractor: str, num_iterations: int) -> dict[str, Any]:
    """The ``config.yaml`` entries (dotted paths) of a ``ccim fit`` run trained as the benchmark's ``ccim_dot``."""
    adamw = inspect.signature(torch.optim.AdamW).parameters
    return {
        "seed_everything": seed,
        "trainer.max_epochs": epochs,
        "trainer.devices": 1,
        "trainer.num_nodes": 1,
        "trainer.precision": "32-true",
        "trainer.accumulate_grad_batches": 1,
        "trainer.gradient_clip_val": None,
        "dictionary.extractor": extractor,
        "dictionary.weights": None,
        "dictionary.source": "features",
        "dictionary.mask_subject": True,
        "dictionary.seed": seed,
        "dictionary.num_iterations": num_iterations,
        "dictionary.pca_dim": None,
        **{
            f"model.init_args.optimizer.init_args.{name}": _plain(adamw[name].default)
            for name in ("betas", "eps", "amsgrad", "maximize")
        },  # fmt: skip
    }


def run_config_path(checkpoint: str | Path) -> Path:
    """``<run>/config.yaml`` for ``<run>/checkpoints/<name>.ckpt``, where LightningCLI writes the run's config."""
    return Path(checkpoint).resolve().parent.parent / "config.yaml"


def read_run_config(checkpoint: str | Path) -> dict[str, Any]:
    """The run config beside ``checkpoint``; exits naming the path when it is not there."""
    path = run_config_path(checkpoint)
    if not path.is_file():
        raise SystemExit(
            f"--ccim-checkpoint {checkpoint}: no {path}. The benchmark reads the run's seed, trainer and "
            "--dictionary.* "
            "settings from the config.yaml that `ccim fit` writes in the run folder: pass the checkpoint inside "
            "its run folder (lightning_logs/version_N/checkpoints/)."
        )
    return yaml.safe_load(path.read_text())


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file (a retrained checkpoint is another run for ``--resume``, whatever its size and times)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """Tuples as lists (YAML and checkpoints store sequences as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _normalised(name: str, value: Any) -> Any:
    if name.endswith("precision") and value in (None, 32, "32", "32-true"):
        return "32-true"  # Lightning's default spelled four ways
    return _plain(value)


def _differences(part: str, saved: Any, expected: dict[str, Any]) -> list[str]:
    if not isinstance(saved, dict):
        return [f"{part}: missing (a checkpoint of `ccim fit` has it; one saved from Python may not)"]
    flat = _flat(saved)
    problems = []
    for name, value in expected.items():
        if name not in flat:
            problems.append(f"{part}.{name}: not in the checkpoint, benchmark {value!r}")
        elif _normalised(name, flat[name]) != _normalised(name, value):
            problems.append(f"{part}.{name}: checkpoint {flat[name]!r}, benchmark {value!r}")
    return problems


def checkpoint_mismatches(
    checkpoint: dict[str, Any],
    model: dict[str, Any],
    data: dict[str, Any],
    steps: int,
    run_config: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> list[str]:
    """What in ``checkpoint`` (and its run config) differs from the benchmark's run: one line per field.

    Args:
        checkpoint: A checkpoint written by ``ccim fit`` (``hyper_parameters`` and ``datamodule_hyper_parameters``).
        model: :func:`expected_model`.
        data: :func:`expected_data`.
        steps: :func:`training_steps` of the benchmark's configuration.
        run_config: The run's ``config.yaml`` (:func:`read_run_config`), checked against ``run``.
        run: :func:`expected_run`.

    Returns:
        ``"field: checkpoint X, benchmark Y"`` lines; empty when the checkpoint was trained as the benchmark trains.
    """
    problems = _differences("hyper_parameters", checkpoint.get("hyper_parameters"), model)
    problems += _differences("datamodule_hyper_parameters", checkpoint.get("datamodule_hyper_parameters"), data)
    if run is not None:
        problems += _differences("config.yaml", run_config, run)
    if checkpoint.get("global_step") != steps:
        problems.append(f"global_step: checkpoint {checkpoint.get('global_step')!r}, benchmark {steps} (the epochs)")
    return problems
