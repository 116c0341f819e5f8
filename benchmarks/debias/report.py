"""The report of the debiasing study: paired-bootstrap intervals, the markdown table and the two plots.

Everything here reads only the runs' JSON records, so ``python -m benchmarks.debias --report-only`` rebuilds the
committed ``debias.md`` and plots from ``debias_runs.jsonl`` without training.

Intervals: 95% percentile intervals of a two-level paired bootstrap. Each resample draws the seeds with
replacement and, inside each drawn seed, that seed's test samples with replacement (the biased and the unbiased test
set separately); the same draw is applied to every row, so a difference between two rows is resampled as a pair
(same seeds, same test samples). A statistic is the mean over the drawn seeds of the accuracy on the drawn samples
(for multilabel runs, ``--task emotic_like``, the macro mAP recomputed on the drawn samples: ``multilabel.py``).
"""

from __future__ import annotations

import base64
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.debias import multilabel
from benchmarks.debias.tasks import metric_text
from ccim_lightning import debias as methods

SETS = ("biased", "unbiased")
GOAL_CLOSED, GOAL_LOWER, GOAL_BIASED_DROP = 0.80, 0.65, 0.03


def metric(record: dict) -> str:
    """The record's metric: ``"acc"`` (top-1 accuracy, per-sample correctness) or ``"mAP"`` (multilabel scores)."""
    return record.get("metric", "acc")


def test_size(record: dict) -> int:
    """Samples in each of the record's test sets."""
    return record["scores" if metric(record) == "mAP" else "correct"]["size"]


def unpack(text: str, size: int) -> np.ndarray:
    """A run's per-sample correctness from its record (base64 of the packed bits)."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:size].astype(bool)


@dataclass
class Bootstrap:
    """Bootstrap replicates of every (row, seed, test set) accuracy, with a shared draw of test samples per seed.

    Args:
        records: One run record per (row, seed) (``correct`` holds its per-sample correctness).
        resamples: Number of bootstrap resamples.
        seed: Seed of the resampling (the report is deterministic).
    """

    records: dict[tuple[str, int], dict]
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.replicates: dict[tuple[str, int, str], np.ndarray] = {}
        for run_seed in sorted({seed for _, seed in self.records}):
            names = sorted(name for name, seed in self.records if seed == run_seed)
            for test_set in SETS:
                sizes = {test_size(self.records[(n, run_seed)]) for n in names}
                if len(sizes) != 1:
                    raise ValueError(f"Runs of seed {run_seed} have test sets of different sizes {sorted(sizes)}")
                size = sizes.pop()
                # Multinomial counts = how often each test sample is drawn in each resample.
                counts = rng.multinomial(size, np.full(size, 1.0 / size), size=self.resamples).astype(np.float32)
                for name in names:
                    record = self.records[(name, run_seed)]
                    if metric(record) == "mAP":
                        scores, labels = multilabel.unpack_scores(record["scores"][test_set])
                        replicates = multilabel.weighted_map(scores, labels, counts)
                    else:
                        replicates = counts @ unpack(record["correct"][test_set], size).astype(np.float32) / size
                    self.replicates[(name, run_seed, test_set)] = replicates

    def seeds_of(self, *names: str) -> list[int]:
        """The seeds every one of ``names`` was run with."""
        sets = [{seed for name, seed in self.records if name == n} for n in names]
        return sorted(set.intersection(*sets)) if sets else []

    def seed_draw(self, seeds: list[int]) -> np.ndarray:
        """(resamples, len(seeds)) positions into ``seeds``; the same for the same seed list (pairs rows)."""
        rng = np.random.default_rng([self.seed, *seeds])
        return rng.integers(0, len(seeds), size=(self.resamples, len(seeds)))

    def mean(self, name: str, test_set: str, seeds: list[int]) -> tuple[float, np.ndarray]:
        """Seed-mean accuracy of a row: the observed value and its bootstrap replicates."""
        records = [self.records[(name, s)] for s in seeds]
        observed = statistics.fmean(record[f"{test_set}_{metric(record)}"] for record in records)
        per_seed = np.stack([self.replicates[(name, s, test_set)] for s in seeds], 1)  # (resamples, seeds)
        draw = self.seed_draw(seeds)
        return observed, np.take_along_axis(per_seed, draw, axis=1).mean(axis=1)


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap replicates."""
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def summarise(records: list[dict], settings: list, resamples: int = 2000) -> dict[str, dict]:
    """Per row: seeds, accuracies, Δ unbiased vs its baseline and gap closed, each with its 95% interval.

    The baseline of a row is ``baseline`` (bias 0.9) or ``baseline_bias<b>`` (sweep); the oracle is ``oracle``
    (trained at bias 0; its unbiased test set is the same at every bias, so it serves the sweep too).
    """
    latest = {}
    for record in records:
        latest[(record["setting"], record["seed"])] = record  # the latest run of a (row, seed) wins
    boot = Bootstrap(latest, resamples)
    default_bias = next(s.bias for s in settings if s.name == "baseline")
    summary = {}
    for setting in settings:
        seeds = boot.seeds_of(setting.name)
        if not seeds:
            continue
        row = {"setting": setting, "seeds": seeds}
        for test_set in SETS:
            value, reps = boot.mean(setting.name, test_set, seeds)
            row[test_set] = (value, *interval(reps))
        row["seconds"] = statistics.fmean(latest[(setting.name, s)]["seconds"] for s in seeds)
        base = "baseline" if setting.bias == default_bias else f"baseline_bias{setting.bias:g}"
        paired = boot.seeds_of(setting.name, base)
        if setting.name not in (base, "oracle") and paired:
            u, u_reps = boot.mean(setting.name, "unbiased", paired)
            b, b_reps = boot.mean(base, "unbiased", paired)
            row["delta"] = (u - b, *interval(u_reps - b_reps))
            row["delta_seeds"] = paired
        closed = boot.seeds_of(setting.name, base, "oracle")
        if setting.name not in (base, "oracle") and closed:
            u, u_reps = boot.mean(setting.name, "unbiased", closed)
            b, b_reps = boot.mean(base, "unbiased", closed)
            o, o_reps = boot.mean("oracle", "unbiased", closed)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = (u_reps - b_reps) / (o_reps - b_reps)
            finite = ratio[np.isfinite(ratio)]
            # Undefined when the oracle is no better than the baseline (tiny test configurations).
            value = (u - b) / (o - b) if o != b else float("nan")
            row["closed"] = (value, *(interval(finite) if len(finite) else (float("nan"), float("nan"))))
            row["closed_seeds"] = closed
        summary[setting.name] = row
    return summary


def _pct(value: tuple | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed else ""
    return f"{100 * value[0]:{sign}.1f} [{100 * value[1]:{sign}.1f}, {100 * value[2]:{sign}.1f}]"


def markdown_table(summary: dict[str, dict], names: list[str], label: str = "acc") -> str:
    """The rows ``names`` (those with runs) as markdown; accuracies (or mAP, ``label``) and intervals in %."""
    lines = [
        f"| setting | what | seeds | biased {label} | unbiased {label} | Δ unbiased vs baseline | gap closed (%) | "
        "s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        row = summary.get(name)
        if row is None:
            continue
        lines.append(
            f"| {name} | {row['setting'].description} | {len(row['seeds'])} | {_pct(row['biased'])} | "
            f"{_pct(row['unbiased'])} | {_pct(row.get('delta'), True)} | {_pct(row.get('closed'), True)} | "
            f"{row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def side_by_side(summary: dict[str, dict], names: list[str], label: str = "acc") -> str:
    """A short plain-text table of biased and unbiased accuracy (or ``label``) and gap closed for ``names``."""
    lines = [f"{'setting':<12} {'biased ' + label:>10} {'unbiased ' + label:>12} {'gap closed':>10}"]
    for name in names:
        row = summary.get(name)
        if row is None:
            continue
        closed = f"{100 * row['closed'][0]:.0f}%" if "closed" in row and np.isfinite(row["closed"][0]) else "-"
        lines.append(f"{name:<12} {100 * row['biased'][0]:>9.1f}% {100 * row['unbiased'][0]:>11.1f}% {closed:>10}")
    return "\n".join(lines)


def cluster_only(setting) -> bool:
    """Whether a method row uses nothing but the dictionary's clusters (CLEF trains its own context branch)."""
    if setting.group != "method":
        return False
    return bool(setting.last_layer) or (setting.debias is not None and getattr(methods, setting.debias).needs_clusters)


def best_method(summary: dict[str, dict], settings: list, keep=lambda setting: True) -> str | None:
    """The method row (group ``"method"``, passing ``keep``) with the highest gap closed at the default bias."""
    rows = [s.name for s in settings if s.group == "method" and keep(s) and "closed" in summary.get(s.name, {})]
    rows = [name for name in rows if np.isfinite(summary[name]["closed"][0])]
    return max(rows, key=lambda name: summary[name]["closed"][0]) if rows else None


def goal_lines(summary: dict[str, dict], settings: list, label: str = "acc") -> list[str]:
    """The goal, checked for the best cluster-only method row and for the best CLEF row on the baseline head."""
    oracle = summary.get("oracle")
    best = best_method(summary, settings, cluster_only)
    if best is None or oracle is None:
        return ["Goal check: needs the baseline, the oracle and at least one method row."]
    clef = best_method(summary, settings, lambda s: s.debias == "CLEF" and s.attention == "none")
    lines = []
    for which, name in (("the best cluster-only method", best), ("CLEF", clef)):
        if name not in summary or "closed" not in summary[name]:
            continue
        row = summary[name]
        closed, low = row["closed"][0], row["closed"][1]
        drop = oracle["biased"][0] - row["biased"][0]
        met = closed >= GOAL_CLOSED and low > GOAL_LOWER and drop <= GOAL_BIASED_DROP
        lines.append(
            f"Goal check (bias {row['setting'].bias:g}), {which}, `{name}`: gap closed {100 * closed:.1f}% (95% "
            f"interval lower bound {100 * low:.1f}%; goal >= {100 * GOAL_CLOSED:.0f}% with lower bound > "
            f"{100 * GOAL_LOWER:.0f}%), biased {label} {100 * row['biased'][0]:.1f} vs the oracle's "
            f"{100 * oracle['biased'][0]:.1f} ({100 * abs(drop):.1f} points {'below' if drop > 0 else 'above'} it; "
            f"goal: at most {100 * GOAL_BIASED_DROP:.0f} below): **{'met' if met else 'not met'}**."
        )
        lines.append("")
    return lines[:-1]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bias_sweep(summary: dict[str, dict], settings: list, best: str, path: Path) -> bool:
    """Unbiased (solid) and biased (dashed) accuracy against the bias for baseline, CCIM and ``best``."""
    plt = _pyplot()
    default_bias = next(s.bias for s in settings if s.name == "baseline")
    curves = {"baseline": "baseline", "CCIM dot": "ccim_dot", best: best}
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for (label, stem), colour in zip(curves.items(), ("#c44e52", "#4c72b0", "#55a868")):
        points = []
        for name, row in summary.items():
            if name == stem or name == f"{stem}_bias{row['setting'].bias:g}" and row["setting"].bias != default_bias:
                points.append((row["setting"].bias, row["unbiased"], row["biased"]))
        points.sort()
        if len(points) < 2:
            continue
        drawn = True
        biases = [p[0] for p in points]
        for index, style, kind in ((1, "-o", "unbiased"), (2, "--s", "biased")):
            means = np.array([100 * p[index][0] for p in points])
            errors = np.array(
                [[100 * (p[index][0] - p[index][1]), 100 * (p[index][2] - p[index][0])] for p in points]
            ).T
            axis.errorbar(biases, means, yerr=errors, fmt=style, color=colour, capsize=3, markersize=4,
                          label=f"{label}, {kind} test", alpha=1.0 if kind == "unbiased" else 0.5)  # fmt: skip
    if "oracle" in summary:
        axis.axhline(100 * summary["oracle"]["unbiased"][0], color="black", lw=0.8, ls=":", label="oracle, unbiased")
    if not drawn:
        plt.close(figure)
        return False
    axis.set_xlabel("bias: share of training samples whose emotion is their scene's dominant one")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title("Accuracy vs bias strength (mean over seeds, 95% paired-bootstrap intervals)", fontsize=9)
    axis.xaxis.label.set_fontsize(8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_gap_closed(summary: dict[str, dict], names: list[str], path: Path, highlight: set[str] = frozenset()) -> bool:
    """Gap closed per row with its 95% interval, as horizontal bars (``highlight``: the debiasing methods' rows)."""
    rows = [(name, summary[name]["closed"]) for name in names if "closed" in summary.get(name, {})]
    if not rows:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 0.32 * len(rows) + 1.2))
    values = np.array([100 * c[0] for _, c in rows])
    errors = np.array([[100 * (c[0] - c[1]), 100 * (c[2] - c[0])] for _, c in rows]).T
    positions = np.arange(len(rows))[::-1]
    colours = ["#4c72b0" if name in highlight else "#9a9a9a" for name, _ in rows]
    axis.barh(positions, values, xerr=errors, color=colours, alpha=0.85, capsize=3)
    axis.set_yticks(positions, [name for name, _ in rows], fontsize=8)
    for x, style in ((0, "-"), (100 * GOAL_LOWER, ":"), (100 * GOAL_CLOSED, "--"), (100, "-")):
        axis.axvline(x, color="black", lw=0.7, ls=style)
    axis.set_xlabel("gap closed (%) = (U - U_baseline) / (U_oracle - U_baseline); lines at 0, 65, 80, 100", fontsize=8)
    axis.set_title("Gap closed at bias 0.9: CCIM and ablations (grey), debiasing methods (blue);\n"
                   "mean over seeds, 95% paired-bootstrap intervals", fontsize=9)  # fmt: skip
    axis.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(
    records: list[dict], settings: list, out: Path, command: str, generator: str, resamples: int = 2000
) -> tuple[str, dict[str, dict]]:
    """Writes ``debias.md`` and the plots (when there is something to plot) into ``out``.

    Returns:
        The markdown and the per-row summary (:func:`summarise`).
    """
    summary = summarise(records, settings, resamples)
    seeds = sorted({seed for row in summary.values() for seed in row["seeds"]})
    sizes = sorted({test_size(r) for r in records})
    metrics = sorted({metric(r) for r in records}) or ["acc"]
    if len(metrics) > 1:
        raise ValueError(f"the records mix metrics {metrics}: keep each task's runs in their own --out folder")
    what = metric_text(metrics[0])
    by_group = lambda *groups: [s.name for s in settings if s.group in groups]  # noqa: E731
    best = best_method(summary, settings)
    parts = [
        "# Context-bias benchmark (synthetic data)",
        "",
        f"Written by `{command}` from `debias_runs.jsonl` (one line per run: configuration, seed, accuracies, "
        f"per-sample correctness or scores, the command that reproduces it). {what} of the final-epoch weights "
        "(rows `*_select`: the epoch selected on validation) on the biased test set (the training distribution) "
        "and the unbiased one (scene and emotion independent), "
        f"{'/'.join(map(str, sizes))} samples each, mean over the seeds {seeds} (the `seeds` column says how many "
        "each row has). Δ unbiased = the row's unbiased accuracy minus its baseline's; gap closed = (U - U_baseline) "
        "/ (U_oracle - U_baseline), where the oracle is the baseline trained on bias-0 data and tested on the same "
        "test sets. [brackets]: 95% intervals of a paired bootstrap over seeds and test samples "
        f"({resamples} resamples; seeds drawn with replacement, then each drawn seed's test samples with "
        "replacement, the same draw for every row). s / run: mean wall time of one run on 1 CPU thread (data, "
        "dictionary build or cache read, training, tests), as measured: the committed runs shared 2 cores with "
        f"other jobs, so these are upper bounds for an idle machine. Data generator: `{generator}`.",
        "",
        "## Bias 0.9: baseline, CCIM, the paper's ablations, the debiasing methods, the oracle",
        "",
        markdown_table(summary, by_group("main", "checkpoint", "method", "oracle"), metrics[0]),
        "",
        *goal_lines(summary, settings, metrics[0]),
    ]
    if plot_gap_closed(
        summary,
        [n for n in by_group("main", "checkpoint", "method") if n != "baseline"],
        out / "debias_gap_closed.png",
        set(by_group("method")),
    ):
        parts += ["", "![gap closed per setting](debias_gap_closed.png)"]
    sweep = by_group("sweep")
    if any(name in summary for name in sweep):
        parts += ["", "## Bias sweep", "", markdown_table(summary, sweep)]
        if best and plot_bias_sweep(summary, settings, sweep_stem(settings), out / "debias_bias_sweep.png"):
            parts += ["", "![accuracy vs bias](debias_bias_sweep.png)"]
    tuning = by_group("tuning")
    if any(name in summary for name in tuning):
        parts += ["", "## Tuning runs (variants tried; baseline head, bias 0.9)", "", markdown_table(summary, tuning)]
    if "baseline" in summary:
        gap = summary["baseline"]["biased"][0] - summary["baseline"]["unbiased"][0]
        verdict = "confounded as required (>= 10 points)" if gap >= 0.10 else "NOT confounded enough (< 10 points)"
        parts += ["", f"Check: the baseline's biased-unbiased gap at bias 0.9 is {100 * gap:.1f} points: {verdict}."]
    text = "\n".join(parts) + "\n"
    (out / "debias.md").write_text(text)
    return text, summary


def sweep_stem(settings: list) -> str:
    """The method row carried into the sweep (the stem of its ``<stem>_bias<b>`` rows)."""
    stems = {s.name.rsplit("_bias", 1)[0] for s in settings if s.group == "sweep"}
    return next(iter(sorted(stems - {"baseline", "ccim_dot"})), "baseline")
