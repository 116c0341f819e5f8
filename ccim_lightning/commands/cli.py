"""The ``ccim`` config parser: LightningCLI with the CCIM model, any datamodule, the recipe and the CCIM callbacks.

Every subcommand reads its config and overrides here: ``fit | validate | test | predict`` run through
LightningCLI's own subcommands (:func:`build_cli` with ``run=True``); ``build-dictionary`` and ``bias-report``
instantiate the same objects without running a trainer method (``run=False``). The named groups are
``--dictionary.*`` (parsed straight into a :class:`~ccim_lightning.dictionary.recipe.DictionaryRecipe`, from which
the ``ConfounderDictionaryCallback`` is built), ``--checkpoint.*`` (``ModelCheckpoint``) and ``--guard.*``
(``FiniteLossGuard``). A ``--ckpt_path`` is loaded weights-only and checked against the config first.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from ccim_lightning.callbacks import ConfounderDictionaryCallback, FiniteLossGuard, PredictionWriter
from ccim_lightning.callbacks.prediction_writer import default_predictions_path
from ccim_lightning.commands.checkpoint_config import check_checkpoint_matches_config, find_last_checkpoint
from ccim_lightning.dictionary.recipe import DictionaryRecipe
from ccim_lightning.module import CCIMLightningModule

log = logging.getLogger(__name__)


def scene_feature_dim(extractor: str) -> int:
    """Width of a timm scene CNN's pooled features: the model's ``confounder_dim`` follows from the extractor."""
    import timm  # only when the link is computed: timm's import is slow and `ccim --help` does not need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(extractor, pretrained=False, num_classes=0)
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


class CCIMCLI(LightningCLI):
    """LightningCLI in subclass mode for the model and the data, with the dictionary recipe and the CCIM callbacks.

    Links (set once, in one place): the datamodule's ``num_classes``, ``task`` and ``class_names`` go into the
    model; the scene CNN (``--dictionary.extractor``) sets the model's ``confounder_dim``.

    Attributes:
        recipe: The run's dictionary recipe (``--dictionary.*``), once the classes are instantiated.
    """

    recipe: DictionaryRecipe

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(DictionaryRecipe, "dictionary")
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

    @override
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        self.recipe = config["dictionary"]
        trainer = super().instantiate_trainer(**kwargs)
        # Where a `dictionary` callback group used to sit: before the checkpoint callbacks, which Lightning keeps last.
        callbacks = trainer.callbacks
        first_checkpoint = next((i for i, cb in enumerate(callbacks) if isinstance(cb, Checkpoint)), len(callbacks))
        callbacks.insert(first_checkpoint, ConfounderDictionaryCallback(self.recipe))
        _monitor_map_for_multilabel(callbacks, getattr(self.model, "task", None))
        return trainer

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


#: Metrics only a multiclass model logs; a multilabel model logs ``mAP`` in their place (both: higher is better).
MULTICLASS_ONLY_METRICS = ("val/acc", "val/macro_acc")


def _monitor_map_for_multilabel(callbacks: list, task: str | None) -> None:
    """Points a checkpoint monitor of a multiclass-only metric at ``val/mAP`` for a multilabel model, saying so.

    A config written for multiclass data (``configs/synthetic.yaml`` monitors ``val/acc``) then also trains
    ``--data.init_args.task multilabel`` instead of failing after the first epoch on a metric that is never logged.
    """
    if task != "multilabel":
        return
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor in MULTICLASS_ONLY_METRICS:
            log.warning(
                "checkpoint.monitor=%s is logged for multiclass models only; this multilabel model is monitored on "
                "val/mAP (mode %s). Pass --checkpoint.monitor to choose another metric.",
                callback.monitor,
                callback.mode,
            )
            callback.monitor = "val/mAP"


def build_cli(args: list[str], run: bool = True) -> CCIMCLI:
    """Parses ``args``, instantiates model, data, recipe and trainer, and (with ``run``) runs the subcommand.

    Args:
        args: Arguments as on the command line (``["fit", "--config", "configs/synthetic.yaml"]``).
        run: Run the subcommand; with False, ``args`` hold no subcommand and only the objects are built.

    Returns:
        The CLI, with ``model``, ``datamodule``, ``recipe`` and ``trainer`` (and the trainer's metrics after a run).
    """
    with warnings.catch_warnings():
        # `ccim` always passes the arguments it has split off its own command line, while sys.argv holds all of it.
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
