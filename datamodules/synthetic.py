"""Procedural, context-biased "person in a scene" data, generated on the fly from a seed.

Every image shows a textured scene (one of ``num_scenes`` procedural scene types) with one target person whose
small, noisy face encodes one of ``num_classes`` emotions, plus a few distractor people with random expressions.
With probability ``bias`` a sample's emotion is its scene's dominant emotion (scene ``s`` -> emotion
``s % num_classes``), otherwise it is uniform, so the scene is a tempting shortcut; the ``unbiased`` test split
draws scene and emotion independently and exposes models that took the shortcut.

Three tasks shaped like the real benchmarks use the same renderer (settings in ``SceneSettings``, models of labels
and scenes in ``synthetic_labels``): CAER-S-shaped, ``num_classes=7`` with ``num_scenes=16`` (two or three scene
types per dominant emotion); EMOTIC-shaped, ``task="multilabel"`` (1-4 of up to 26 long-tailed, co-occurring
categories per person, drawn as a code of cells on the body, the scene drawn given the primary category); and
``scene_layout="continuous"`` (scenes on a continuum of blended styles, which k-means clusters only approximate).

Nothing is read from disk: sample ``i`` of split ``s`` is drawn from its own random generator seeded with
``(seed, s, i)``, so every worker, process and rank sees identical data. Rendering is vectorised numpy over a batch
of samples (``__getitems__``, which ``DataLoader`` calls with each batch's indices): signed distance fields of the
shapes, evaluated on a window around each person and composited with anti-aliased edges.

Samples follow the suite's batch schema (docs/how-to/using-it.md, "The batch schema"), a dict of tensors:

- ``subject`` float32 (3, subject_size, subject_size): the target person's box, rendered at subject resolution.
- ``context`` float32 (3, image_size, image_size): the whole image with the subject's box filled with zeros
  (unless ``mask_subject=False``).
- ``target`` int64 scalar: the emotion; ``scene`` int64 scalar: the true scene type (for diagnostics).
- ``index`` int64 scalar: position in its split; ``box`` float32 (4,): x1, y1, x2, y2 in image pixels (integers,
  x2/y2 exclusive, so ``context[:, y1:y2, x1:x2]`` is the masked region).

Images are rendered in [0, 1] RGB and normalised with the ImageNet mean/std (timm's ``IMAGENET_DEFAULT_MEAN`` and
``IMAGENET_DEFAULT_STD``); the subject mask is applied after normalisation, so masked pixels are exactly 0 (the
mean colour).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import lightning as L
import numpy as np
import pandas as pd
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from ccim_lightning.arguments import check_int
from ccim_lightning.datamodules import synthetic_labels as labelling
from ccim_lightning.datamodules._drawing import EXPRESSIONS, SKIN_DARK, SKIN_LIGHT, choice, composite_person, hsv_to_rgb
from ccim_lightning.datamodules.base import train_drop_last
from ccim_lightning.datamodules.inputs import InputSettings, rendered_input_settings
from ccim_lightning.datamodules.synthetic_scenes import TEXTURES, background_parameters, render_background
from ccim_lightning.datamodules.synthetic_settings import (
    CATEGORY_NAMES,
    EMOTIONS,
    GENERATOR_VERSION,
    SCENE_LAYOUTS,
    TASKS,
    SceneSettings,
)
from ccim_lightning.types import BOX, CONTEXT, INDEX, SCENE, SUBJECT, TARGET

log = logging.getLogger(__name__)

__all__ = [  # with the names defined here, those re-exported from synthetic_settings and synthetic_scenes
    "CATEGORY_NAMES", "EMOTIONS", "GENERATOR_VERSION", "SCENE_LAYOUTS", "SPLITS", "TASKS", "TEXTURES", "SceneSettings",
    "SyntheticContextDataModule", "SyntheticContextDataset",
]  # fmt: skip

SPLITS: tuple[str, ...] = ("train", "val", "test", "test_unbiased")
"""Split names; a split's position here is part of each of its samples' random seed."""


_NOISE_BANK_SIDES = 4  # the shared pixel-noise field is this many image sides wide and high

# Layout of each sample's random draws: U uniforms and Z standard normals, drawn once per sample in this order.
_U_SCENE, _U_FOLLOW, _U_EMOTION, _U_DISTRACTORS = 0, 1, 2, 3
_U_BACKGROUND = slice(4, 12)  # saturation 1/2, value 1/2, frequency, angle, phase x/y
_U_HORIZON, _U_CONTRAST, _U_BRIGHTNESS = 12, 13, 14
_U_NOISE = slice(15, 19)  # offsets into the noise bank: context y/x, subject y/x
_U_PERSON, _U_PER_PERSON = 19, 9  # height, x, y, skin tone, cloth h/s/v, ink, emotion (distractors)
_Z_HUE, _Z_PERSON, _Z_PER_PERSON = 0, 1, 7  # skin jitter x3, face jitter x4


class SyntheticContextDataset(Dataset):
    """One split of procedural context-biased emotion images (see the module docstring).

    ``__getitems__`` renders a whole batch at once and is what ``DataLoader`` uses; ``__getitem__`` renders one.

    Args:
        split: One of ``SPLITS``; ``"test_unbiased"`` ignores ``settings.bias`` (scene and emotion independent).
        size: Number of samples.
        settings: The generator settings (default: ``SceneSettings()``); ``self.settings`` has ``bias=0`` on the
            unbiased split.
        flip: Randomly flip samples horizontally (subject, context and box together, decided by the torch RNG).
        mask_subject: Fill the subject box of ``context`` with zeros.
    """

    def __init__(
        self,
        split: str,
        size: int,
        settings: SceneSettings | None = None,
        flip: bool = False,
        mask_subject: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if settings is None:
            settings = SceneSettings()
        elif not isinstance(settings, SceneSettings):  # e.g. an old positional seed: SyntheticContextDataset(s, n, 3)
            raise TypeError(
                f"settings must be a SceneSettings, got {type(settings).__name__} {settings!r}: pass the generator "
                "settings as SceneSettings(seed=..., bias=..., ...)"
            )
        self.split = split
        self.size = size
        self.settings = replace(settings, bias=0.0) if split == "test_unbiased" else settings
        self.flip = flip
        self.mask_subject = mask_subject
        self._split_id = SPLITS.index(split)
        self._noise: np.ndarray | None = None  # built on first use, in each worker

    def __len__(self) -> int:
        return self.size

    def sample_identities(self) -> list[str]:
        """One stable name per sample (the generator settings, split and index), for dictionary fingerprints."""
        return [f"{self.settings.identity()}:{self.split}:{i}" for i in range(self.size)]

    def sample_table(self) -> pd.DataFrame:
        """One row per sample, in index order: ``index``, ``split`` and the ``scene`` type.

        The identity columns of the predictions CSV (``ccim_lightning.callbacks.PredictionWriter``). Nothing is
        rendered (see ``labels``).
        """
        return pd.DataFrame({INDEX: np.arange(self.size), "split": self.split, SCENE: self.labels()[1]})

    def labels(self, indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Targets and scene types of ``indices`` (default: all samples), without rendering anything.

        Returns:
            ``(targets, scenes)``: int64 (n,) emotions, or float32 (n, C) multi-hot for ``task="multilabel"``; the
            int64 (n,) scene types (the nearest one for ``scene_layout="continuous"``).
        """
        indices = range(self.size) if indices is None else indices
        uniforms = np.array([self._draws(index)[0] for index in indices]).reshape(len(indices), -1)
        targets, scenes, _, _ = self._labels_from(uniforms)
        return targets, scenes

    def dominant_emotion(self, scene: int) -> int:
        """The emotion that scene type ``scene`` is biased towards."""
        return scene % self.settings.num_classes

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Renders the samples at ``indices`` together (the batched fetch ``DataLoader`` uses)."""
        indices = [int(index) for index in indices]
        for index in indices:
            if not 0 <= index < self.size:
                raise IndexError(f"index {index} out of range for the {self.split!r} split of size {self.size}")
        context, subject, boxes, targets, scenes = self._generate(indices, normalise=True)
        if self.mask_subject:
            for image, (x1, y1, x2, y2) in zip(context, boxes):
                image[:, y1:y2, x1:x2] = 0.0
        if self.flip:
            flipped = (torch.rand(len(indices)) < 0.5).numpy()
            context[flipped] = context[flipped, :, :, ::-1]
            subject[flipped] = subject[flipped, :, :, ::-1]
            boxes[flipped, 0], boxes[flipped, 2] = (
                self.settings.image_size - boxes[flipped, 2],
                self.settings.image_size - boxes[flipped, 0],
            )
        batch = {
            SUBJECT: torch.from_numpy(subject),
            CONTEXT: torch.from_numpy(context),
            TARGET: torch.from_numpy(targets),
            INDEX: torch.tensor(indices, dtype=torch.int64),
            BOX: torch.from_numpy(boxes.astype(np.float32)),
            SCENE: torch.from_numpy(scenes),
        }
        return [{key: value[i] for key, value in batch.items()} for i in range(len(indices))]

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int], int, int]:
        """Renders sample ``index`` in [0, 1] RGB, without normalisation, masking or flipping (for viewing).

        Returns:
            ``(image, subject, box, target, scene)``: the full image (3, image_size, image_size) and the subject
            box rendered at (3, subject_size, subject_size), float32; the integer box (x1, y1, x2, y2), x2/y2
            exclusive; the emotion and the scene type.
        """
        image, subject, boxes, targets, scenes = self._generate([index], normalise=False)
        box = tuple(int(v) for v in boxes[0])
        target = targets[0] if self.settings.task == "multilabel" else int(targets[0])  # multilabel: (C,) multi-hot
        return np.clip(image[0], 0.0, 1.0), np.clip(subject[0], 0.0, 1.0), box, target, int(scenes[0])

    # --- generation --------------------------------------------------------------------------------------------
    def _draws(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """All random numbers of sample ``index``: uniforms (see the ``_U_*`` layout) and standard normals."""
        rng = np.random.default_rng([self.settings.seed, self._split_id, index])
        uniforms = rng.random(self._extra_uniforms_at())
        normals = rng.standard_normal(self._extra_normals_at())
        if self.settings.task == "multilabel":  # drawn after the others, so the shared draws keep their values
            uniforms = np.concatenate([uniforms, rng.random(labelling.MULTILABEL_UNIFORMS)])
            normals = np.concatenate([normals, rng.standard_normal(self.settings.num_classes)])
        return uniforms, normals

    def _extra_uniforms_at(self) -> int:
        return _U_PERSON + _U_PER_PERSON * (self.settings.max_distractors + 1)

    def _extra_normals_at(self) -> int:
        return _Z_PERSON + _Z_PER_PERSON * (self.settings.max_distractors + 1)

    def _labels_from(self, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(targets, scenes, expressions, positions)``: labels, scene types, the target's face, scene positions."""
        settings = self.settings
        if settings.task == "multilabel":
            extra = uniforms[:, self._extra_uniforms_at() :]
            targets, primary = labelling.multilabel_targets(uniforms[:, _U_EMOTION], extra, settings.num_classes)
            scenes = labelling.scenes_given_primary(
                uniforms[:, _U_SCENE], uniforms[:, _U_FOLLOW], primary, settings.bias, settings.num_classes,
                settings.num_scenes,
            )  # fmt: skip
            return targets, scenes, primary % len(EXPRESSIONS), scenes
        if settings.scene_layout == "continuous":
            positions, scenes = labelling.continuous_positions(uniforms[:, _U_SCENE], settings.num_scenes)
        else:
            scenes = choice(uniforms[:, _U_SCENE], settings.num_scenes)
            positions = scenes
        uniform_emotion = choice(uniforms[:, _U_EMOTION], settings.num_classes)
        targets = np.where(uniforms[:, _U_FOLLOW] < settings.bias, scenes % settings.num_classes, uniform_emotion)
        return targets, scenes, targets, positions

    def _noise_bank(self) -> np.ndarray:
        if self._noise is None:
            side = _NOISE_BANK_SIDES * max(self.settings.image_size, self.settings.subject_size)
            rng = np.random.default_rng([self.settings.seed, len(SPLITS)])
            self._noise = rng.standard_normal((3, side, side), dtype=np.float32)
        return self._noise

    def _person(self, uniforms: np.ndarray, normals: np.ndarray, slot: int, expressions: np.ndarray) -> dict:
        """Parameters of person ``slot`` (0 = the target, then distractors) for every sample of the batch."""
        u = uniforms[:, _U_PERSON + _U_PER_PERSON * slot :][:, :_U_PER_PERSON]
        z = normals[:, _Z_PERSON + _Z_PER_PERSON * slot :][:, :_Z_PER_PERSON]
        size = self.settings.image_size
        if slot == 0:  # the target: the whole box inside the image
            h = (0.42 + 0.28 * u[:, 0]) * size
            cx = h / 4 + u[:, 1] * (size - h / 2)
            top = u[:, 2] * (size - h)
            emotion = expressions
        else:
            h = (0.3 + 0.3 * u[:, 0]) * size
            cx = u[:, 1] * size
            top = -0.2 * h + u[:, 2] * (size - 0.4 * h)
            emotion = choice(u[:, 8], min(self.settings.num_classes, len(EXPRESSIONS)))  # multilabel: any face
        skin = SKIN_LIGHT + u[:, 3, None] * (SKIN_DARK - SKIN_LIGHT) + 0.03 * z[:, :3]
        return {
            "cx": cx.astype(np.float32),
            "top": top.astype(np.float32),
            "h": h.astype(np.float32),
            "skin": np.clip(skin, 0.0, 1.0).astype(np.float32),
            "cloth": hsv_to_rgb(u[:, 4], 0.2 + 0.7 * u[:, 5], 0.25 + 0.7 * u[:, 6]),
            "ink": (0.2 * u[:, 7]).astype(np.float32),
            "face": (EXPRESSIONS[emotion] + self.settings.expression_noise * z[:, 3:7]).astype(np.float32),
        }

    def _generate(self, indices: list[int], normalise: bool):
        """Renders a batch: ``(context, subject, boxes, targets, scenes)``, images (n, 3, H, W) float32."""
        n, size, sub = len(indices), self.settings.image_size, self.settings.subject_size
        draws = [self._draws(index) for index in indices]
        uniforms = np.stack([d[0] for d in draws]) if n else np.zeros((0, _U_PERSON + _U_PER_PERSON))
        normals = np.stack([d[1] for d in draws]) if n else np.zeros((0, _Z_PERSON + _Z_PER_PERSON))
        targets, scenes, expressions, positions = self._labels_from(uniforms)
        n_distractors = choice(uniforms[:, _U_DISTRACTORS], self.settings.max_distractors + 1)
        slots = range(self.settings.max_distractors + 1)
        people = [self._person(uniforms, normals, slot, expressions) for slot in slots]
        target = people[0]
        x1, y1 = np.floor(target["cx"] - target["h"] / 4), np.floor(target["top"])
        x2, y2 = np.ceil(target["cx"] + target["h"] / 4), np.ceil(target["top"] + target["h"])
        boxes = np.clip(np.stack([x1, y1, x2, y2], axis=1), 0, size).astype(np.int64)

        # sample positions (pixel centres, image coordinates) and spacing of the two renderings
        grid = np.arange(size, dtype=np.float32) + 0.5
        ctx_x, ctx_y = np.broadcast_to(grid, (n, size)), np.broadcast_to(grid, (n, size))
        corners, sides = boxes[:, :2].astype(np.float32), (boxes[:, 2:] - boxes[:, :2]).astype(np.float32)
        fractions = (np.arange(sub, dtype=np.float32) + 0.5) / sub
        sub_x = corners[:, 0, None] + fractions * sides[:, 0, None]
        sub_y = corners[:, 1, None] + fractions * sides[:, 1, None]
        sub_step = sides.max(axis=1) / sub

        u_background, u_horizon = uniforms[:, _U_BACKGROUND], uniforms[:, _U_HORIZON]
        background = background_parameters(
            u_background, normals[:, _Z_HUE], u_horizon, positions, self.settings.num_scenes, size
        )
        order = [*range(1, self.settings.max_distractors + 1), 0]  # distractors first, the target on top
        images = []
        renderings = ((ctx_x, ctx_y, np.ones(n, np.float32), True), (sub_x, sub_y, sub_step, False))
        for xs, ys, step, windowed in renderings:
            canvas = render_background(background, xs, ys, step, size)
            for slot in order:
                present = np.ones(n, bool) if slot == 0 else n_distractors >= slot
                self._render_person(canvas, people[slot], np.flatnonzero(present), xs, ys, step, windowed)
            if self.settings.task == "multilabel":  # the labels, as a noisy code of cells on the body
                code = targets + self.settings.expression_noise * normals[:, self._extra_normals_at() :]
                labelling.paint_label_code(canvas, xs, ys, boxes, code, self.settings.num_classes)
            images.append(canvas)

        # contrast/brightness jitter, pixel noise and (optionally) ImageNet normalisation, per sample and channel
        contrast = 0.85 + 0.3 * uniforms[:, _U_CONTRAST]
        brightness = -0.06 + 0.12 * uniforms[:, _U_BRIGHTNESS]
        scale = np.repeat(contrast[:, None], 3, axis=1)
        offset = np.repeat((0.5 - 0.5 * contrast + brightness)[:, None], 3, axis=1)
        noise_scale = np.full((n, 3), self.settings.pixel_noise)
        if normalise:
            mean, std = np.asarray(IMAGENET_DEFAULT_MEAN), np.asarray(IMAGENET_DEFAULT_STD)
            scale, offset, noise_scale = scale / std, (offset - mean) / std, noise_scale / std
        bank = self._noise_bank()
        offsets = (uniforms[:, _U_NOISE] * (bank.shape[1] - max(size, sub))).astype(np.int64)
        for image, oy, ox in zip(images, offsets[:, 0::2].T, offsets[:, 1::2].T):
            side = image.shape[-1]
            image *= scale[:, :, None, None].astype(np.float32)
            image += offset[:, :, None, None].astype(np.float32)
            for i in range(n):
                noise = bank[:, oy[i] : oy[i] + side, ox[i] : ox[i] + side]
                image[i] += noise_scale[i, :, None, None].astype(np.float32) * noise
        return images[0], images[1], boxes, targets, scenes

    @staticmethod
    def _render_person(canvas, person: dict, rows_of: np.ndarray, xs, ys, step, windowed: bool) -> None:
        """Composites ``person`` into the samples ``rows_of`` of ``canvas`` (n, 3, H, W), in place.

        With ``windowed`` (context grid: one sample per image pixel) the shapes are evaluated only on a window
        around each person (one window size for the batch, placed inside the image), otherwise on the whole canvas.
        """
        if len(rows_of) == 0:
            return
        p = {key: value[rows_of] for key, value in person.items()}
        xs, ys = xs[rows_of], ys[rows_of]
        if windowed:
            height, width = canvas.shape[2:]
            win_h = min(int(np.ceil(p["h"].max())) + 3, height)
            win_w = min(int(np.ceil(p["h"].max() / 2)) + 3, width)
            tops = np.clip(np.floor(p["top"]).astype(np.int64) - 1, 0, height - win_h)
            lefts = np.clip(np.floor(p["cx"] - p["h"] / 4).astype(np.int64) - 1, 0, width - win_w)
            windows = [(i, slice(t, t + win_h), slice(left, left + win_w)) for i, t, left in zip(rows_of, tops, lefts)]
            view = np.stack([canvas[i, :, r, c] for i, r, c in windows])
            xs = np.stack([x[c] for x, (_, _, c) in zip(xs, windows)])
            ys = np.stack([y[r] for y, (_, r, _) in zip(ys, windows)])
        else:
            view = canvas[rows_of]
        x = xs[:, None, :] - p["cx"][:, None, None].astype(np.float32)
        y = ys[:, :, None] - p["top"][:, None, None].astype(np.float32)
        composite_person(view, x, y, step[rows_of, None, None], p)
        if windowed:
            for window, (i, r, c) in zip(view, windows):
                canvas[i, :, r, c] = window
        else:
            canvas[rows_of] = view


class SyntheticContextDataModule(L.LightningDataModule):
    """Procedural context-biased emotion data (``SyntheticContextDataset`` splits), with two test sets.

    ``test_dataloader`` returns ``[biased, unbiased]`` (``test_set_names``): the biased test set follows the training
    distribution, the unbiased one draws scene and emotion independently, so the gap between their accuracies
    measures how much a model relies on the scene shortcut. ``predict_dataloader`` serves the unbiased set.

    Args:
        seed: Dataset seed (>= 0); every split is a pure function of it and the settings below.
        bias: Probability in [0, 1] that a train/val/biased-test sample's emotion is its scene's dominant emotion
            (scene ``s`` -> emotion ``s % num_classes``); otherwise the emotion is uniform. 0 = independent.
        num_classes: Number of emotions, 2 to 7 (``class_names`` = ``EMOTIONS[:num_classes]``).
        num_scenes: Number of scene types.
        image_size: Side of the context image in pixels.
        subject_size: Side of the subject crop in pixels.
        train_size: Training samples.
        val_size: Validation samples.
        test_size: Samples in each of the two test sets.
        batch_size: Batch size of every dataloader.
        num_workers: Dataloader worker processes.
        expression_noise: Standard deviation of the per-person jitter of the face parameters (happy-to-neutral
            face distance = 1); higher makes the face harder to read and the scene more tempting.
        pixel_noise: Standard deviation of the additive pixel noise on the [0, 1] colour scale.
        max_distractors: Maximum number of other people with random expressions per image.
        flip: Random horizontal flips of training samples (subject, context and box together).
        task: ``"multiclass"`` or ``"multilabel"`` (EMOTIC-shaped: ``num_classes`` up to 26 categories, 1-4 per
            person, long-tailed and co-occurring; ``bias`` ties the scene to the primary category; the model logs
            ``mAP``). See ``SceneSettings`` and ``synthetic_labels``.
        scene_layout: ``"discrete"`` scene types or ``"continuous"`` blends of them (multiclass only).
    """

    test_set_names = ("biased", "unbiased")

    def __init__(
        self,
        seed: int = 0,
        bias: float = 0.9,
        num_classes: int = 4,
        num_scenes: int = 4,
        image_size: int = 64,
        subject_size: int = 32,
        train_size: int = 4000,
        val_size: int = 800,
        test_size: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        expression_noise: float = 0.4,
        pixel_noise: float = 0.06,
        max_distractors: int = 2,
        flip: bool = True,
        task: str = "multiclass",
        scene_layout: str = "discrete",
    ) -> None:
        super().__init__()
        where = type(self).__name__
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            check_int(where, name, value, 1)
        check_int(where, "batch_size", batch_size, 1)
        check_int(where, "num_workers", num_workers, 0)
        self.save_hyperparameters()
        self.settings = SceneSettings.from_mapping(self.hparams)  # checks the generator settings
        self.num_classes = num_classes
        self.task = task
        self.class_names = list(self.settings.class_names_of_task()[:num_classes])
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_dataset: SyntheticContextDataset | None = None
        self.val_dataset: SyntheticContextDataset | None = None
        self.test_dataset: SyntheticContextDataset | None = None
        self.test_unbiased_dataset: SyntheticContextDataset | None = None
        self._drop_last_logged = False

    def _dataset(self, split: str, flip: bool = False, mask_subject: bool = True) -> SyntheticContextDataset:
        hp = self.hparams
        size = {"train": hp.train_size, "val": hp.val_size}.get(split, hp.test_size)
        return SyntheticContextDataset(split, size, self.settings, flip=flip, mask_subject=mask_subject)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Creates all four splits (cheap: samples are rendered when indexed)."""
        if self.train_dataset is None:
            self.train_dataset = self._dataset("train", flip=self.hparams.flip)
            self.val_dataset = self._dataset("val")
            self.test_dataset = self._dataset("test")
            self.test_unbiased_dataset = self._dataset("test_unbiased")

    def _loader(
        self, dataset: Dataset | None, shuffle: bool = False, batch_size: int | None = None, drop_last: bool = False
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError("SyntheticContextDataModule: call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled; drops the last batch only when it would hold one sample (BatchNorm cannot train on it)."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        drop = train_drop_last(len(self.train_dataset or ()), self.batch_size, world_size)
        if drop and not self._drop_last_logged:
            log.info(
                "synthetic train: %d samples leave a last batch of one sample, which BatchNorm cannot train on; that "
                "batch is dropped each epoch",
                len(self.train_dataset),
            )
            self._drop_last_logged = True
        return self._loader(self.train_dataset, shuffle=True, drop_last=drop)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """The biased and the unbiased test sets, in the order of ``test_set_names``."""
        return [self._loader(self.test_dataset), self._loader(self.test_unbiased_dataset)]

    @override
    def predict_dataloader(self) -> DataLoader:
        """The unbiased test set."""
        return self._loader(self.test_unbiased_dataset)

    def dictionary_dataset(self, mask_subject: bool = True) -> SyntheticContextDataset:
        """The training split for the confounder dictionary, as ``PersonDataModule.dictionary_dataset``."""
        return self._dataset("train", flip=False, mask_subject=mask_subject)

    def dictionary_signature(self) -> dict:
        """Everything about the dictionary's input pixels that its cache key must include.

        The generator version and image size, the normalisation and the masking fill value (the samples
        themselves, with all generator settings, are named by ``sample_identities()``).
        """
        return {
            "datamodule": type(self).__name__,
            "pixels": f"synthetic-v{GENERATOR_VERSION} (rendered at the output size, no resize)",
            "context_size": [self.settings.image_size, self.settings.image_size],
            "mean": list(IMAGENET_DEFAULT_MEAN),
            "std": list(IMAGENET_DEFAULT_STD),
            "mask_fill": 0.0,
        }

    def input_settings(self) -> InputSettings:
        """For photos (``inference.Predictor``): see ``inputs.rendered_input_settings``."""
        size, subject = self.settings.image_size, self.settings.subject_size
        return rendered_input_settings(type(self).__name__, size, subject, f"synthetic-v{GENERATOR_VERSION}")

    def dictionary_dataloader(self, batch_size: int | None = None, mask_subject: bool = True) -> DataLoader:
        """A non-shuffled loader over ``dictionary_dataset(mask_subject)``; wrap the dataset yourself for a sampler.

        Args:
            batch_size: Defaults to the datamodule's batch size.
            mask_subject: See ``dictionary_dataset``.
        """
        return self._loader(self.dictionary_dataset(mask_subject), batch_size=batch_size)
