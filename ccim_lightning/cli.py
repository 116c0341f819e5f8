"""The ``ccim`` command: LightningCLI's ``fit | validate | test | predict``, ``build-dictionary``, ``bias-report``.

All six read the same configs and overrides.
Thin on purpose: it parses, builds the objects and hands them down. The callbacks that always go with a CCIM model
are named groups: ``--dictionary.*`` (``ConfounderDictionaryCallback``), ``--checkpoint.*`` (``ModelCheckpoint``) and
``--guard.*`` (``FiniteLossGuard``). Checkpoints given as ``--ckpt_path`` are loaded weights-only and checked first.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from ccim_lightning.callbacks import ConfounderDictionaryCallback, FiniteLossGuard, PredictionWriter
from ccim_lightning.callbacks.prediction_writer import default_predictions_path
from ccim_lightning.module import CCIMLightningModule

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
SUBCOMMANDS = {
    "fit": "train a model (builds the confounder dictionary first)",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test split(s)",
    "predict": "write per-sample predictions",
    "build-dictionary": "build and save the confounder dictionary alone (e.g. once before a cluster job)",
    "bias-report": "how much a dataset's context predicts its emotions (tables, plots, summary)",
    "predict-files": "predict the persons of a folder of images or a video (boxes from a CSV or a detector)",
}


class CheckpointConfigMismatch(ValueError):
    """``--ckpt_path`` holds a model whose shape-defining settings differ from the config's."""


def scene_feature_dim(extractor: str) -> int:
    """Width of a timm scene CNN's pooled features: the model's ``confounder_dim`` follows from the extractor."""
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(extractor, pretrained=False, num_classes=0)
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


class CCIMCLI(LightningCLI):
    """LightningCLI in subclass mode for the model and the data, with the CCIM callbacks as named groups.

    Links (set once, in one place): the datamodule's ``num_classes``, ``task`` and ``class_names`` go into the
    model; the scene CNN (``--dictionary.extractor``) sets the model's ``confounder_dim``.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ConfounderDictionaryCallback, "dictionary")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(FiniteLossGuard, "guard")
        parser.set_defaults({"checkpoint.save_last": True})
        for name in ("num_classes", "task", "class_names"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.link_arguments(
            "dictionary.extractor", "model.init_args.confounder_dim", compute_fn=scene_feature_dim, apply_on="parse"
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        if "weights_only" in section and section.weights_only is None:
            section.weights_only = True  # Lightning would unpickle a --ckpt_path fully; its own default is None
        if section.get("ckpt_path") == "last":
            section["ckpt_path"] = str(find_last_checkpoint(Path(section.trainer.default_root_dir or ".")))
        # Next, LightningCLI replaces the model config by the checkpoint's hyper-parameters (reading the file with
        # torch.load): check the file and compare it with what the user asked for first.
        if section.get("ckpt_path"):
            check_checkpoint_matches_config(section.ckpt_path, section.model)

    def _drop_checkpointing(self) -> None:
        # Outside `fit` nothing is saved; Lightning would still restore the callback's state from --ckpt_path and warn
        # that its folder changed (each run has its own).
        self.trainer.callbacks = [cb for cb in self.trainer.callbacks if not isinstance(cb, ModelCheckpoint)]

    @override
    def before_validate(self) -> None:
        self._drop_checkpointing()

    @override
    def before_test(self) -> None:
        self._drop_checkpointing()

    @override
    def before_predict(self) -> None:
        self._drop_checkpointing()

    @override
    def after_predict(self) -> None:
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            would = default_predictions_path(self.trainer)  # a collective under DDP: every rank asks
            log.warning(
                "ccim predict: the config has no PredictionWriter, so the predictions were only returned in memory, "
                "not written. Add --trainer.callbacks+=ccim_lightning.callbacks.PredictionWriter to write them to %s.",
                would,
            )


def find_last_checkpoint(root: Path) -> Path:
    """``last.ckpt`` of the most recent run under ``root`` (what ``--ckpt_path last`` means); says which it took."""
    candidates = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(
            f"ccim: --ckpt_path last: no run under {str(root)!r} has a checkpoints/last.ckpt; train one with "
            "`ccim fit` first or give the checkpoint's path."
        )
    others = len(candidates) - 1
    log.info("--ckpt_path last: %s (the newest of %d runs under %s)", candidates[-1], others + 1, root)
    return candidates[-1]


def _plain(value: Any) -> Any:
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        value = as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("_instantiator", "_class_path")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_checkpoint_matches_config(ckpt_path: str, user_model: Any) -> None:
    """Stops when the checkpoint's shape-defining model settings differ from the config's; logs the others.

    Args:
        ckpt_path: The ``--ckpt_path`` file.
        user_model: The model section the user's config and overrides gave (before the checkpoint's merge).

    Raises:
        CheckpointConfigMismatch: Naming every differing shape-defining field with both values.
    """
    from ccim_lightning.checkpoints import check_checkpoint_finite, load_checkpoint

    checkpoint = load_checkpoint(ckpt_path)  # weights-only; every failure names the file
    check_checkpoint_finite(checkpoint, ckpt_path)
    saved = checkpoint.get("hyper_parameters") or {}
    if not saved:
        return
    user = _plain(user_model)
    given = user.get("init_args", {}) if isinstance(user, dict) else {}
    saved = _plain(saved)
    linked = ("num_classes", "task", "class_names")  # filled from the datamodule at instantiation, None here
    differing = {k for k in given.keys() & saved.keys() if given[k] != saved[k] and k not in linked}
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


def build_cli(args: list[str] | None = None, run: bool = True) -> CCIMCLI:
    """Parses ``args`` (default: the command line), instantiates model, data and trainer, and runs the subcommand.

    Args:
        args: Arguments as on the command line (``["fit", "--config", "configs/synthetic.yaml"]``).
        run: Run the subcommand; with False, ``args`` hold no subcommand and only the objects are built.

    Returns:
        The CLI, with ``model``, ``datamodule`` and ``trainer`` (and the trainer's metrics after a run).
    """
    with warnings.catch_warnings():
        # Our own subcommands pass their remaining arguments explicitly while sys.argv holds the whole line.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return CCIMCLI(
            CCIMLightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def dictionary_recipe(cli: CCIMCLI):
    """The run's dictionary recipe (the ``--dictionary.*`` group)."""
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, ConfounderDictionaryCallback)]
    return callbacks[0].recipe


def build_dictionary(args: list[str]) -> Path:
    """``ccim build-dictionary --config X.yaml [--out FILE] [overrides]``: builds and saves the dictionary alone.

    Uses the run's ``--dictionary.*`` settings (scene CNN, weights, seed, masking, cache) and the model's
    ``num_prototypes`` / ``confounder_dim``, so a later ``ccim fit`` with the same config, overrides and
    ``--dictionary.cache`` reuses the file instead of building again (e.g. once before a cluster job).

    Args:
        args: Command-line arguments after ``build-dictionary``.

    Returns:
        Where the dictionary was saved.
    """
    from ccim_lightning.dictionary.recipe import dictionary_summary

    extra = argparse.ArgumentParser(
        prog="ccim build-dictionary",
        description="Build the confounder dictionary of a config and save it. Any `ccim fit` option is accepted "
        "(--config, --data.*, --model.*, --dictionary.*, --trainer.*); see `ccim fit --help`.",
    )
    extra.add_argument("--out", default=None, help="where to save (default: --dictionary.cache)")
    known, rest = extra.parse_known_args(args)
    cli = build_cli(rest, run=False)
    recipe = dictionary_recipe(cli)
    out = Path(known.out) if known.out else recipe.cache_path
    if out is None:
        raise SystemExit("ccim build-dictionary: say where to save it: --out FILE, or --dictionary.cache FILE.")
    if not cli.model.needs_dictionary:
        raise SystemExit("ccim build-dictionary: the model uses no dictionary (attention='none', no debias method).")
    if known.out:
        recipe.cache = str(out)  # the build writes it, once, on rank 0
    cli.datamodule.setup("fit")
    num_prototypes, dim = cli.model.dictionary_shape
    dictionary = recipe.load_or_build(cli.trainer.strategy, cli.datamodule, num_prototypes, dim)
    if not out.exists():  # a random dictionary is not written by the build
        dictionary.save(out)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in dictionary_summary(dictionary).items())
    log.info("Confounder dictionary saved to %s: %s", out, summary)
    return out


def print_overview() -> None:
    """``ccim --help``: every subcommand, one line each."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    print("usage: ccim SUBCOMMAND [options]\n\nsubcommands:\n" + "\n".join(lines))
    print("\n`ccim SUBCOMMAND --help` lists a subcommand's options; all take --config FILE and the same overrides.")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ccim`` console script: input errors end in one message naming the file or field."""
    from ccim_lightning.checkpoints import CheckpointError

    # Lightning's own use of a torch API that newer torch deprecates: news to Lightning, not to our users.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    caller_group = _process_group_open()  # a group the calling program opened is its own to close
    try:
        _run(args)
    except (CheckpointConfigMismatch, CheckpointError, FileNotFoundError, IsADirectoryError) as error:
        raise SystemExit(f"ccim: error: {error}") from error
    if not caller_group and _process_group_open():
        close_process_group()


def _process_group_open() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def close_process_group() -> None:
    """Destroys the default process group the command opened, once it has finished on this rank.

    Lightning leaves the group open after ``fit``/``test``/``predict``; a gloo group still open at interpreter exit
    can abort the process ("terminate called without an active exception", exit -6; pytorch/pytorch#190489) after
    all the work was done. Only after success: destroying while another rank is still in a collective can hang.
    """
    torch.distributed.destroy_process_group()


def _run(args: list[str] | None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print_overview()
        return
    if argv[0] == "build-dictionary":
        build_dictionary(argv[1:])
    elif argv[0] == "bias-report":
        from ccim_lightning.analysis.command import main as bias_report_main

        bias_report_main(argv[1:])
    elif argv[0] == "predict-files":
        from ccim_lightning.commands.predict_files import main as predict_files_main

        predict_files_main(argv[1:])
    elif argv[0] in SUBCOMMANDS:
        build_cli(args)  # None: LightningCLI reads sys.argv itself
    else:
        raise SystemExit(f"ccim: unknown subcommand {argv[0]!r}; one of: {', '.join(SUBCOMMANDS)}.")


if __name__ == "__main__":
    main()
