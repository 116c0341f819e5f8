"""``ccim build-dictionary``: builds and saves a config's confounder dictionary alone (e.g. once before a cluster job).

It uses the run's ``--dictionary.*`` recipe (scene CNN, weights, seed, masking, cache) and the model's
``num_prototypes`` / ``confounder_dim``, so a later ``ccim fit`` with the same config, overrides and
``--dictionary.cache`` reuses the file instead of building again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ccim_lightning.commands.cli import build_cli
from ccim_lightning.commands.errors import CommandError
from ccim_lightning.dictionary.collectives import Collectives
from ccim_lightning.dictionary.recipe import dictionary_summary

log = logging.getLogger(__name__)

HELP = "build and save the confounder dictionary alone (e.g. once before a cluster job)"
DESCRIPTION = (
    "Build the confounder dictionary of a config and save it. Any `ccim fit` option is accepted "
    "(--config, --data.*, --model.*, --dictionary.*, --trainer.*); see `ccim fit --help`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's own options; everything else is the config and its overrides."""
    parser.add_argument("--out", default=None, help="where to save (default: --dictionary.cache)")


def run(options: argparse.Namespace, config_args: list[str]) -> Path:
    """Builds the dictionary of ``config_args`` and saves it to ``--out`` (else ``--dictionary.cache``).

    Args:
        options: The subcommand's own options (:func:`add_arguments`).
        config_args: ``--config`` files and overrides, in command-line order, as for ``ccim fit``.

    Returns:
        Where the dictionary was saved.

    Raises:
        CommandError: No place to save it, or a model that uses no dictionary.
    """
    cli = build_cli(config_args, run=False)
    recipe = cli.recipe
    out = Path(options.out).expanduser() if options.out else recipe.cache_path
    if out is None:
        raise CommandError("build-dictionary: say where to save it: --out FILE, or --dictionary.cache FILE.")
    if not cli.model.needs_dictionary:
        raise CommandError("build-dictionary: the model uses no dictionary (attention='none', no debias method).")
    recipe = dataclasses.replace(recipe, cache=str(out))  # the build writes it, once, on rank 0
    cli.datamodule.setup("fit")
    num_prototypes, dim = cli.model.dictionary_shape
    collectives = Collectives.current(cli.trainer.strategy.root_device)
    dictionary = recipe.load_or_build(cli.datamodule, num_prototypes, dim, collectives)
    if not out.exists():  # a random dictionary is not written by the build
        dictionary.save(out)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in dictionary_summary(dictionary).items())
    log.info("Confounder dictionary saved to %s: %s", out, summary)
    return out
