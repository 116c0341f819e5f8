"""What a trained model's inputs looked like: the evaluation-time pixel settings a checkpoint must carry.

A model only gives its trained probabilities on a new photo when the photo goes through the same evaluation
path as its test split did: the same subject and context sizes, normalisation, subject masking (and its fill
value) and JPEG decoding rule. :class:`InputSettings` holds those settings; datamodules that follow the
:class:`DescribesInputs` contract describe themselves with one, and ``CCIMLightningModule.on_save_checkpoint``
stores it under :data:`INPUT_SETTINGS_KEY` in every checkpoint, as plain values (a weights-only load reads it).
``ccim_lightning.inference.Predictor`` rebuilds the evaluation transform from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, runtime_checkable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ccim_lightning.datamodules.dataset import DECODER, MASK_FILL
from ccim_lightning.datamodules.transforms import ContextTransform

INPUT_SETTINGS_KEY = "ccim_input_settings"
"""Checkpoint key of the stored :class:`InputSettings` (a dict of plain values)."""
INPUT_SETTINGS_VERSION = 1
"""Bumped when the stored fields change meaning."""


class UnsupportedInputsError(ValueError):
    """A datamodule's evaluation inputs cannot be rebuilt from settings (e.g. a replaced evaluation transform)."""


@dataclass(frozen=True)
class InputSettings:
    """The evaluation-time input settings of a datamodule (what its test split's samples went through).

    Attributes:
        datamodule: Class name of the datamodule that trained the model (for messages).
        context_size: Context (height, width).
        subject_size: Subject crop (height, width).
        mean: Per-channel normalisation mean on the [0, 1] scale.
        std: Per-channel normalisation standard deviation on the [0, 1] scale.
        reducing_gap: The transform's PIL ``reducing_gap`` (None: exact resizing).
        mask_subject: Whether the subject box of the context is filled (the test split's setting).
        mask_fill: The fill value, after normalisation.
        reduced_decode: JPEG files decoded reduced and contexts box-reduced (``ccim_lightning.datamodules.decode``).
        decoder: Names how files become pixels (``dataset.DECODER``).
        decode_rule: Names the reduction rule (``decode.DECODE_RULE``), or ``"full"``.
        pixel_source: How the datamodule's own pixels are made (a file decoder, or a renderer); a model trained
            on rendered pixels sees photos through :class:`ContextTransform` with the same sizes and normalisation.
    """

    datamodule: str
    context_size: tuple[int, int]
    subject_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reducing_gap: float | None
    mask_subject: bool
    mask_fill: float
    reduced_decode: bool
    decoder: str
    decode_rule: str
    pixel_source: str

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples), with the format version, for a checkpoint."""
        values = asdict(self)
        for name in ("context_size", "subject_size", "mean", "std"):
            values[name] = list(values[name])
        return {"version": INPUT_SETTINGS_VERSION, **values}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> InputSettings:
        """Reads stored settings back, naming every missing field.

        Args:
            values: What :meth:`to_dict` wrote.
            where: Where the values come from (a checkpoint path), for messages.

        Raises:
            UnsupportedInputsError: The stored entry says why the datamodule's inputs could not be described.
            ValueError: Fields are missing, or the entry has another format version.
        """
        if "unsupported" in values:
            raise UnsupportedInputsError(f"{where}: {values['unsupported']}")
        if values.get("version") != INPUT_SETTINGS_VERSION:
            raise ValueError(
                f"{where}: input settings of format version {values.get('version')!r}, this version of "
                f"ccim-lightning reads version {INPUT_SETTINGS_VERSION}"
            )
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise ValueError(f"{where}: the stored input settings lack {', '.join(missing)}")
        kwargs = {f.name: values[f.name] for f in fields(cls)}
        for name in ("context_size", "subject_size", "mean", "std"):
            kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def eval_transform(self) -> ContextTransform:
        """The evaluation transform these settings describe (no flip)."""
        return ContextTransform(
            self.context_size, self.subject_size, flip=False, mean=self.mean, std=self.std,
            reducing_gap=self.reducing_gap,
        )  # fmt: skip


def rendered_input_settings(datamodule: str, image_size: int, subject_size: int, pixel_source: str) -> InputSettings:
    """The settings of a datamodule that renders square ImageNet-normalised samples (``SyntheticContextDataModule``).

    Its samples are rendered at the output sizes, not decoded and resized: a photo goes through ``ContextTransform``
    at those sizes (its subject is its box resized, where the renderer draws the subject at that size), is decoded
    whole, and is masked with the same fill over the same (outward-rounded) box.
    """
    return InputSettings(
        datamodule=datamodule,
        context_size=(image_size, image_size),
        subject_size=(subject_size, subject_size),
        mean=tuple(IMAGENET_DEFAULT_MEAN),
        std=tuple(IMAGENET_DEFAULT_STD),
        reducing_gap=None,
        mask_subject=True,
        mask_fill=MASK_FILL,
        reduced_decode=False,
        decoder=DECODER,
        decode_rule="full",
        pixel_source=pixel_source,
    )


@runtime_checkable
class DescribesInputs(Protocol):
    """A datamodule that can describe its evaluation inputs (stored in checkpoints for prediction)."""

    def input_settings(self) -> InputSettings:
        """The settings; raises :class:`UnsupportedInputsError` when they cannot be described."""
        ...


def settings_entry(datamodule: object) -> dict[str, Any] | None:
    """The checkpoint entry for ``datamodule``: its settings, the reason they are unknown, or None (no contract)."""
    if not isinstance(datamodule, DescribesInputs):
        return None
    try:
        return datamodule.input_settings().to_dict()
    except UnsupportedInputsError as error:
        return {"unsupported": str(error)}
