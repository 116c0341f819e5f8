"""GroupWalk (Mittal et al., CVPR 2020, "EmotiCon"): people walking in 45 videos, 4 classes, multi-label.

The release format is not publicly documented, so GroupWalk is read from a person table of extracted frames
(``ccim_lightning.datamodules.table``): one row per (frame, person) with ``image``, ``x1``..``y2``, ``label``
(``|``-joined when annotators disagree) and ``split``. Targets are multi-hot over :data:`CLASSES` and the metric is
mAP over the four classes, as in the literature. docs/how-to/datasets.md shows how to build the table from extracted
frames.
"""

from __future__ import annotations

from typing import Any

from ccim_lightning.datamodules.table import TableDataModule

CLASSES: tuple[str, ...] = ("Angry", "Happy", "Neutral", "Sad")
"""The 4 GroupWalk classes in target order."""


class GroupWalkDataModule(TableDataModule):
    """GroupWalk from a person table: body crop + masked context, multi-hot over Angry, Happy, Neutral, Sad.

    Give the table a ``video`` column: an automatic validation hold-out then keeps whole videos on one side
    (without it, whole frames; frames of one video are near-duplicates, so that validation is optimistic).

    Args:
        root: Folder the table's image paths are relative to (e.g. the folder of extracted frames).
        table: The CSV table; a relative path is taken relative to ``root``.
        val_fraction: Share of train held out for validation when the table has no ``val`` rows, in (0, 1).
        seed: Seed of that hold-out.
        group_column: Column whose values the hold-out keeps on one side (default ``video``).
        **kwargs: The shared arguments, documented once in :class:`~ccim_lightning.datamodules.base.PersonDataModule`.
    """

    dataset_name = "GroupWalk"

    def __init__(
        self,
        root: str,
        table: str = "annotations.csv",
        val_fraction: float = 0.1,
        seed: int = 0,
        group_column: str | None = "video",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root,
            table,
            class_names=list(CLASSES),
            task="multilabel",
            val_fraction=val_fraction,
            seed=seed,
            group_column=group_column,
            **kwargs,
        )
