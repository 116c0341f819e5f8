"""Why the cluster-only methods stop where they do: how well the dictionary's clusters find the minority samples.

``python -m benchmarks.debias.clusters --task caers_like`` builds the study's dictionary (same extractor, masking,
k-means) for each ``--prototypes`` N on the training split of each seed and prints, per N:

* ``purity`` and ``NMI`` of the clusters against the true scene types (the generator's, used here only to score);
* ``minority isolated``: the share of the training split's minority samples (a multiclass sample whose scene is
  not one of its emotion's scenes) that sit in a pseudo-group holding mostly minority samples, for the N fine
  groups ``(class, cluster)`` and for the coarse groups of ``PseudoGroups("coarse")``: the samples a group method
  can find and upweight; and for the two groups per class of ``PseudoGroups("aligned")`` (clusters where
  ``P(y | z) >= P(y)`` or not);
* ``in conflicting``: the share of minority samples among the samples of the aligned mode's bias-conflicting
  groups, against their share in the whole split: how much an upweighted conflicting group is minority;
* the minority counts themselves: samples per minority (class, scene) cell, against the oracle's bias-0 split.

Nothing is written except the dictionary caches under ``--out``; the figures go to standard output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.debias.data import DataCache, RunConfig
from benchmarks.debias.runs import dictionary_recipe, quiet_worker
from benchmarks.debias.settings import CONFOUNDER_DIM, Setting
from benchmarks.debias.tasks import TASKS
from ccim_lightning.datamodules.synthetic import SceneSettings, SyntheticContextDataset
from ccim_lightning.debias.groups import PseudoGroups


def minority_flags(dataset: SyntheticContextDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(targets, scenes, minority)`` of a multiclass split: minority = the scene is not one of the emotion's."""
    targets, scenes = dataset.labels()
    dominant = np.array([dataset.dominant_emotion(int(s)) for s in range(dataset.settings.num_scenes)])
    return targets, scenes, dominant[scenes] != targets


def isolated_share(groups: np.ndarray, minority: np.ndarray) -> float:
    """Share of the minority samples whose group holds more minority than majority samples."""
    mostly = {g for g in np.unique(groups) if minority[groups == g].mean() > 0.5}
    return float(np.isin(groups[minority], list(mostly)).mean()) if minority.any() else float("nan")


def cell_counts(targets: np.ndarray, scenes: np.ndarray, minority: np.ndarray, num_scenes: int) -> np.ndarray:
    """Samples in each minority (class, scene) cell that has at least one sample."""
    cells = targets[minority] * num_scenes + scenes[minority]
    return np.bincount(cells)[np.unique(cells)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.debias.clusters", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="caers_like")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--prototypes", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ccim-debias-clusters"), help="dictionary caches")
    args = parser.parse_args(argv)
    quiet_worker()
    config = RunConfig(train_size=args.train_size, test_size=1, task=args.task)
    multiclass = SceneSettings(**TASKS[args.task]).task == "multiclass"
    print(f"task {args.task} ({TASKS[args.task] or 'the default 4-class task'}), training split of {args.train_size}")
    if multiclass:
        for seed in args.seeds:
            for bias in (0.9, 0.0):
                source = SyntheticContextDataset("train", args.train_size, SceneSettings(**TASKS[args.task], seed=seed,
                                                                                         bias=bias))  # fmt: skip
                targets, scenes, minority = minority_flags(source)
                counts = cell_counts(targets, scenes, minority, source.settings.num_scenes)
                print(
                    f"seed {seed} bias {bias:g}: {int(minority.sum())} minority samples in {len(counts)} "
                    f"(class, scene) cells; per cell median {np.median(counts):.0f}, min {counts.min()}, "
                    f"max {counts.max()}"
                )
    print("| seed | N | purity | NMI | minority isolated: fine groups | coarse groups | coarse | aligned "
          "| minority share: split | in conflicting |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    cache = DataCache()
    for seed in args.seeds:
        for n in args.prototypes:
            setting = Setting(f"clusters_N{n}", "", num_prototypes=n)
            datamodule = cache.datamodule(config, seed, setting)
            dictionary = dictionary_recipe(args.out, config, setting, seed).load_or_build(datamodule, n, CONFOUNDER_DIM)
            purity, nmi = dictionary.extra.get("scene_purity", float("nan")), dictionary.extra.get("scene_nmi")
            row = f"| {seed} | {n} | {purity:.3f} | {nmi:.3f} |"
            if not multiclass:
                print(row + " - | - | - | - | - | - |")
                continue
            source = SyntheticContextDataset("train", args.train_size, SceneSettings(**TASKS[args.task], seed=seed,
                                                                                     bias=0.9))  # fmt: skip
            targets, _, minority = minority_flags(source)
            clusters = dictionary.assignments.numpy()
            known = clusters >= 0
            fine = isolated_share(targets[known] * n + clusters[known], minority[known])
            groups = PseudoGroups("coarse", seed=seed)
            groups.bind(num_clusters=n, num_classes=int(targets.max()) + 1)
            groups.fit(dictionary.prototypes, dictionary.assignments[known], torch.from_numpy(targets[known]))
            coarse = groups(dictionary.assignments[known], torch.from_numpy(targets[known])).numpy()
            aligned = PseudoGroups("aligned")
            aligned.bind(num_clusters=n, num_classes=int(targets.max()) + 1)
            aligned.fit(None, dictionary.assignments[known], torch.from_numpy(targets[known]))
            split = aligned(dictionary.assignments[known], torch.from_numpy(targets[known])).numpy()
            shares = [isolated_share(g, minority[known]) for g in (coarse, split)]
            conflicting = split % 2 == 1
            precision = minority[known][conflicting].mean() if conflicting.any() else float("nan")
            print(row + f" {fine:.3f} | {groups.num_groups} | {shares[0]:.3f} | {shares[1]:.3f} | "
                  f"{minority[known].mean():.3f} | {precision:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
