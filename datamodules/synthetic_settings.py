"""The settings of the synthetic generator (``SceneSettings``) and the names it uses; ``synthetic`` re-exports them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ccim_lightning.arguments import check_float, check_int
from ccim_lightning.datamodules.emotic import CATEGORIES

EMOTIONS: tuple[str, ...] = ("angry", "happy", "neutral", "sad", "surprise", "fear", "disgust")
"""Emotion names; ``num_classes=k`` uses the first ``k`` (multiclass)."""

CATEGORY_NAMES: tuple[str, ...] = tuple(name.lower() for name in CATEGORIES)
"""Category names of ``task="multilabel"`` (EMOTIC's 26, lower case); ``num_classes=k`` uses the first ``k``."""

TASKS: tuple[str, ...] = ("multiclass", "multilabel")
SCENE_LAYOUTS: tuple[str, ...] = ("discrete", "continuous")

GENERATOR_VERSION = 2
"""Bumped whenever the same settings start producing different images (part of ``sample_identities``)."""


@dataclass(frozen=True)
class SceneSettings:
    """The generator settings every split of one synthetic dataset shares (checked on creation).

    Attributes:
        seed: Dataset seed (>= 0); the data is a pure function of (seed, split, index) and the settings.
        bias: Probability in [0, 1] that a sample's emotion is its scene's dominant emotion (scene ``s`` -> emotion
            ``s % num_classes``); otherwise it is uniform. 0 = independent.
        num_classes: Number of emotions, 2 to 7 (``EMOTIONS[:num_classes]``).
        num_scenes: Number of scene types.
        image_size: Side of the context image in pixels.
        subject_size: Side of the subject crop in pixels.
        expression_noise: Standard deviation of the per-person jitter of the face parameters, in units of the
            difference between the happy and the neutral face (0 = clean prototypes); higher makes the face harder
            to read and the scene more tempting.
        pixel_noise: Standard deviation of the additive Gaussian pixel noise on the [0, 1] colour scale.
        max_distractors: Maximum number of other people (random expressions) per image.
        task: ``"multiclass"`` (one emotion per person) or ``"multilabel"`` (EMOTIC-shaped: 1-4 of ``num_classes``
            categories per person, long-tailed and co-occurring, shown by a code on the person's body; ``bias``
            then acts on the scene given the labels: see ``synthetic_labels``).
        scene_layout: ``"discrete"`` (one of ``num_scenes`` scene types) or ``"continuous"`` (a position on a
            continuum of blended scene types; see ``synthetic_labels``).
    """

    seed: int = 0
    bias: float = 0.9
    num_classes: int = 4
    num_scenes: int = 4
    image_size: int = 64
    subject_size: int = 32
    expression_noise: float = 0.4
    pixel_noise: float = 0.06
    max_distractors: int = 2
    task: str = "multiclass"
    scene_layout: str = "discrete"

    def __post_init__(self) -> None:
        where = type(self).__name__
        check_int(where, "seed", self.seed, 0)
        # float: one spelling in sample identities (1 and 1.0)
        object.__setattr__(self, "bias", check_float(where, "bias (a probability)", self.bias, 0.0, 1.0))
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.scene_layout not in SCENE_LAYOUTS:
            raise ValueError(f"scene_layout must be one of {SCENE_LAYOUTS}, got {self.scene_layout!r}")
        if self.task == "multilabel" and self.scene_layout == "continuous":
            raise ValueError("scene_layout='continuous' is defined for task='multiclass' only; use discrete scenes")
        names = self.class_names_of_task()
        if check_int(where, "num_classes", self.num_classes) not in range(2, len(names) + 1):
            raise ValueError(
                f"num_classes must be between 2 and {len(names)} for task={self.task!r}, got {self.num_classes}"
            )
        check_int(where, "num_scenes", self.num_scenes, 1)
        check_int(where, "image_size (pixels)", self.image_size, 16)
        check_int(where, "subject_size (pixels)", self.subject_size, 4)
        check_float(where, "expression_noise", self.expression_noise, 0.0)
        check_float(where, "pixel_noise", self.pixel_noise, 0.0)
        check_int(where, "max_distractors", self.max_distractors, 0)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SceneSettings:
        """The settings named in ``values`` (e.g. a datamodule's ``hparams``); other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def identity(self) -> str:
        """The generator version and every setting, as sample identities name them."""
        return (
            f"synthetic-v{GENERATOR_VERSION}(seed={self.seed},bias={self.bias},classes={self.num_classes},"
            f"scenes={self.num_scenes},size={self.image_size}/{self.subject_size},"
            f"noise={self.expression_noise}/{self.pixel_noise},distractors={self.max_distractors}"
            # Only settings that differ from the original task are named, so its identities never change.
            + (f",task={self.task}" if self.task != "multiclass" else "")
            + (f",layout={self.scene_layout}" if self.scene_layout != "discrete" else "")
            + ")"
        )

    def class_names_of_task(self) -> tuple[str, ...]:
        """All the class names of this task (``EMOTIONS`` or ``CATEGORY_NAMES``); the first ``num_classes`` are used."""
        return CATEGORY_NAMES if self.task == "multilabel" else EMOTIONS
