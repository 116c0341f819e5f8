"""``ccim bias-report``: how much a dataset's context predicts its emotions, as tables, plots and a summary.

Two ways in:

- ``--table FILE --context-column C --label-column L``: the context is a column of an annotation table.
- ``--config X.yaml [config overrides]``: the context is each training sample's confounder-dictionary cluster. Any
  option that is not one of the bias report's own goes to the ``ccim fit`` parser with the config, so
  ``--data.init_args.root``, ``--data.init_args.bias 0.5``, ``--trainer.accelerator cpu``,
  ``--model.init_args.num_prototypes 64``... work as there.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from ccim_lightning.analysis.plots import write_figures
from ccim_lightning.analysis.report import BiasReport, write_tables
from ccim_lightning.analysis.sources import (
    ContextLabels,
    check_dictionary_file,
    cluster_contexts,
    read_annotation_table,
)
from ccim_lightning.analysis.statistics import compute_bias_report

__all__ = ["add_bias_report_arguments", "main", "run_bias_report", "write_bias_report"]

PROG = "ccim bias-report"
OVERRIDES_EPILOG = (
    "With --config, every other option is a config override as for `ccim fit` (e.g. --data.init_args.bias 0.5, "
    "--data.init_args.root /path/to/data, --trainer.accelerator cpu, --model.init_args.num_prototypes 64; "
    "see `ccim fit --help`)."
)


def add_bias_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``ccim bias-report`` options to ``parser`` (e.g. a subparser) and returns it."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config",
        action="append",
        help="ccim YAML config (repeatable, as for ccim fit): the context is each training sample's dictionary cluster",
    )
    source.add_argument("--table", help="annotation table (CSV/TSV): the context is one of its columns, no images")
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
    return parser


def write_bias_report(
    report: BiasReport, out_dir: str | os.PathLike, max_heatmap_contexts: int = 40
) -> dict[str, Path]:
    """Writes the report's tables, summary and plots into ``out_dir`` (created if needed).

    Files: ``contexts.csv``, ``context_emotion.csv``, ``emotions.csv``, ``summary.txt``, ``summary.json``
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
    return write_tables(report, out_dir) | write_figures(report, out_dir, max_heatmap_contexts)


def run_bias_report(args: argparse.Namespace, overrides: Sequence[str] = ()) -> BiasReport:
    """Runs ``ccim bias-report`` with parsed arguments: computes, writes, prints the summary; returns the report.

    Args:
        args: The bias report's own options (:func:`add_bias_report_arguments`).
        overrides: The other command-line arguments: config overrides for ``--config`` (an error with ``--table``).
    """
    data = _load_context_labels(args, list(overrides))
    report = compute_bias_report(
        data.contexts,
        data.labels,
        emotion_names=data.emotion_names,
        multi_label=data.multi_label,
        min_count=args.min_count,
        permutations=args.permutations,
        context_name=data.context_name,
        top=args.top,
    )
    paths = write_bias_report(report, args.out, args.max_heatmap_contexts)
    print(report.to_text())
    print(f"Written to {Path(args.out)}: {', '.join(sorted(p.name for p in paths.values()))}")
    return report


def _load_context_labels(args: argparse.Namespace, overrides: list[str]) -> ContextLabels:
    """The contexts and labels the arguments ask for, with clear errors for misplaced options."""
    if args.table is not None:
        missing = [
            f"--{name.replace('_', '-')}" for name in ("context_column", "label_column") if not getattr(args, name)
        ]
        if missing:
            raise SystemExit(f"{PROG} --table needs {' and '.join(missing)}.")
        if args.dictionary:
            raise SystemExit(f"{PROG}: --dictionary goes with --config, not with --table.")
        if overrides:
            raise SystemExit(
                f"{PROG}: unrecognized arguments {overrides}: with --table only the bias report's own options "
                "apply (config overrides such as --data.init_args.* go with --config; see --help)."
            )
        return read_annotation_table(args.table, args.context_column, args.label_column)
    if args.context_column or args.label_column:
        raise SystemExit(f"{PROG}: --context-column and --label-column go with --table, not with --config.")
    if args.dictionary:
        check_dictionary_file(args.dictionary)  # a wrong file fails before the config is even read
    cli = _build_cli([arg for config in args.config for arg in ("--config", config)] + overrides)
    return cluster_contexts(
        cli, args.dictionary, device=args.device, batch_size=args.batch_size, num_workers=args.num_workers
    )


def _build_cli(cli_args: list[str]):
    """The ``ccim`` LightningCLI of these arguments, built (model, datamodule, trainer) but not run."""
    from ccim_lightning.cli import build_cli  # cli.py imports this module for the subcommand: import on use

    with warnings.catch_warnings():
        # LightningCLI warns that args were given while sys.argv holds others: here sys.argv is the bias-report
        # command line, of which cli_args are the config part, on purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return build_cli(cli_args, run=False)


def main(argv: Sequence[str] | None = None) -> BiasReport:
    """``ccim bias-report`` as a program: bad inputs end with a one-line error instead of a traceback.

    Args:
        argv: The arguments after ``bias-report`` (default: ``sys.argv[1:]``).

    Returns:
        The report.
    """
    parser = add_bias_report_arguments(
        argparse.ArgumentParser(
            prog=PROG,
            description="How much a dataset's context predicts its emotions: tables, plots and a text summary.",
            epilog=OVERRIDES_EPILOG,
            allow_abbrev=False,  # --d... must not swallow a config override's prefix
        )
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        return run_bias_report(args, overrides)
    except (FileNotFoundError, KeyError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error.args[0] if error.args else error}\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
