"""``ccim bias-report``: how much a dataset's context predicts its emotions, as tables, plots and a summary.

Two ways in:

- ``--table FILE --context-column C --label-column L``: the context is a column of an annotation table.
- ``--config X.yaml [config overrides]``: the context is each training sample's confounder-dictionary cluster
  (:mod:`~ccim_lightning.commands.dictionary_contexts`). As for every ``ccim`` subcommand, any option that is not
  one of the bias report's own goes, in order, to the ``ccim fit`` config parser, so ``--data.init_args.root``,
  ``--data.init_args.bias 0.5``, ``--trainer.accelerator cpu``, ``--model.init_args.num_prototypes 64``... work as
  there.

The statistics, tables and plots are :mod:`ccim_lightning.analysis` (numpy, pandas, matplotlib).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ccim_lightning.analysis.plots import write_figures
from ccim_lightning.analysis.report import BiasReport, write_tables
from ccim_lightning.analysis.sources import ContextLabels, read_annotation_table
from ccim_lightning.analysis.statistics import compute_bias_report
from ccim_lightning.commands.cli import build_cli
from ccim_lightning.commands.dictionary_contexts import check_dictionary_file, cluster_contexts
from ccim_lightning.commands.errors import CommandError
from ccim_lightning.dictionary.store import DictionaryFileError

__all__ = ["add_arguments", "run", "write_bias_report"]

HELP = "how much a dataset's context predicts its emotions (tables, plots, summary)"
DESCRIPTION = "How much a dataset's context predicts its emotions: tables, plots and a text summary."
EPILOG = (
    "Give --table FILE (with --context-column and --label-column), or --config FILE (a ccim YAML config, "
    "repeatable as for `ccim fit`: the context is then each training sample's dictionary cluster). With --config, "
    "every other option is a config override as for `ccim fit` (e.g. --data.init_args.bias 0.5, "
    "--data.init_args.root /path/to/data, --trainer.accelerator cpu, --model.init_args.num_prototypes 64; "
    "see `ccim fit --help`)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bias report's own options; everything else is the config and its overrides (cluster mode)."""
    parser.add_argument("--table", help="annotation table (CSV/TSV): the context is one of its columns, no images")
    parser.add_argument("--dictionary", help="with --config: a confounder dictionary file to assign samples to")
    parser.add_argument("--context-column", help="with --table: the context column (e.g. Folder)")
    parser.add_argument("--label-column", help="with --table: the label column (e.g. Categorical_Labels)")
    parser.add_argument("--out", default="bias_report", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--min-count",
        type=int,
        default=20,
        help="contexts with fewer samples are left out of rankings and plots (default: %(default)s)",
    )
    parser.add_argument(
        "--permutations",
        type=int,
        default=5,
        help="shuffled-context repeats for the chance level, 0 = none (default: %(default)s)",
    )
    parser.add_argument("--top", type=int, default=10, help="entries per ranking in the summary (default: %(default)s)")
    parser.add_argument("--max-heatmap-contexts", type=int, default=40, help="heatmap rows (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="with --config: device of the scene CNN (default: auto)")
    parser.add_argument("--batch-size", type=int, help="with --config: feature-extraction batch size")
    parser.add_argument("--num-workers", type=int, help="with --config: data-loader workers")


HOW_TO_READ = """How to read the numbers:
  I(K;Y)/H(Y), I(K;e)/H(e): the share of the label's uncertainty that knowing the context removes (0: the context
    says nothing about the label, 1: it decides it); "chance" is the same with the contexts shuffled, what a finite
    sample shows without any bias.
  NMI: normalised mutual information of context and label (0 to 1), with its chance level likewise.
  KL: how far a context's labels are from the overall ones (nats); contribution = the context's share x KL, its part
    of I(K;Y).
  xR (ratio) = P(e | context) / P(e): x2.00 means the emotion is twice as frequent in that context as overall,
    x0.50 half as frequent.
  H(e|k)/H(e): the emotion's uncertainty inside the context relative to overall (0: the context always or never
    shows it). entropy_histograms.png shows, per emotion, how many contexts fall in each range of it."""
"""Printed after the summary and appended to ``summary.txt``: what its ratios mean."""


def write_bias_report(
    report: BiasReport, out_dir: str | os.PathLike, max_heatmap_contexts: int = 40
) -> dict[str, Path]:
    """Writes the report's tables, summary and plots into ``out_dir`` (created if needed).

    Files: ``contexts.csv``, ``context_emotion.csv``, ``emotions.csv``, ``summary.txt`` (with :data:`HOW_TO_READ`
    at its end), ``summary.json``
    (:func:`~ccim_lightning.analysis.report.write_tables`) and ``ratio_heatmap.png``, ``entropy_histograms.png``
    (:func:`~ccim_lightning.analysis.plots.write_figures`; none when no context has ``min_count`` samples).

    Args:
        report: The report.
        out_dir: Output folder.
        max_heatmap_contexts: Most rows of the heatmap.

    Returns:
        The written files by kind (``"contexts"``, ``"cells"``, ``"emotions"``, ``"summary"``, ``"summary_json"``,
        ``"heatmap"``, ``"histograms"``).
    """
    paths = write_tables(report, out_dir)
    with open(paths["summary"], "a", encoding="utf-8") as summary:
        summary.write(f"\n{HOW_TO_READ}\n")
    return paths | write_figures(report, out_dir, max_heatmap_contexts)


def run(options: argparse.Namespace, config_args: list[str]) -> BiasReport:
    """Computes the report, writes it, prints the summary; returns the report.

    Args:
        options: The bias report's own options (:func:`add_arguments`).
        config_args: The other command-line arguments, in order: ``--config`` files and their overrides (refused
            with ``--table``).

    Raises:
        CommandError: Misplaced or missing options, an unreadable table, or an unusable dictionary file.
    """
    data = _load_context_labels(options, config_args)
    report = compute_bias_report(
        data.contexts,
        data.labels,
        emotion_names=data.emotion_names,
        multi_label=data.multi_label,
        min_count=options.min_count,
        permutations=options.permutations,
        context_name=data.context_name,
        top=options.top,
    )
    paths = write_bias_report(report, options.out, options.max_heatmap_contexts)
    print(report.to_text())
    print(HOW_TO_READ)
    print(f"Written to {Path(options.out)}: {', '.join(sorted(p.name for p in paths.values()))}")
    return report


def _load_context_labels(options: argparse.Namespace, config_args: list[str]) -> ContextLabels:
    """The contexts and labels the arguments ask for, with clear errors for misplaced options."""
    if options.table is not None:
        return _table_contexts(options, config_args)
    if not config_args:
        raise CommandError("bias-report needs --table FILE (an annotation table) or --config FILE (a ccim config).")
    if options.context_column or options.label_column:
        raise CommandError("bias-report: --context-column and --label-column go with --table, not with --config.")
    given = None
    if options.dictionary:
        try:  # a wrong file fails before the config is even read
            given = check_dictionary_file(options.dictionary)
        except (DictionaryFileError, ValueError) as error:
            raise CommandError(f"bias-report --dictionary: {error}") from error
    cli = build_cli(config_args, run=False)
    return cluster_contexts(
        cli.recipe,
        cli.datamodule,
        cli.model.dictionary_shape,
        given,
        given_path=options.dictionary,
        device=options.device,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
    )


def _table_contexts(options: argparse.Namespace, config_args: list[str]) -> ContextLabels:
    """Table mode: only the bias report's own options apply."""
    missing = [
        f"--{name.replace('_', '-')}" for name in ("context_column", "label_column") if not getattr(options, name)
    ]
    if missing:
        raise CommandError(f"bias-report --table needs {' and '.join(missing)}.")
    if options.dictionary:
        raise CommandError("bias-report: --dictionary goes with --config, not with --table.")
    if config_args:
        raise CommandError(
            f"bias-report: unrecognized arguments {config_args}: with --table only the bias report's own options "
            "apply (config overrides such as --data.init_args.* go with --config; see --help)."
        )
    try:
        return read_annotation_table(options.table, options.context_column, options.label_column)
    except (KeyError, ValueError) as error:
        raise CommandError(f"bias-report --table: {error.args[0] if error.args else error}") from error
