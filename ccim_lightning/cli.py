"""The ``ccim`` command: LightningCLI for ``fit | validate | test | predict`` with any host and datamodule."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ccim_lightning.module import CCIMLightningModule


class CCIMCLI(LightningCLI):
    """LightningCLI in subclass mode for the model and the data.

    The datamodule's ``num_classes``, ``task`` and ``class_names`` are linked into the model, so a config names
    them once (in the data section).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "task", "class_names"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def build_cli(args: list[str] | None = None, run: bool = True) -> CCIMCLI:
    """Parses ``args`` (default: the command line), instantiates model, data and trainer, and runs the subcommand.

    Args:
        args: Arguments as on the command line (``["fit", "--config", "configs/synthetic.yaml"]``).
        run: Run the subcommand; with False, ``args`` hold no subcommand and only the objects are built.

    Returns:
        The CLI, with ``model``, ``datamodule`` and ``trainer`` (and the trainer's metrics after a run).
    """
    return CCIMCLI(
        CCIMLightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def build_dictionary(args: list[str]) -> Path:
    """``ccim build-dictionary --config X.yaml [--out FILE] [overrides]``: builds and saves the dictionary alone.

    Uses the config's ``ConfounderDictionaryCallback`` (scene CNN, weights, seed, masking, cache) and the model's
    ``num_prototypes`` / ``confounder_dim``, so a later ``ccim fit`` with the same config and ``cache`` reuses the
    file instead of building again (e.g. once before a cluster job).

    Args:
        args: Command-line arguments after ``build-dictionary``.

    Returns:
        Where the dictionary was saved.
    """
    from ccim_lightning.callbacks import ConfounderDictionaryCallback

    extra = argparse.ArgumentParser(prog="ccim build-dictionary", add_help=False)
    extra.add_argument("--out", default=None, help="where to save (default: the callback's `cache`)")
    known, rest = extra.parse_known_args(args)
    cli = build_cli(rest, run=False)
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, ConfounderDictionaryCallback)]
    if not callbacks:
        raise SystemExit("ccim build-dictionary: the config has no ConfounderDictionaryCallback in trainer.callbacks.")
    callback = callbacks[0]
    out = Path(known.out) if known.out else callback.cache
    if out is None:
        raise SystemExit("ccim build-dictionary: say where to save it: --out FILE, or set the callback's `cache`.")
    head = cli.model.head
    if not head.uses_dictionary:
        raise SystemExit("ccim build-dictionary: the model's head has attention='none' and uses no dictionary.")
    cli.datamodule.setup("fit")
    num_prototypes, dim = head.dictionary.shape
    dictionary = callback.build(cli.trainer, num_prototypes, dim, datamodule=cli.datamodule)
    dictionary.save(out)
    logging.getLogger(__name__).info(
        "Confounder dictionary (%d x %d, %d samples) saved to %s", num_prototypes, dim, dictionary.num_samples, out
    )
    return out


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ccim`` console script.

    Subcommands: LightningCLI's ``fit``, ``validate``, ``test``, ``predict``; and ``build-dictionary`` (the
    confounder dictionary alone) and ``bias-report`` (how much a dataset's context predicts its emotions).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news to users
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["build-dictionary"]:
        build_dictionary(argv[1:])
    elif argv[:1] == ["bias-report"]:
        from ccim_lightning.analysis.command import main as bias_report_main

        bias_report_main(argv[1:])
    else:
        build_cli(args)  # None: LightningCLI reads sys.argv itself (and warns when given both)


if __name__ == "__main__":
    main()
