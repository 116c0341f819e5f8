"""The tasks the study runs on (``--task``): the original synthetic task and three shaped like the real benchmarks.

Each task is a set of ``SyntheticContextDataModule`` / ``SceneSettings`` overrides; everything else of a run (host,
head, methods, epochs, seeds, bootstrap) is the same. ``default`` is the task of the committed ``debias.md``.

* ``caers_like``: CAER-S-shaped, 7 emotions, 16 scene types (two or three per dominant emotion); top-1 accuracy.
* ``emotic_like``: EMOTIC-shaped, ``task="multilabel"``, 26 long-tailed, co-occurring categories, 1-4 per person,
  16 scene types each tied to one category; macro mAP as the model logs it. Bias: with probability 0.9 the scene
  is one of the primary category's scenes, else uniform; the unbiased test set and the oracle's training data draw
  the scene independently of the labels (``datamodules/synthetic_labels.py``).
* ``continuous``: 4 emotions, scenes on a continuum of 8 blended scene types; the emotion follows the nearest type,
  which k-means clusters of the images only approximate; top-1 accuracy.
"""

from __future__ import annotations

from ccim_lightning.datamodules.synthetic import SceneSettings

TASKS: dict[str, dict] = {
    "default": {},
    "caers_like": {"num_classes": 7, "num_scenes": 16},
    "emotic_like": {"task": "multilabel", "num_classes": 26, "num_scenes": 16},
    "continuous": {"scene_layout": "continuous", "num_scenes": 8},
}
"""Task name -> generator overrides."""


def metric_of(task: str) -> str:
    """The study's metric on ``task``: ``"mAP"`` for the multilabel task, ``"acc"`` (top-1 accuracy) otherwise."""
    return "mAP" if SceneSettings(**TASKS[task]).task == "multilabel" else "acc"


def metric_text(metric: str) -> str:
    """How the report names ``metric``."""
    if metric == "mAP":
        return "Macro mAP (%, torchmetrics' MultilabelAveragePrecision over all categories, as the model logs it)"
    return "Top-1 accuracy (%)"
