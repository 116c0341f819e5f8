"""One table across the tasks: each row's gap closed on every task, from the committed results of each task.

``python -m benchmarks.debias.summary`` reads ``benchmarks/results/debias_runs.jsonl`` (the default 4-class task) and
``benchmarks/results/<task>/debias_runs.jsonl`` for the other tasks, recomputes each row's summary with the same
paired bootstrap as the per-task reports (``report.summarise``), and prints a markdown table: per row and task, the
gap closed in unbiased accuracy (mAP for the multilabel task) with its 95% interval and the biased-set figure; then
per task the best cluster-only row and the best CLEF row against the goal. It writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.debias.cli import DEFAULT_OUT
from benchmarks.debias.data import generator_settings
from benchmarks.debias.report import best_method, cluster_only, summarise
from benchmarks.debias.runs import load_records
from benchmarks.debias.settings import DEFAULT_SEEDS, all_settings
from benchmarks.debias.tasks import TASKS

#: Column order: the three real-shaped tasks, then the default task.
ORDER = ("caers_like", "continuous", "emotic_like", "default")


def folder_of(task: str, root: Path) -> Path:
    """Where a task's committed runs are."""
    return root if task == "default" else root / task


def task_summary(task: str, root: Path, resamples: int) -> dict[str, dict]:
    """The per-row summary of ``task`` over the default seeds (runs of its own generator only)."""
    records = [
        r
        for r in load_records(folder_of(task, root) / "debias_runs.jsonl")
        if r["seed"] in DEFAULT_SEEDS and r["config"]["data"].get("generator") == generator_settings(task)
    ]
    settings = [s for s in all_settings() if s.group in ("main", "method", "oracle")]
    return summarise(records, settings, resamples) if records else {}


def cell(row: dict | None) -> str:
    """``closed [low, high] (biased)`` in percent, or ``-``."""
    if row is None or "closed" not in row:
        return "-"
    closed, low, high = (100 * v for v in row["closed"])
    return f"{closed:+.0f} [{low:+.0f}, {high:+.0f}] ({100 * row['biased'][0]:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.debias.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_OUT, help="the results folder")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    tasks = [t for t in ORDER if t in TASKS]
    summaries = {task: task_summary(task, args.root, args.bootstrap) for task in tasks}
    settings = [s for s in all_settings() if s.group in ("main", "method", "oracle")]
    # The rows run on a real-shaped task (the default task's ablations and CCIM combinations stay in its report).
    names = [s.name for s in settings if any(s.name in summaries[t] for t in tasks if t != "default")]
    print("| row | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for name in names:
        if name in ("baseline", "oracle"):
            rows = [summaries[task].get(name) for task in tasks]
            values = ["-" if r is None else f"U {100 * r['unbiased'][0]:.1f} (B {100 * r['biased'][0]:.1f})"
                      for r in rows]  # fmt: skip
            print(f"| {name} | " + " | ".join(values) + " |")
            continue
        print(f"| {name} | " + " | ".join(cell(summaries[t].get(name)) for t in tasks) + " |")
    print()
    for task in tasks:
        summary = summaries[task]
        if "oracle" not in summary:
            continue
        best = best_method(summary, settings, cluster_only)
        clef = best_method(summary, settings, lambda s: s.debias == "CLEF" and s.attention == "none")
        seeds = len(summary["baseline"]["seeds"]) if "baseline" in summary else 0
        parts = [f"{task} ({seeds} seeds): best cluster-only `{best}` {cell(summary.get(best))}"]
        oracle = 100 * summary["oracle"]["biased"][0]
        parts.append(f"best CLEF `{clef}` {cell(summary.get(clef))}; oracle biased {oracle:.1f}")
        print("- " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
