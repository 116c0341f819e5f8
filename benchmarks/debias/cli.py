"""The command line of the study (``python -m benchmarks.debias``): plan the runs, deal them out, write the report."""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks import debias as study
from benchmarks.debias import report
from benchmarks.debias.checkpoint import read_run_config
from benchmarks.debias.data import RunConfig, generator_settings
from benchmarks.debias.runs import check_checkpoint, comparable, load_records, run_config_of, run_plan
from benchmarks.debias.settings import (
    CHECKPOINT_ROW,
    DEFAULT_BIAS,
    DEFAULT_SEEDS,
    Setting,
    all_settings,
    deal,
    quick_names,
)
from benchmarks.debias.tasks import TASKS, metric_of
from ccim_lightning import debias as methods
from ccim_lightning.datamodules.synthetic import SceneSettings

#: The committed results (``--report-only`` rebuilds them; ``--quick`` never writes there).
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results"
#: The first line of ``--help``: the study's question, from the package docstring.
DESCRIPTION = study.__doc__.split("\n\n")[0]
#: The rows of ``main`` run on the tasks other than ``default`` (the ablations are the default task's study).
TASK_ROWS = ("baseline", "ccim_dot")
#: How the study is started, in reproduce commands and in the report's first line.
COMMAND = "python -m benchmarks.debias"


def reproduce_command(args: argparse.Namespace, setting: str, seed: int) -> str:
    """The command line that reruns one setting with one seed under the same configuration."""
    parts = [*shlex.split(COMMAND), "--only", setting, "--seeds", str(seed)]
    defaults = parse_args([])
    if args.task != "default":
        parts += ["--task", args.task]
    for option in ("train_size", "test_size", "batch_size", "epochs"):
        if getattr(args, option) != getattr(defaults, option):
            parts += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if setting == CHECKPOINT_ROW:
        parts += ["--ccim-checkpoint", str(args.ccim_checkpoint)]
    return shlex.join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=COMMAND, description=DESCRIPTION)
    parser.add_argument("--task", choices=list(TASKS), default="default", help="the synthetic task (tasks.py): "
                        "default, caers_like, emotic_like (multilabel, mAP), continuous")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="one seed; baseline, ccim_dot, the best method, oracle")
    parser.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings (see --list)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0-4; --quick: 0)")
    parser.add_argument("--train-size", type=int, default=4000, help="training samples")
    parser.add_argument("--test-size", type=int, default=5000, help="samples in each test set")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 torch thread each)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results for full runs of the "
                        "default task, a per-user folder per task for the other tasks, a new scratch folder per "
                        "--quick run)")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="skip runs already in <out>/debias_runs.jsonl")
    parser.add_argument("--report-only", action="store_true", help="rebuild debias.md and plots from the JSON lines")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--list", action="store_true", help="print the settings and exit")
    parser.add_argument("--ccim-checkpoint", type=Path, metavar="CKPT", help=f"test this `ccim fit --config "
                        f"configs/synthetic.yaml` checkpoint as row {CHECKPOINT_ROW} (with --quick: instead of "
                        "training ccim_dot)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = all_settings()
    names = [s.name for s in settings]
    if args.list:
        for setting in settings:
            print(f"{setting.name:24s} [{setting.group}] {setting.description}")
        return 0
    given = args.ccim_checkpoint is not None
    if args.task == "default":
        default_rows = [s.name for s in settings if s.group not in ("tuning", "checkpoint")]
    else:  # the real-shaped tasks: baseline, CCIM, each method on the baseline head, the oracle
        default_rows = [s.name for s in settings if task_row(s, args.task)]
        if given:
            raise SystemExit("--ccim-checkpoint tests a `configs/synthetic.yaml` model: it is for --task default only")
    wanted = args.only or (quick_names(given) if args.quick else default_rows + [CHECKPOINT_ROW] * given)
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise SystemExit(f"Unknown setting(s) {unknown}; choose from: {', '.join(names)}")
    if CHECKPOINT_ROW in wanted and not given:
        raise SystemExit(f"The row {CHECKPOINT_ROW} tests a checkpoint: pass --ccim-checkpoint CKPT")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(DEFAULT_SEEDS))
    if args.out is None:
        if args.quick:
            args.out = quick_scratch_folder()
        elif args.task == "default":
            args.out = DEFAULT_OUT
        else:  # a full run of another task: one folder per user and task, so that --resume finds it again
            args.out = Path(tempfile.gettempdir()) / f"ccim-debias-{scratch_user()}-{args.task}"
    out: Path = args.out
    if args.quick and out.resolve() == DEFAULT_OUT.resolve():
        raise SystemExit(f"--quick never writes over the committed results in {DEFAULT_OUT}: pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = None if args.ccim_checkpoint is None else str(args.ccim_checkpoint)
    config = RunConfig(
        args.train_size, args.test_size, args.batch_size, args.epochs, checkpoint=checkpoint, task=args.task
    )
    runs_path = out / "debias_runs.jsonl"
    records = load_records(runs_path)
    if not args.report_only:
        by_name = {s.name: s for s in settings}
        # The bias-0.9 table first, then the sweep; inside each, seed-major and by bias (renders each split once).
        order = {name: i for i, name in enumerate(names)}
        plan = sorted(
            ((seed, name) for seed in seeds for name in wanted),
            key=lambda p: (
                by_name[p[1]].group == "sweep",
                p[0],
                by_name[p[1]].data_bias != DEFAULT_BIAS,
                by_name[p[1]].bias,
                order[p[1]],
            ),
        )
        if CHECKPOINT_ROW in wanted:
            # One model, one seed: the row is planned for the seed the checkpoint was trained with, and checked
            # before any training, so a mismatch fails in seconds.
            if not Path(config.checkpoint).is_file():
                raise SystemExit(f"--ccim-checkpoint {config.checkpoint}: no such file")
            fitted_seed = read_run_config(config.checkpoint).get("seed_everything")
            if fitted_seed not in seeds:
                raise SystemExit(
                    f"--ccim-checkpoint {config.checkpoint} was trained with seed_everything {fitted_seed!r}, which is "
                    f"not among --seeds {seeds}: add it"
                )
            plan = [(seed, name) for seed, name in plan if name != CHECKPOINT_ROW or seed == fitted_seed]
            check_checkpoint(by_name[CHECKPOINT_ROW], fitted_seed, config)
        if args.resume:
            done = {(r["setting"], r["seed"], comparable(r)) for r in records}
            probe = lambda seed, name: comparable({"config": run_config_of(by_name[name], seed, config)})  # noqa: E731
            skipped = [p for p in plan if (p[1], p[0], probe(*p)) in done]
            for seed, name in skipped:
                print(f"{name} seed={seed}: already done, skipped", flush=True)
            plan = [p for p in plan if p not in skipped]
        reproduce = {(seed, name): reproduce_command(args, name, seed) for seed, name in plan}
        print(f"debias: {len(plan)} runs ({len(wanted)} settings x seeds {seeds}) in {out}", flush=True)
        start = time.perf_counter()
        jobs = max(1, min(args.jobs, len(plan)))
        if jobs == 1:
            run_plan(plan, config, out, reproduce, len(plan))
        else:
            # Dealt by expected cost in plan order: the workers finish together, each meets a seed's runs in a row.
            shares = deal(plan, jobs, by_name)
            with ProcessPoolExecutor(jobs) as pool:
                for future in [pool.submit(run_plan, s, config, out, reproduce, len(plan)) for s in shares]:
                    future.result()
        print(f"debias: {len(plan)} runs in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        records = load_records(runs_path)
    reference = {"train_size": config.train_size, "test_size": config.test_size, "batch_size": config.batch_size}
    current = [
        r
        for r in records
        if r["seed"] in seeds
        and r["config"]["data"].get("generator") == generator_settings(args.task)
        and all(r["config"]["data"][k] == v for k, v in reference.items())
        and r["config"]["trainer"]["max_epochs"] == (by_setting_epochs(settings, r["setting"]) or config.epochs)
    ]
    command = f"{COMMAND} " + shlex.join(argv if argv is not None else sys.argv[1:])
    generator = generator_settings(args.task)
    text, summary = report.write_report(current, settings, out, command.strip(), generator, args.bootstrap)
    if not args.quick:
        print(text)
        return 0
    # --quick (the demo): one seed is too little for the full report's intervals and its goal check, so only the
    # side-by-side rows are printed; debias.md in the folder has the rest.
    print(f"Side by side (seed {seeds[0]}, {config.test_size}-sample test sets; full table and plots in {out}):")
    print(report.side_by_side(summary, quick_names(given), metric_of(args.task)))
    print(
        "One seed: other seeds move these numbers by a few points (the committed 5-seed table in "
        f"{DEFAULT_OUT / 'debias.md'} has the intervals)."
    )
    return 0


def task_row(setting: Setting, task: str) -> bool:
    """Whether ``setting`` is in the default rows of ``task`` (other than ``default``).

    Baseline, CCIM, each method on the baseline head (its ``_ccim`` combination runs with ``--only``) and the
    oracle; a method whose ``bind`` refuses the task's kind, and epoch selection and the last-layer refit on
    multilabel tasks, are left out.
    """
    if setting.name in TASK_ROWS or setting.group == "oracle":
        return True
    if setting.group != "method" or setting.attention != "none":
        return False
    settings = SceneSettings(**TASKS[task])
    if (setting.select or setting.last_layer) and settings.task != "multiclass":
        return False  # worst-group validation and the last-layer refit group samples by (class, cluster)
    if setting.debias is None:
        return True
    method = getattr(methods, setting.debias)(**setting.debias_args)
    try:  # the method's own refusal decides (a multiclass-only method, or multiclass-only groups)
        method.bind(num_classes=settings.num_classes, task=settings.task, num_clusters=setting.num_prototypes)
    except ValueError:
        return False
    return True


def scratch_user() -> str:
    """The user's name for scratch folders (the uid where the system has no name for it)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "user"


def quick_scratch_folder() -> Path:
    """A new folder for one ``--quick`` run, under the temporary folder and named after the user.

    New per run, so that two users, or two runs of one user, never share (or resume) each other's records.
    """
    return Path(tempfile.mkdtemp(prefix=f"ccim-debias-quick-{scratch_user()}-"))


def by_setting_epochs(settings: list[Setting], name: str) -> int | None:
    """The epoch override of a setting (None when it uses ``--epochs`` or is unknown)."""
    return next((s.epochs for s in settings if s.name == name), None)
