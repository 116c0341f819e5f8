"""``Predictor``: a trained checkpoint applied to new photos, one row of emotion probabilities per person.

The photo goes through the very path the checkpoint's test split went through: the evaluation
``ContextTransform`` rebuilt from the settings stored in the checkpoint (``ccim_lightning.datamodules.inputs``),
the datamodules' decoding (reduced JPEG decoding for files when the model was trained with it), the subject box
masked in the context on the model's device by the datamodules' ``normalize_batch``, then the model's own
``predict_step`` (debiasing method's inference rule included). Nothing of that pipeline is written again here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.cli import instantiate_module
from PIL import Image

from ccim_lightning.callbacks.prediction_writer import LABEL_SEPARATOR
from ccim_lightning.checkpoints import CheckpointError, check_checkpoint_finite, load_checkpoint
from ccim_lightning.class_paths import check_class_paths
from ccim_lightning.datamodules.common import clip_boxes
from ccim_lightning.datamodules.dataset import normalize_batch
from ccim_lightning.datamodules.decode import decode_reduced, load_rgb, open_image, oriented_size, to_rgb
from ccim_lightning.datamodules.inputs import INPUT_SETTINGS_KEY, InputSettings
from ccim_lightning.datamodules.transforms import ContextTransform
from ccim_lightning.module import CCIMLightningModule
from ccim_lightning.thresholds import DEFAULT_THRESHOLD
from ccim_lightning.types import BOX, CONTEXT, INDEX, MASK_BOX, PROBABILITIES, SUBJECT

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image | np.ndarray
"""One photo: a file path, a PIL image (any mode the datamodules decode), or an (H, W, 3) uint8 RGB array."""
Box = Sequence[float]
"""x1, y1, x2, y2 in the image's pixels (x2, y2 exclusive, as in the datamodules' annotations)."""

IDENTITY_COLUMNS = ("image", "person", "x1", "y1", "x2", "y2")
"""The columns before the per-class probabilities."""


class Predictor:
    """A trained CCIM model with the input settings it was trained with, ready for new photos.

    Build one with :meth:`from_checkpoint`; the constructor is for a model held in Python (e.g. one trained
    from Python with a live backbone, whose checkpoint cannot rebuild it).

    Args:
        model: The trained model; moved to ``device`` and put in eval mode.
        inputs: Its evaluation input settings (``InputSettings``, as stored in its checkpoints).
        device: Where to run (default: CUDA when available, else the CPU).
    """

    def __init__(self, model: CCIMLightningModule, inputs: InputSettings, device: str | torch.device | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.inputs = inputs
        self.class_names = list(model.class_names)
        self.task = model.task
        clashes = sorted(set(self.class_names) & {*IDENTITY_COLUMNS, "prediction", "labels"})
        if clashes:
            raise ValueError(f"class names {clashes} clash with the predictions table's own columns; rename them")
        self.thresholds = self._decision_thresholds() if self.task == "multilabel" else None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Predictor:
        """Restores the model and every input setting it was trained with from a ``ccim fit`` checkpoint.

        The file is read weights-only and checked as ``ccim_lightning.checkpoints`` does (damaged, foreign, unsafe
        or non-finite files are refused, naming the file).

        Args:
            path: A checkpoint written by ``ccim fit`` (or any Lightning fit whose model was built from a config,
                e.g. by LightningCLI, with a datamodule of this package).
            device: Where to run (default: CUDA when available, else the CPU).

        Raises:
            CheckpointError: The file is unusable, or lacks what prediction needs (the model's configuration, or
                the input settings of checkpoints written before they were stored); the message names what.
        """
        checkpoint = load_checkpoint(path)
        check_checkpoint_finite(checkpoint, path)
        check_class_paths(checkpoint, source=str(path))  # what instantiate_module would import: allow-list only
        where = f"Checkpoint {str(path)!r}"
        stored = checkpoint.get(INPUT_SETTINGS_KEY)
        if stored is None:
            raise CheckpointError(
                f"{where} holds no input settings ('{INPUT_SETTINGS_KEY}': subject and context sizes, normalisation, "
                "subject masking, decoding): it was written before ccim-lightning stored them, or by a fit without "
                "one of its datamodules. Fit again with this version, or build "
                "Predictor(model, InputSettings(...)) with the settings it was trained with."
            )
        try:
            inputs = InputSettings.from_dict(stored, where)
        except ValueError as error:
            raise CheckpointError(str(error)) from error
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        if not isinstance(hparams.get("backbone"), dict):
            raise CheckpointError(
                f"{where} holds no configuration of its backbone (hyper_parameters['backbone']): the model was "
                "built in Python with a live backbone module, which checkpoints do not store. Rebuild it with "
                "CCIMLightningModule.load_from_checkpoint(path, backbone=<the same backbone>) and pass it to "
                "Predictor(model, inputs)."
            )
        hparams.pop("_instantiator", None)  # which instantiator Lightning's own loading would use: this one
        try:
            model = instantiate_module(CCIMLightningModule, hparams)
        except Exception as error:  # jsonargparse reports a bad class path or argument in many exception types
            raise CheckpointError(f"{where}: cannot rebuild the model from its hyper_parameters: {error}") from error
        model.on_load_checkpoint(checkpoint)  # sizes the variable-length buffers, as Lightning does before loading
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:  # missing, unexpected or mis-shaped weights
            raise CheckpointError(
                f"{where}: its weights do not fit the model its hyper_parameters build: {error}"
            ) from error
        return cls(model, inputs, device)

    def _decision_thresholds(self) -> np.ndarray:
        if not bool(self.model.thresholds_chosen):
            log.warning(
                "The model has no decision thresholds chosen on a validation split (fitted before ccim-lightning "
                "chose them, or without validation): every class uses %s",
                DEFAULT_THRESHOLD,
            )
            return np.full(len(self.class_names), DEFAULT_THRESHOLD)
        return self.model.decision_thresholds.detach().cpu().double().numpy().copy()

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        boxes: Sequence[Box] | Sequence[Sequence[Box] | None] | None = None,
        *,
        batch_size: int = 32,
    ) -> pd.DataFrame:
        """The emotion probabilities of every person in ``images``.

        Args:
            images: A sequence of photos (paths, PIL images in any mode the datamodules decode, or (H, W, 3) uint8
                RGB arrays), or one photo.
            boxes: The persons, one entry per image: a list of (x1, y1, x2, y2) boxes in that image's pixels
                (several per image; an empty list: nobody, no row), or None. ``boxes=None`` (or a None entry)
                takes the whole image as the one person: its subject crop is the whole image and nothing of the
                context is masked, as the datamodules do for an annotation without a box. With a single photo,
                ``boxes`` is that photo's list of boxes. A box reaching outside its image is clipped to it, as the
                datamodules clip annotated boxes (the table gives the clipped box); a box with less than one
                pixel inside, a reversed box or a non-finite coordinate is refused, naming the image and box.
            batch_size: Persons per forward pass.

        A file is decoded as the datamodules decode their files: a JPEG at reduced size where the model was trained
        with ``reduced_decode`` (``ccim_lightning.datamodules.decode``). A PIL image or an array is already
        decoded, so the probabilities of a JPEG given that way can differ from its file's by what reduced
        decoding changes (about 1-2 grey levels); for other formats all three give the same probabilities. As in the
        datamodules, one reduction serves all the persons of a file given together (the smallest they allow).

        Returns:
            One row per person, in input order: ``image`` (the path as given, or the image's position in
            ``images``), ``person`` (position among its image's boxes), ``x1, y1, x2, y2`` (the box used), one
            probability column per class name, then ``prediction`` (multiclass: the most probable class) or
            ``labels`` (multilabel: every class whose probability is at or above its threshold,
            :attr:`thresholds`, joined by ``"|"``; empty when none is).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows: list[dict[str, Any]] = []
        probabilities: list[torch.Tensor] = []
        pending: list[dict[str, Any]] = []
        for row, sample in self._persons(images, boxes):
            rows.append(row)
            pending.append(sample)
            if len(pending) == batch_size:
                probabilities.append(self._forward(pending))
                pending = []
        if pending:
            probabilities.append(self._forward(pending))
        return self._frame(rows, torch.cat(probabilities) if probabilities else torch.zeros(0, len(self.class_names)))

    def preprocess(
        self,
        images: ImageInput | Sequence[ImageInput],
        boxes: Sequence[Box] | Sequence[Sequence[Box] | None] | None = None,
    ) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
        """What the model sees for these persons: their rows and one batch of the float batch schema.

        Arguments as :meth:`predict`. Returns the identity columns of :meth:`predict`'s table and the batch
        (``subject``, ``context`` with the subject masked, ``box``, ``index``) on the predictor's device.
        """
        rows, samples = [], []
        for row, sample in self._persons(images, boxes):
            rows.append(row)
            samples.append(sample)
        if not samples:
            raise ValueError("no person to preprocess (no image, or only empty box lists)")
        return pd.DataFrame(rows, columns=list(IDENTITY_COLUMNS)), self._batch(samples)

    # --- preprocessing: the datamodules' evaluation path -----------------------------------------------------------
    def _persons(
        self,
        images: ImageInput | Sequence[ImageInput],
        boxes: Sequence[Box] | Sequence[Sequence[Box] | None] | None,
    ) -> Iterator[tuple[dict, dict]]:
        """(table row, uint8 sample) of every person, image by image (one image decoded at a time)."""
        single = isinstance(images, (str, os.PathLike, Image.Image, np.ndarray))
        image_list = [images] if single else list(images)
        if boxes is None:
            box_lists: list[Any] = [None] * len(image_list)
        elif single:
            box_lists = [boxes]
        else:
            box_lists = list(boxes)
            if len(box_lists) != len(image_list):
                raise ValueError(
                    f"boxes has {len(box_lists)} entries for {len(image_list)} images: give one list of boxes (or "
                    "None) per image"
                )
        transform = self.inputs.eval_transform()  # fresh per call: its context cache never outlives the call
        for position, (image, image_boxes) in enumerate(zip(image_list, box_lists)):
            yield from self._samples(transform, position, image, image_boxes)

    def _samples(
        self, transform: ContextTransform, position: int, image: ImageInput, boxes: Sequence[Box] | None
    ) -> Iterator[tuple[dict, dict]]:
        """(table row, uint8 sample) of each person of one image."""
        name = str(image) if isinstance(image, (str, os.PathLike)) else position
        label = f"image {name!r}" if isinstance(name, str) else f"image {position} of the input"
        if boxes is not None and len(boxes) == 0:
            return
        pixels, size, applied = self._decode(transform, image, label, boxes)
        width, height = size
        if boxes is None:
            checked = [None]
        else:
            checked = [self._clip(box, size, label) for box in boxes]
        for person, box in enumerate(checked):
            output = transform(
                pixels, box, reduction=applied, full_size=size, uint8=True,
                reduce_context=self.inputs.reduced_decode,
            )  # fmt: skip
            mask_box = output[MASK_BOX] if self.inputs.mask_subject and output[MASK_BOX] is not None else None
            x1, y1, x2, y2 = (0.0, 0.0, float(width), float(height)) if box is None else box
            row = {"image": name, "person": person, "x1": x1, "y1": y1, "x2": x2, "y2": y2}
            yield (
                row,
                {
                    SUBJECT: output[SUBJECT],
                    CONTEXT: output[CONTEXT],
                    MASK_BOX: torch.tensor(mask_box or (0, 0, 0, 0), dtype=torch.int64),
                    BOX: torch.tensor(output[BOX], dtype=torch.float32),
                },
            )

    def _decode(
        self, transform: ContextTransform, image: ImageInput, label: str, boxes: Sequence[Box] | None
    ) -> tuple[Image.Image, tuple[int, int], int]:
        """(8-bit RGB image, full (width, height), reduction applied), decoded as the datamodules decode."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise TypeError(
                    f"{label}: an array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}; convert it "
                    "(e.g. np.asarray(PIL.Image.open(path).convert('RGB'))) or pass a PIL image or a path"
                )
            pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
            return pil, pil.size, 1
        if isinstance(image, Image.Image):
            rgb = to_rgb(image, Path(label))
            return rgb, rgb.size, 1
        if not isinstance(image, (str, os.PathLike)):
            raise TypeError(f"{label}: expected a path, a PIL image or an (H, W, 3) uint8 array, got {type(image)}")
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{label}: no such file {str(path)!r}")
        try:
            if not self.inputs.reduced_decode:
                rgb = load_rgb(path)
                return rgb, rgb.size, 1
            with open_image(path) as header:  # the displayed (EXIF-oriented) size, which boxes refer to
                size = oriented_size(header)
            # the smallest reduction any person of the image allows: one decode serves them all, as in training
            people = [None] if boxes is None else [self._clip(box, size, label) for box in boxes]
            localised = np.array([box is not None for box in people])
            box_array = np.array([box if box is not None else (0, 0, *size) for box in people], dtype=np.float64)
            sizes = np.tile(np.array(size, dtype=np.int64), (len(people), 1))
            reduction = int(transform.decode_reductions(sizes, box_array, localised).min())
            rgb, applied = decode_reduced(path, reduction, size)
        except (OSError, ValueError) as error:
            if isinstance(error, BoxError):
                raise
            raise OSError(f"{label}: cannot decode the image: {error}") from error
        return rgb, (size if applied > 1 else rgb.size), applied

    @staticmethod
    def _clip(box: Box, size: tuple[int, int], label: str) -> tuple[float, float, float, float]:
        """The box clipped to the image (``datamodules.common.clip_boxes``); refused when it cannot be used."""
        values = np.asarray(box, dtype=np.float64).reshape(-1)
        if values.shape != (4,) or not np.isfinite(values).all():
            raise BoxError(f"{label}: box {list(box)} is not four finite numbers x1, y1, x2, y2")
        if values[2] <= values[0] or values[3] <= values[1]:
            raise BoxError(f"{label}: box {values.tolist()} has x2 <= x1 or y2 <= y1; give (x1, y1, x2, y2)")
        clipped, localised = clip_boxes(values[None], np.array([size]))
        if not localised[0]:
            raise BoxError(
                f"{label}: box {values.tolist()} has less than one pixel inside the {size[0]}x{size[1]} image; "
                "check that it belongs to this image and is in its pixels (x1, y1, x2, y2)"
            )
        return tuple(float(v) for v in clipped[0])

    # --- the model -------------------------------------------------------------------------------------------------
    def _batch(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """uint8 samples as one float batch on the device: normalised and masked by the datamodules' code."""
        batch = {key: torch.stack([s[key] for s in samples]).to(self.device) for key in samples[0]}
        batch[INDEX] = torch.arange(len(samples), device=self.device)
        return normalize_batch(batch, self.inputs.mean, self.inputs.std, self.inputs.mask_fill)

    @torch.inference_mode()
    def _forward(self, samples: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Class probabilities (B, C) on the CPU for a list of uint8 samples."""
        self.model.eval()  # again: a trainer run on the same model in between leaves it in training mode
        return self.model.predict_step(self._batch(samples), 0)[PROBABILITIES].float().cpu()

    def _frame(self, rows: list[dict[str, Any]], probabilities: torch.Tensor) -> pd.DataFrame:
        frame = pd.DataFrame(rows, columns=list(IDENTITY_COLUMNS))
        values = probabilities.double().numpy()
        frame = pd.concat([frame, pd.DataFrame(values, columns=self.class_names)], axis=1)
        names = np.asarray(self.class_names, dtype=object)
        if self.task == "multiclass":
            frame["prediction"] = names[values.argmax(axis=1)] if len(values) else []
        else:
            frame["labels"] = [LABEL_SEPARATOR.join(names[row >= self.thresholds]) for row in values]
        return frame


class BoxError(ValueError):
    """A person box that cannot be used (not four finite numbers, reversed, or outside its image)."""
