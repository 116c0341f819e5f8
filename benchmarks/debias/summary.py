"""One table across the tasks: each row's gap closed on every task, from the committed report of each task.

``python -m benchmarks.debias.summary`` reads the main table of ``benchmarks/results/debias.md`` (the default 4-class
task) and of ``benchmarks/results/<task>/debias.md`` for the other tasks (each written by ``report.py`` from its
runs; rebuild them with ``--report-only``), and prints a markdown table: per row and task, the gap closed in
unbiased accuracy (mAP for the multilabel task) with its 95% interval and the biased-set figure; then per task the
best cluster-only row and the best CLEF row. Reading the reports, rather than bootstrapping again, keeps the figures
identical to theirs (the multilabel bootstrap recomputes an mAP per resample and takes minutes). It writes nothing.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks.debias.cli import DEFAULT_OUT
from benchmarks.debias.report import best_method, cluster_only
from benchmarks.debias.settings import all_settings
from benchmarks.debias.tasks import TASKS

#: Column order: the three real-shaped tasks, then the default task.
ORDER = ("caers_like", "continuous", "emotic_like", "default")


def folder_of(task: str, root: Path) -> Path:
    """Where a task's committed runs are."""
    return root if task == "default" else root / task


def read_report(path: Path) -> dict[str, dict]:
    """The main table of a ``debias.md`` as ``{row: {"seeds", "biased", "unbiased", "closed"}}`` (fractions).

    ``biased`` and ``unbiased`` are ``(mean, low, high)``; ``closed`` too, or absent where the table has ``-``.
    """
    if not path.is_file():
        return {}
    rows, in_main = {}, False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            in_main = line.startswith("## Bias 0.9")
        if not in_main or not line.startswith("| ") or line.startswith("| setting"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, seeds, biased, unbiased, closed = cells[0], cells[2], cells[3], cells[4], cells[6]
        row = {"seeds": int(seeds), "biased": _triple(biased), "unbiased": _triple(unbiased)}
        if closed != "-":
            row["closed"] = _triple(closed)
        rows[name] = row
    return rows


def _triple(text: str) -> tuple[float, float, float]:
    """``"+40.8 [+31.3, +51.1]"`` -> ``(0.408, 0.313, 0.511)``."""
    mean, low, high = (float(v) / 100 for v in re.findall(r"[-+]?\d+(?:\.\d+)?", text)[:3])
    return mean, low, high


def cell(row: dict | None) -> str:
    """``closed [low, high] (biased)`` in percent, or ``-``."""
    if row is None or "closed" not in row:
        return "-"
    closed, low, high = (100 * v for v in row["closed"])
    return f"{closed:+.0f} [{low:+.0f}, {high:+.0f}] ({100 * row['biased'][0]:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.debias.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_OUT, help="the results folder")
    args = parser.parse_args(argv)
    tasks = [t for t in ORDER if t in TASKS]
    summaries = {task: read_report(folder_of(task, args.root) / "debias.md") for task in tasks}
    settings = [s for s in all_settings() if s.group in ("main", "method", "oracle")]
    by_name = {s.name: s for s in settings}
    for summary in summaries.values():  # the rows the settings no longer know are left out
        for name in [n for n in summary if n not in by_name]:
            del summary[name]
        for name, row in summary.items():
            row["setting"] = by_name[name]
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
        seeds = summary["baseline"]["seeds"] if "baseline" in summary else 0
        parts = [f"{task} ({seeds} seeds): best cluster-only `{best}` {cell(summary.get(best))}"]
        oracle = 100 * summary["oracle"]["biased"][0]
        parts.append(f"best CLEF `{clef}` {cell(summary.get(clef))}; oracle biased {oracle:.1f}")
        print("- " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
