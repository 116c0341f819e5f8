"""GroupWalk (Mittal et al., CVPR 2020, "EmotiCon"): people walking in 45 videos, 4 classes, multi-label.

The release format is not publicly documented, so GroupWalk is read from a person table of extracted frames
(``ccim_lightning.datamodules.table``): one row per (frame, person) with ``image``, ``x1``..``y2``, ``label``
(``|``-joined when annotators disagree) and ``split``. Targets are multi-hot over :data:`CLASSES` and the metric is
mAP over the four classes, as in the literature. The README shows how to build the table from extracted frames.
"""

from __future__ import annotations

from collections.abc import Callable

from ccim_lightning.datamodules.common import OnBadSample
from ccim_lightning.datamodules.table import TableDataModule

CLASSES: tuple[str, ...] = ("Angry", "Happy", "Neutral", "Sad")
"""The 4 GroupWalk classes in target order."""


class GroupWalkDataModule(TableDataModule):
    """GroupWalk from a person table: body crop + masked context, multi-hot over Angry, Happy, Neutral, Sad.

    Args:
        root: Folder the table's image paths are relative to (e.g. the folder of extracted frames).
        table: The CSV table; a relative path is taken relative to ``root``.
        val_fraction: Share of train held out for validation when the table has no ``val`` rows, in (0, 1).
        seed: Seed of that hold-out.
        context_size: Context size, an int or (height, width).
        subject_size: Body crop size, an int or (height, width).
        flip: Random horizontal flips of training samples.
        batch_size: Batch size of every loader.
        num_workers: Loader worker processes.
        on_bad_sample: ``"error"`` (default) or ``"skip"``: leave out, count and report bad rows and images.
        train_transform: Replaces the default training transform.
        eval_transform: Replaces the default evaluation transform.
    """

    dataset_name = "GroupWalk"

    def __init__(
        self,
        root: str,
        table: str = "annotations.csv",
        val_fraction: float = 0.1,
        seed: int = 0,
        context_size: int | tuple[int, int] = 224,
        subject_size: int | tuple[int, int] = 128,
        flip: bool = True,
        batch_size: int = 32,
        num_workers: int = 4,
        on_bad_sample: OnBadSample = "error",
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
    ) -> None:
        super().__init__(
            root,
            table,
            list(CLASSES),
            "multilabel",
            val_fraction,
            seed,
            context_size,
            subject_size,
            flip,
            batch_size,
            num_workers,
            on_bad_sample,
            train_transform,
            eval_transform,
        )
