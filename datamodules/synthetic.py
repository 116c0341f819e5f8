"""Procedural, context-biased "person in a scene" data, generated on the fly from a seed.

Every image shows a textured scene (one of ``num_scenes`` procedural scene types) with one target person whose
small, noisy face encodes one of ``num_classes`` emotions, plus a few distractor people with random expressions.
With probability ``bias`` a sample's emotion is its scene's dominant emotion (scene ``s`` -> emotion
``s % num_classes``), otherwise it is uniform, so the scene is a tempting shortcut; the ``unbiased`` test split
draws scene and emotion independently and exposes models that took the shortcut.

Nothing is read from disk: sample ``i`` of split ``s`` is rendered from its own random generator seeded with
``(seed, s, i)``, so every worker, process and rank sees identical data. Rendering is vectorised numpy over each
shape's bounding window.

Samples follow the suite's batch schema (``docs/design.md``), a dict of tensors:

- ``subject`` float32 (3, subject_size, subject_size): the target person's box, rendered at subject resolution.
- ``context`` float32 (3, image_size, image_size): the whole image with the subject's box filled with zeros
  (unless ``mask_subject=False``).
- ``target`` int64 scalar: the emotion; ``scene`` int64 scalar: the true scene type (for diagnostics).
- ``index`` int64 scalar: position in its split; ``box`` float32 (4,): x1, y1, x2, y2 in image pixels (integers,
  x2/y2 exclusive, so ``context[:, y1:y2, x1:x2]`` is the masked region).

Images are rendered in [0, 1] RGB and normalised with the ImageNet mean/std (``IMAGENET_MEAN``, ``IMAGENET_STD``);
the subject mask is applied after normalisation, so masked pixels are exactly 0 (the mean colour).
"""

from __future__ import annotations

import colorsys
import math

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

EMOTIONS: tuple[str, ...] = ("angry", "happy", "neutral", "sad", "surprise", "fear", "disgust")
"""Emotion names; ``num_classes=k`` uses the first ``k``."""

# Face parameters per emotion: mouth curve (+ corners up), mouth opening, brow tilt (+ inner ends down), brow raise.
_EXPRESSIONS = np.array(
    [
        [-0.3, 0.0, 1.0, -0.3],  # angry
        [1.0, 0.0, 0.0, 0.0],  # happy
        [0.0, 0.0, 0.0, 0.0],  # neutral
        [-1.0, 0.0, -1.0, 0.3],  # sad
        [0.0, 1.0, 0.0, 1.0],  # surprise
        [-0.5, 0.6, -1.0, 0.6],  # fear
        [-0.6, 0.0, 0.6, -0.8],  # disgust
    ]
)

SPLITS: tuple[str, ...] = ("train", "val", "test", "test_unbiased")
"""Split names; a split's position here is part of each of its samples' random seed."""

TEXTURES: tuple[str, ...] = ("stripes", "checkerboard", "dots", "horizon")
"""Background textures; scene ``s`` uses ``TEXTURES[s % 4]``, its palette and geometry also depend on ``s``."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SKIN_LIGHT = np.array([0.96, 0.82, 0.70])
_SKIN_DARK = np.array([0.36, 0.23, 0.16])
_NOISE_BANK_SIDES = 4  # the shared pixel-noise field is this many image sides wide and high


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), dtype=np.float32)


def _paint(view: np.ndarray, sd: np.ndarray, colour: np.ndarray, step: float) -> None:
    """Alpha-blends a flat colour into ``view`` (3, h, w) in place where the signed distance ``sd`` is negative.

    Edges are anti-aliased over one sample spacing ``step`` (image pixels per sample).
    """
    alpha = sd * np.float32(-1.0 / step)
    alpha += np.float32(0.5)
    np.minimum(np.maximum(alpha, 0.0, out=alpha), 1.0, out=alpha)
    view += alpha * (colour[:, None, None] - view)


def _window(coords: np.ndarray, lo: float, hi: float) -> slice:
    """The slice of the uniform, increasing sample positions ``coords`` that lie in [lo, hi)."""
    first, n = float(coords[0]), len(coords)
    step = float(coords[1]) - first if n > 1 else 1.0
    return slice(min(max(math.ceil((lo - first) / step), 0), n), min(max(math.ceil((hi - first) / step), 0), n))


class SyntheticContextDataset(Dataset):
    """One split of procedural context-biased emotion images (see the module docstring).

    Args:
        split: One of ``SPLITS``; ``"test_unbiased"`` ignores ``bias`` (scene and emotion independent).
        size: Number of samples.
        seed: Dataset seed (>= 0); the data is a pure function of (seed, split, index) and the settings.
        bias: Probability that a sample's emotion is its scene's dominant emotion; otherwise it is uniform.
        num_classes: Number of emotions, 2 to 7 (``EMOTIONS[:num_classes]``).
        num_scenes: Number of scene types.
        image_size: Side of the context image in pixels.
        subject_size: Side of the subject crop in pixels.
        expression_noise: Standard deviation of the per-person jitter of the face parameters, in units of the
            difference between the happy and the neutral face (0 = clean prototypes).
        pixel_noise: Standard deviation of the additive Gaussian pixel noise on the [0, 1] colour scale.
        max_distractors: Maximum number of other people (random expressions) per image.
        flip: Randomly flip samples horizontally (subject, context and box together, decided by the torch RNG).
        mask_subject: Fill the subject box of ``context`` with zeros.
    """

    def __init__(
        self,
        split: str,
        size: int,
        seed: int = 0,
        bias: float = 0.9,
        num_classes: int = 4,
        num_scenes: int = 4,
        image_size: int = 64,
        subject_size: int = 32,
        expression_noise: float = 0.3,
        pixel_noise: float = 0.06,
        max_distractors: int = 2,
        flip: bool = False,
        mask_subject: bool = True,
    ) -> None:
        _check_settings(
            seed,
            bias,
            num_classes,
            num_scenes,
            image_size,
            subject_size,
            expression_noise,
            pixel_noise,
            max_distractors,
        )
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.split = split
        self.size = size
        self.seed = seed
        self.bias = 0.0 if split == "test_unbiased" else float(bias)
        self.num_classes = num_classes
        self.num_scenes = num_scenes
        self.image_size = image_size
        self.subject_size = subject_size
        self.expression_noise = expression_noise
        self.pixel_noise = pixel_noise
        self.max_distractors = max_distractors
        self.flip = flip
        self.mask_subject = mask_subject
        self._split_id = SPLITS.index(split)
        self._grid = np.arange(image_size, dtype=np.float32) + 0.5
        self._inv_std = 1.0 / np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
        self._noise: np.ndarray | None = None  # built on first use, in each worker

    def __len__(self) -> int:
        return self.size

    def sample_identities(self) -> list[str]:
        """One stable name per sample (the generator settings, split and index), for dictionary fingerprints."""
        settings = (
            f"synthetic(seed={self.seed},bias={self.bias},classes={self.num_classes},scenes={self.num_scenes},"
            f"size={self.image_size}/{self.subject_size},noise={self.expression_noise}/{self.pixel_noise},"
            f"distractors={self.max_distractors})"
        )
        return [f"{settings}:{self.split}:{i}" for i in range(self.size)]

    def sample_table(self) -> pd.DataFrame:
        """One row per sample, in index order: ``index``, ``split`` and the ``scene`` type.

        The identity columns of the predictions CSV (``ccim_lightning.callbacks.PredictionWriter``). Nothing is
        rendered: the scene is the first draw of each sample's generator (see ``_generate``).
        """
        scenes = [
            int(np.random.default_rng([self.seed, self._split_id, i]).integers(self.num_scenes))
            for i in range(self.size)
        ]
        return pd.DataFrame({"index": np.arange(self.size), "split": self.split, "scene": scenes})

    def dominant_emotion(self, scene: int) -> int:
        """The emotion that scene type ``scene`` is biased towards."""
        return scene % self.num_classes

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for the {self.split!r} split of size {self.size}")
        context, subject, (x1, y1, x2, y2), target, scene = self._generate(index, normalise=True)
        if self.mask_subject:
            context[:, y1:y2, x1:x2] = 0.0
        if self.flip and torch.rand(()) < 0.5:
            context = np.ascontiguousarray(context[:, :, ::-1])
            subject = np.ascontiguousarray(subject[:, :, ::-1])
            x1, x2 = self.image_size - x2, self.image_size - x1
        return {
            "subject": torch.from_numpy(subject),
            "context": torch.from_numpy(context),
            "target": torch.tensor(target, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "box": torch.tensor([x1, y1, x2, y2], dtype=torch.float32),
            "scene": torch.tensor(scene, dtype=torch.int64),
        }

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int], int, int]:
        """Renders sample ``index`` in [0, 1] RGB, without normalisation, masking or flipping (for viewing).

        Returns:
            ``(image, subject, box, target, scene)``: the full image (3, image_size, image_size) and the subject
            box rendered at (3, subject_size, subject_size), float32; the integer box (x1, y1, x2, y2), x2/y2
            exclusive; the emotion and the scene type.
        """
        image, subject, box, target, scene = self._generate(index, normalise=False)
        return np.clip(image, 0.0, 1.0), np.clip(subject, 0.0, 1.0), box, target, scene

    def _noise_bank(self) -> np.ndarray:
        if self._noise is None:
            side = _NOISE_BANK_SIDES * max(self.image_size, self.subject_size)
            rng = np.random.default_rng([self.seed, len(SPLITS)])
            self._noise = rng.standard_normal((3, side, side), dtype=np.float32)
        return self._noise

    def _generate(self, index: int, normalise: bool):
        rng = np.random.default_rng([self.seed, self._split_id, index])
        size = self.image_size
        # Labels first, always with the same draws, so that the bias changes the labels and faces and nothing else.
        scene = int(rng.integers(self.num_scenes))
        follow_scene = rng.random() < self.bias
        uniform_emotion = int(rng.integers(self.num_classes))
        target = self.dominant_emotion(scene) if follow_scene else uniform_emotion
        background = self._background_params(scene, rng)
        people = [
            self._person_params(int(rng.integers(self.num_classes)), rng, is_target=False)
            for _ in range(int(rng.integers(self.max_distractors + 1)))
        ]
        person = self._person_params(target, rng, is_target=True)
        people.append(person)  # the target person is drawn last, on top
        contrast, brightness = rng.uniform(0.85, 1.15), rng.uniform(-0.06, 0.06)
        noise_at = rng.integers(0, (_NOISE_BANK_SIDES - 1) * max(size, self.subject_size) + 1, size=4)

        x1 = max(int(math.floor(person["cx"] - person["w"] / 2)), 0)
        y1 = max(int(math.floor(person["top"])), 0)
        x2 = min(int(math.ceil(person["cx"] + person["w"] / 2)), size)
        y2 = min(int(math.ceil(person["top"] + person["h"])), size)
        n = self.subject_size
        sub_xs = (x1 + (np.arange(n, dtype=np.float32) + 0.5) * ((x2 - x1) / n)).astype(np.float32)
        sub_ys = (y1 + (np.arange(n, dtype=np.float32) + 0.5) * ((y2 - y1) / n)).astype(np.float32)

        # canvas * contrast + offset (+ noise), then optionally (x - mean) / std, as one affine map per channel
        scale, offset = np.float32(contrast), np.float32(0.5 - 0.5 * contrast + brightness)
        noise_scale = np.float32(self.pixel_noise)
        if normalise:
            scale, offset = scale * self._inv_std, (offset - self._mean) * self._inv_std
            noise_scale = noise_scale * self._inv_std
        bank = self._noise_bank()
        images = []
        for (xs, ys), (oy, ox) in zip(((self._grid, self._grid), (sub_xs, sub_ys)), (noise_at[:2], noise_at[2:])):
            canvas = self._render(background, people, xs, ys)
            canvas *= scale
            canvas += offset
            canvas += noise_scale * bank[:, oy : oy + len(ys), ox : ox + len(xs)]
            images.append(canvas)
        return images[0], images[1], (x1, y1, x2, y2), target, scene

    def _background_params(self, scene: int, rng: np.random.Generator) -> dict:
        size = self.image_size
        hue = scene / self.num_scenes + 0.05 + rng.normal(0.0, 0.015)
        variant = scene // len(TEXTURES)
        return {
            "kind": scene % len(TEXTURES),
            "c1": _hsv(hue, 0.55 + rng.uniform(-0.1, 0.1), 0.9 + rng.uniform(-0.1, 0.08)),
            "c2": _hsv(hue + 0.07, 0.75 + rng.uniform(-0.1, 0.1), 0.45 + rng.uniform(-0.1, 0.1)),
            # angular frequency per image pixel, orientation, phases, horizon height
            "freq": 2.0 * math.pi * (4.0 + 1.5 * (variant % 3)) * rng.uniform(0.8, 1.25) / size,
            "angle": 2.39996 * scene + rng.uniform(-0.3, 0.3),
            "phase": rng.uniform(0.0, 2.0 * math.pi, size=2).tolist(),
            "horizon": rng.uniform(0.35, 0.65) * size,
        }

    def _person_params(self, emotion: int, rng: np.random.Generator, is_target: bool) -> dict:
        size = self.image_size
        if is_target:  # the whole box inside the image
            h = rng.uniform(0.42, 0.7) * size
            cx = rng.uniform(h / 4, size - h / 4)
            top = rng.uniform(0.0, size - h)
        else:
            h = rng.uniform(0.3, 0.6) * size
            cx = rng.uniform(0.0, size)
            top = rng.uniform(-0.2 * h, size - 0.6 * h)
        skin = _SKIN_LIGHT + rng.uniform() * (_SKIN_DARK - _SKIN_LIGHT) + rng.normal(0.0, 0.03, size=3)
        return {
            "cx": cx,
            "top": top,
            "h": h,
            "w": 0.5 * h,
            "skin": np.clip(skin, 0.0, 1.0).astype(np.float32),
            "cloth": _hsv(rng.uniform(), rng.uniform(0.2, 0.9), rng.uniform(0.25, 0.95)),
            "ink": np.full(3, rng.uniform(0.0, 0.2), dtype=np.float32),
            "face": (_EXPRESSIONS[emotion] + rng.normal(0.0, self.expression_noise, size=4)).tolist(),
        }

    def _render(self, background: dict, people: list[dict], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Renders the scene in [0, 1] RGB at pixel centres ``xs`` (W,), ``ys`` (H,) in image coordinates."""
        step = max(float(xs[-1] - xs[0]) / max(len(xs) - 1, 1), float(ys[-1] - ys[0]) / max(len(ys) - 1, 1), 1e-3)
        x, y = xs[None, :], ys[:, None]
        b = background
        kind, f, (p1, p2) = b["kind"], b["freq"], b["phase"]
        if kind == 0:  # stripes
            t = 0.5 + 0.5 * np.sin((x * math.cos(b["angle"]) + p1) * f + y * (math.sin(b["angle"]) * f))
        elif kind == 1:  # checkerboard
            t = 0.5 + 0.5 * np.tanh(6.0 * np.sin(f * x + p1) * np.sin(f * y + p2))
        elif kind == 2:  # dots on a lattice
            period = 2.0 * math.pi / f
            du = (x / period + p1 / (2.0 * math.pi)) % 1.0 - 0.5
            dv = (y / period + p2 / (2.0 * math.pi)) % 1.0 - 0.5
            t = np.clip(0.5 - (np.hypot(du, dv) - 0.28) * (period / step), 0.0, 1.0)
        else:  # horizon: a sky gradient over the ground
            t = 1.0 / (1.0 + np.exp((b["horizon"] - y) / (1.5 * step))) + 0.3 * y / self.image_size
        c1, c2 = b["c1"][:, None, None], b["c2"][:, None, None]
        canvas = np.empty((3, len(ys), len(xs)), dtype=np.float32)
        canvas[...] = c1 + t.astype(np.float32) * (c2 - c1)
        for person in people:
            _draw_person(canvas, person, xs, ys, step)
        return canvas


def _draw_person(canvas: np.ndarray, p: dict, xs: np.ndarray, ys: np.ndarray, step: float) -> None:
    """Draws a person (rounded body, round head, face) into ``canvas`` sampled at ``xs``, ``ys``."""
    cx, top, h = p["cx"], p["top"], p["h"]
    # body: a rounded rectangle under the head
    half_w, half_h, round_r, body_y = 0.25 * h, 0.3 * h, 0.1 * h, top + 0.7 * h
    cols, rows = _window(xs, cx - half_w - step, cx + half_w + step), _window(ys, top + 0.35 * h, top + h + step)
    if cols.start < cols.stop and rows.start < rows.stop:
        qx = np.abs(xs[None, cols] - cx) - (half_w - round_r)
        qy = np.abs(ys[rows, None] - body_y) - (half_h - round_r)
        sd = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0)) + np.minimum(np.maximum(qx, qy), 0.0) - round_r
        _paint(canvas[:, rows, cols], sd, p["cloth"], step)
    # head, then the face inside it
    r = 0.22 * h
    hy = top + r + 0.01 * h
    cols, rows = _window(xs, cx - r - step, cx + r + step), _window(ys, hy - r - step, hy + r + step)
    if cols.start >= cols.stop or rows.start >= rows.stop:
        return
    view = canvas[:, rows, cols]
    x, y = xs[None, cols] - cx, ys[rows, None] - hy
    _paint(view, np.hypot(x, y) - r, p["skin"], step)
    curve, opening, tilt, lift = p["face"]
    ax = np.abs(x)  # the face is mirror-symmetric
    eyes = np.hypot(ax - 0.38 * r, y + 0.08 * r) - 0.13 * r
    # brows: capsules centred at (+-0.4 r, brow_y) whose inner ends go down when tilt > 0
    brow_y = -0.45 * r - 0.15 * r * lift
    dx, dy = 0.22 * r * math.cos(0.5 * tilt), 0.22 * r * math.sin(0.5 * tilt)
    bx0, by0, length2 = 0.4 * r - dx, brow_y + dy, 4.0 * (dx * dx + dy * dy)
    t = np.clip((ax - bx0) * (2.0 * dx / length2) - (y - by0) * (2.0 * dy / length2), 0.0, 1.0)
    brows = np.hypot(ax - bx0 - t * (2.0 * dx), y - by0 + t * (2.0 * dy)) - 0.07 * r
    # mouth: a parabola whose corners rise by 0.22 r * curve, thickened by the opening
    mouth_w, rise = 0.4 * r, 0.22 * r * curve
    u = np.clip(x, -mouth_w, mouth_w)
    mouth_y = 0.45 * r - rise * (u / mouth_w) ** 2
    slope = 2.0 * rise * u / (mouth_w * mouth_w)
    mouth = np.hypot(x - u, (y - mouth_y) / np.sqrt(1.0 + slope * slope)) - (0.07 + 0.14 * max(opening, 0.0)) * r
    _paint(view, np.minimum(np.minimum(eyes, brows), mouth), p["ink"], step)


def _check_settings(
    seed: int,
    bias: float,
    num_classes: int,
    num_scenes: int,
    image_size: int,
    subject_size: int,
    expression_noise: float,
    pixel_noise: float,
    max_distractors: int,
) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must be a probability in [0, 1], got {bias}")
    if not 2 <= num_classes <= len(EMOTIONS):
        raise ValueError(f"num_classes must be between 2 and {len(EMOTIONS)}, got {num_classes}")
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if subject_size < 4:
        raise ValueError(f"subject_size must be >= 4 pixels, got {subject_size}")
    if expression_noise < 0 or pixel_noise < 0:
        raise ValueError(
            f"noise levels must be >= 0, got expression_noise={expression_noise}, pixel_noise={pixel_noise}"
        )
    if max_distractors < 0:
        raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")


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
    """

    task = "multiclass"
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
        expression_noise: float = 0.3,
        pixel_noise: float = 0.06,
        max_distractors: int = 2,
        flip: bool = True,
    ) -> None:
        super().__init__()
        _check_settings(
            seed,
            bias,
            num_classes,
            num_scenes,
            image_size,
            subject_size,
            expression_noise,
            pixel_noise,
            max_distractors,
        )
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_names = list(EMOTIONS[:num_classes])
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_dataset: SyntheticContextDataset | None = None
        self.val_dataset: SyntheticContextDataset | None = None
        self.test_dataset: SyntheticContextDataset | None = None
        self.test_unbiased_dataset: SyntheticContextDataset | None = None

    def _dataset(self, split: str, flip: bool = False, mask_subject: bool = True) -> SyntheticContextDataset:
        hp = self.hparams
        size = {"train": hp.train_size, "val": hp.val_size}.get(split, hp.test_size)
        return SyntheticContextDataset(
            split,
            size,
            seed=hp.seed,
            bias=hp.bias,
            num_classes=hp.num_classes,
            num_scenes=hp.num_scenes,
            image_size=hp.image_size,
            subject_size=hp.subject_size,
            expression_noise=hp.expression_noise,
            pixel_noise=hp.pixel_noise,
            max_distractors=hp.max_distractors,
            flip=flip,
            mask_subject=mask_subject,
        )

    def setup(self, stage: str | None = None) -> None:
        """Creates all four splits (cheap: samples are rendered when indexed)."""
        if self.train_dataset is None:
            self.train_dataset = self._dataset("train", flip=self.hparams.flip)
            self.val_dataset = self._dataset("val")
            self.test_dataset = self._dataset("test")
            self.test_unbiased_dataset = self._dataset("test_unbiased")

    def _loader(self, dataset: Dataset | None, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("SyntheticContextDataModule: call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> list[DataLoader]:
        """The biased and the unbiased test sets, in the order of ``test_set_names``."""
        return [self._loader(self.test_dataset), self._loader(self.test_unbiased_dataset)]

    def predict_dataloader(self) -> DataLoader:
        """The unbiased test set."""
        return self._loader(self.test_unbiased_dataset)

    def dictionary_dataset(self, mask_subject: bool = True) -> SyntheticContextDataset:
        """The training split in its fixed order, without augmentation, for building the confounder dictionary.

        Args:
            mask_subject: Fill the subject box of ``context`` with zeros (the paper's setting); ``False`` gives
                the "without masking" ablation.
        """
        return self._dataset("train", flip=False, mask_subject=mask_subject)

    def dictionary_dataloader(self, batch_size: int | None = None, mask_subject: bool = True) -> DataLoader:
        """A non-shuffled loader over ``dictionary_dataset(mask_subject)``; wrap the dataset yourself for a sampler.

        Args:
            batch_size: Defaults to the datamodule's batch size.
            mask_subject: See ``dictionary_dataset``.
        """
        return self._loader(self.dictionary_dataset(mask_subject), batch_size=batch_size)
