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
import os
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from ccim_lightning.callbacks import ConfounderDictionaryCallback, FiniteLossGuard, PredictionWriter
from ccim_lightning.callbacks.prediction_writer import default_predictions_path
from ccim_lightning.checkpoints import AtomicCheckpointIO
from ccim_lightning.commands.checkpoint_config import (
    check_checkpoint_filename,
    check_checkpoint_matches_config,
    find_last_checkpoint,
)
from ccim_lightning.commands.errors import CommandError
from ccim_lightning.dictionary.recipe import DictionaryRecipe
from ccim_lightning.module import CCIMLightningModule

log = logging.getLogger(__name__)

#: The logger's folder under ``default_root_dir`` (Lightning's default name), holding one ``version_N`` per run.
LOGS_FOLDER = "lightning_logs"


def claim_version_folder(parent: Path) -> Path:
    """Creates and returns the next free ``version_N`` folder under ``parent``; safe against concurrent runs.

    ``os.mkdir`` either creates the folder or fails because another process created it first, so two runs started
    together can never both get ``version_N``: the loser takes the next number. (Lightning's loggers only list the
    folders and create theirs later, so two runs could pick the same number.)

    Args:
        parent: The logger's folder (``<default_root_dir>/lightning_logs``); created if missing.

    Returns:
        The new, empty folder, owned by the caller.
    """
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
        folder = parent / f"version_{max(taken, default=-1) + 1}"
        try:
            os.mkdir(folder)
        except FileExistsError:  # another run took this number between the listing and the mkdir
            continue
        return folder


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
        section = self.config[subcommand] if subcommand else self.config
        _check_linked_confounder_dim(args, section)
        if not subcommand:
            return
        if "weights_only" in section and section.weights_only is None:
            section.weights_only = True  # Lightning would unpickle a --ckpt_path fully; its own default is None
        check_checkpoint_filename(section.checkpoint.filename, section.checkpoint.auto_insert_metric_name)
        if section.get("ckpt_path") == "last":
            section["ckpt_path"] = str(find_last_checkpoint(Path(section.trainer.default_root_dir or ".")))
        # Next, LightningCLI replaces the model config by the checkpoint's hyper-parameters (reading the file with
        # torch.load): check the file and compare it with what the user asked for first.
        self._checkpoint_states: dict[str, Any] = {}
        if section.get("ckpt_path"):
            checkpoint = check_checkpoint_matches_config(section.ckpt_path, section.model)
            self._checkpoint_states = checkpoint.get("callbacks") or {}

    @override
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        self.recipe = config["dictionary"]
        trainer_config = config.get("trainer") or {}
        saving = trainer_config.get("enable_checkpointing") is not False
        if not saving:  # LightningCLI adds the --checkpoint.* callback, which the Trainer refuses without this
            kwargs["enable_checkpointing"] = True
        if self.subcommand is None:  # build-dictionary, bias-report: no run, hence no run folder and no logs
            kwargs.setdefault("logger", False)
        elif _default_logger(trainer_config):
            kwargs.setdefault("logger", self._logger_of_a_claimed_folder(trainer_config))
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the public plugin slot; a user's own stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        debugging = _debugging_mode(trainer_config)
        if not saving or (debugging and self.subcommand == "fit"):
            trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, Checkpoint)]
            reason = "--trainer.enable_checkpointing false" if not saving else debugging
            log.warning(
                "%s: no checkpoint is saved by this run, so `--ckpt_path last` will not find one from it.", reason
            )
        # Where a `dictionary` callback group used to sit: before the checkpoint callbacks, which Lightning keeps last.
        callbacks = trainer.callbacks
        first_checkpoint = next((i for i, cb in enumerate(callbacks) if isinstance(cb, Checkpoint)), len(callbacks))
        callbacks.insert(first_checkpoint, ConfounderDictionaryCallback(self.recipe))
        _monitor_map_for_multilabel(callbacks, getattr(self.model, "task", None))
        return trainer

    def _logger_of_a_claimed_folder(self, trainer_config: Any) -> TensorBoardLogger | bool:
        """Lightning's default logger, but in a ``version_N`` folder this run has claimed (on rank 0 only).

        Other ranks keep Lightning's default: the run folder (``trainer.log_dir``) and the checkpoint folder are
        rank 0's, broadcast by Lightning. Under SLURM Lightning names the folder after the job id; that stays too.
        """
        if rank_zero_only.rank != 0 or os.environ.get("SLURM_JOB_ID") or _debugging_mode(trainer_config):
            return True  # fast_dev_run replaces the logger by a dummy: no folder to claim
        root = Path(trainer_config.get("default_root_dir") or os.getcwd())
        folder = claim_version_folder(root / LOGS_FOLDER)
        return TensorBoardLogger(save_dir=root, name=LOGS_FOLDER, version=folder.name)

    def _keep_checkpoint_state(self) -> None:
        # Outside `fit` nothing is saved, but Lightning restores the callbacks' states from --ckpt_path and warns about
        # any it cannot give back (or whose folder changed): point each ModelCheckpoint at the folder it was saved in.
        for callback in self.trainer.callbacks:
            state = self._checkpoint_states.get(callback.state_key) if isinstance(callback, ModelCheckpoint) else None
            if isinstance(state, dict) and state.get("dirpath"):
                callback.dirpath = state["dirpath"]

    @override
    def before_validate(self) -> None:
        self._keep_checkpoint_state()

    @override
    def before_test(self) -> None:
        self._keep_checkpoint_state()

    @override
    def before_predict(self) -> None:
        self._keep_checkpoint_state()

    @override
    def after_predict(self) -> None:
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            would = default_predictions_path(self.trainer)  # a collective under DDP: every rank asks
            log.warning(
                "ccim predict: the config has no PredictionWriter, so the predictions were only returned in memory, "
                "not written. Add --trainer.callbacks+=ccim_lightning.callbacks.PredictionWriter to write them to %s.",
                would,
            )


#: Where a config or command line may set the model's confounder_dim, which the link sets from the scene CNN.
_CONFOUNDER_DIM_KEYS = (("model", "init_args", "confounder_dim"), ("model", "confounder_dim"))


def _given_confounder_dim(args: Any) -> tuple[str, Any] | None:
    """The last ``confounder_dim`` the command line or its ``--config`` files give, with where; None if none does.

    The link from ``--dictionary.extractor`` overwrites the value in the parsed config, so it is looked up here.
    """
    if not isinstance(args, list | tuple):
        return None
    found, words = None, [str(a) for a in args]
    for i, word in enumerate(words):
        option, has_value, value = word.partition("=")
        if not has_value:
            value = words[i + 1] if i + 1 < len(words) else ""
        if option == "--config" and Path(value).is_file():
            node: Any = yaml.safe_load(Path(value).read_text()) or {}
            for keys in _CONFOUNDER_DIM_KEYS:
                leaf = node
                for key in keys:
                    leaf = leaf.get(key) if isinstance(leaf, dict) else None
                if leaf is not None:
                    found = (f"{'.'.join(keys)} in {value}", leaf)
        elif option in {"--" + ".".join(keys) for keys in _CONFOUNDER_DIM_KEYS}:
            found = (option, value)
    return found


def _check_linked_confounder_dim(args: Any, section: Any) -> None:
    """Refuses a ``confounder_dim`` the user gave that differs from the width the scene CNN's link set."""
    given = _given_confounder_dim(args)
    linked = section.get("model", {}).get("init_args", {}).get("confounder_dim") if section.get("model") else None
    if given is None or linked is None or str(given[1]) == str(linked):
        return
    extractor = section.get("dictionary", {}).get("extractor")
    raise CommandError(
        f"{given[0]} is {given[1]}, but the model's confounder_dim follows from the scene CNN: "
        f"--dictionary.extractor {extractor} gives features of width {linked}, and the dictionary holds those "
        f"features. Remove the confounder_dim setting, or choose an extractor whose features have {given[1]} values."
    )


def _default_logger(trainer_config: Any) -> bool:
    """Whether the trainer gets Lightning's default logger (``logger`` unset or true)."""
    return trainer_config.get("logger") in (None, True)


def _debugging_mode(trainer_config: Any) -> str | None:
    """The debugging setting whose model must not become a checkpoint, or None.

    ``fast_dev_run`` (a few batches to find crashes) and ``overfit_batches`` (fits a handful of batches on purpose)
    are debugging runs. ``limit_train_batches`` < 1 is not: training on a fraction of the data is a legitimate run
    (and so is a small ``max_steps``), and its checkpoints are kept.
    """
    if trainer_config.get("fast_dev_run"):
        return f"--trainer.fast_dev_run {trainer_config['fast_dev_run']}"
    if trainer_config.get("overfit_batches"):
        return f"--trainer.overfit_batches {trainer_config['overfit_batches']}"
    return None


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
