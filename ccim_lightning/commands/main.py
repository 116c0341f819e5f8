"""The ``ccim`` console script: LightningCLI's four, ``build-dictionary``, ``bias-report``, ``predict-files``.

All seven are built one way. One argparse parser reads the subcommand and the subcommand's own options (none for
LightningCLI's four, ``--out`` for ``build-dictionary``, the report's for ``bias-report``); every other argument is
the config and its overrides, kept in command-line order and read by the one config parser,
:func:`~ccim_lightning.commands.cli.build_cli`. Input errors of any subcommand end in one ``ccim: error: ...`` line
naming the file or field; mistakes in the config itself are reported by the config parser with its usage.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ccim_lightning.checkpoints import AtomicWriteError, CheckpointError
from ccim_lightning.commands import bias_report, build_dictionary, predict_files
from ccim_lightning.commands.checkpoint_config import CheckpointConfigMismatch
from ccim_lightning.commands.cli import build_cli
from ccim_lightning.commands.errors import CommandError
from ccim_lightning.dictionary.recipe import DictionarySizeError
from ccim_lightning.dictionary.store import DictionaryFileError

#: What every subcommand may raise for bad input: reported as one line, without a traceback.
INPUT_ERRORS = (
    CommandError,
    CheckpointConfigMismatch,
    CheckpointError,
    DictionaryFileError,  # --dictionary.cache and build-dictionary --out: damaged, foreign or unsafe files
    DictionarySizeError,  # more clusters than training samples: --model.init_args.num_prototypes
    AtomicWriteError,  # a checkpoint, prediction or dictionary file that could not be written (full disk, ...)
    FileNotFoundError,
    IsADirectoryError,
)


@dataclass(frozen=True)
class Subcommand:
    """One ``ccim`` subcommand.

    Attributes:
        help: One line for ``ccim --help``.
        run: ``run(own options, config arguments) -> result``.
        add_arguments: Adds the subcommand's own options to its parser; None for LightningCLI's subcommands, whose
            options (and ``--help``) are all the config parser's.
        description: The subcommand's ``--help`` text, where it has its own parser.
        epilog: Text after its options in ``--help``.
    """

    help: str
    run: Callable[[argparse.Namespace, list[str]], Any]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None
    epilog: str | None = None


def _lightning_subcommand(name: str, help: str) -> Subcommand:
    """A LightningCLI subcommand: the config parser reads all its arguments and runs the trainer method."""
    return Subcommand(help, lambda options, config_args: build_cli([name, *config_args]))


SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": _lightning_subcommand("fit", "train a model (builds the confounder dictionary first)"),
    "validate": _lightning_subcommand("validate", "evaluate on the validation split"),
    "test": _lightning_subcommand("test", "evaluate on the test split(s)"),
    "predict": _lightning_subcommand("predict", "write per-sample predictions"),
    "build-dictionary": Subcommand(
        build_dictionary.HELP, build_dictionary.run, build_dictionary.add_arguments, build_dictionary.DESCRIPTION
    ),
    "bias-report": Subcommand(
        bias_report.HELP, bias_report.run, bias_report.add_arguments, bias_report.DESCRIPTION, bias_report.EPILOG
    ),
    "predict-files": Subcommand(
        predict_files.HELP, predict_files.run, predict_files.add_arguments, predict_files.DESCRIPTION
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``ccim`` parser: the subcommand and its own options; the rest is left for the config parser."""
    width = max(map(len, SUBCOMMANDS))
    overview = "\n".join(f"  {name:<{width}}  {subcommand.help}" for name, subcommand in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="ccim",
        usage="ccim SUBCOMMAND [options]",
        description=f"Context debiasing with CCIM.\n\nsubcommands:\n{overview}",
        epilog="`ccim SUBCOMMAND --help` lists a subcommand's options; all but predict-files take --config FILE "
        "and the same overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the overview's columns as written
        allow_abbrev=False,
    )
    choices = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND", help=argparse.SUPPRESS)
    for name, subcommand in SUBCOMMANDS.items():
        own = subcommand.add_arguments is not None
        sub = choices.add_parser(
            name,
            help=subcommand.help,
            description=subcommand.description,
            epilog=subcommand.epilog,
            add_help=own,  # LightningCLI's subcommands: --help goes to the config parser, which lists their options
            allow_abbrev=False,  # --d... must not swallow a config override's prefix
        )
        if own:
            subcommand.add_arguments(sub)
    return parser


def run_command(args: list[str]) -> Any:
    """Parses a ``ccim`` command line and runs its subcommand.

    Args:
        args: Arguments after ``ccim`` (``["fit", "--config", "configs/synthetic.yaml"]``).

    Returns:
        What the subcommand returns: the CLI for LightningCLI's subcommands, the saved file for
        ``build-dictionary``, the report for ``bias-report``.

    Raises:
        CommandError: And the other :data:`INPUT_ERRORS`, for bad input.
    """
    options, config_args = build_parser().parse_known_args(args)
    return SUBCOMMANDS[options.subcommand].run(options, config_args)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ccim`` console script: input errors end in one message naming the file or field."""
    argv = list(sys.argv[1:] if args is None else args)
    # Lightning's own use of a torch API that newer torch deprecates: news to Lightning, not to our users.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if not argv:
        build_parser().print_help()
        return
    caller_group = _process_group_open()  # a group the calling program opened is its own to close
    try:
        run_command(argv)
    except INPUT_ERRORS as error:
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


if __name__ == "__main__":
    main()
