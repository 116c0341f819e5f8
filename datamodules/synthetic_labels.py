"""Label and scene models of the synthetic generator's tasks shaped like EMOTIC, and its continuous-context layout.

``datamodules/synthetic.py`` renders the images; this module decides, from a sample's uniforms and normals, what
the sample's labels and scene are, and paints the multilabel code onto the person. Pure numpy, no state.

**Multilabel (EMOTIC-shaped).** ``C`` categories (up to 26). A sample's *primary* category is drawn from a
long-tailed base frequency ``p_c`` proportional to ``1 / (c + 1)`` (category 0 the most frequent). It has 1 to 4
labels (``LABEL_COUNT_PROBABILITIES``); each further label is, with probability ``CO_OCCURRENCE``, a category of
the primary's group (``GROUP_SIZE`` consecutive categories, e.g. 0-2, 3-5: labels that go together), otherwise a
draw from the base frequency; a label drawn twice is kept once (so a few samples have fewer labels than drawn).
The label set's distribution is the same in every split and for every ``bias``.

*Bias* is a property of the scene given the labels: scene ``s`` belongs to category ``s % C`` (its dominant
category). With probability ``bias`` the scene is drawn uniformly among the scenes of the sample's primary
category (when it has any; categories ``>= num_scenes`` have none), otherwise uniformly among all scenes. The
scene-dependent label prior is then ``P(y_c = 1 | s) > P(y_c = 1)`` for the dominant category ``c = s % C`` and,
through co-occurrence, its group. ``bias = 0`` (the unbiased test set, and the oracle's training data) makes the
scene independent of the labels. The *oracle* is the same model trained on ``bias = 0`` data of the same size; it
is tested on the same two test sets. The metric is the macro mAP over the ``C`` categories
(``test_biased/mAP``, ``test_unbiased/mAP``), whose per-category AP does not depend on the label frequencies of
the other categories, so a model that learned ``P(y | scene)`` loses AP on the unbiased set.

**Continuous context.** Instead of one of ``num_scenes`` ids, a scene is a position ``t`` uniform on the circle
``[0, num_scenes)``; its style is the blend of scene types ``floor(t)`` and ``floor(t) + 1`` (modulo
``num_scenes``) with weight ``t - floor(t)``, and its hue moves continuously with ``t``. The reported ``scene``
(the confounder the labels follow) is the nearest scene type, ``round(t) % num_scenes``, so images near the middle
between two types look alike but can follow different emotions: k-means clusters of the images only approximate
it.
"""

from __future__ import annotations

import numpy as np

#: Probabilities of 1, 2, 3 and 4 labels per person (EMOTIC: most people have one to three).
LABEL_COUNT_PROBABILITIES: tuple[float, ...] = (0.45, 0.3, 0.15, 0.1)
#: Probability that a further label comes from the primary category's group rather than the base frequency.
CO_OCCURRENCE = 0.6
#: Size of the groups of co-occurring categories (consecutive category ids).
GROUP_SIZE = 3
#: Extra uniforms per sample for a multilabel draw: label count, then (kind, pick) per further label.
MULTILABEL_UNIFORMS = 1 + 2 * (len(LABEL_COUNT_PROBABILITIES) - 1)

# The label code painted on the person: a grid of cells in box fractions (x from, x to, y from, y to).
_CODE_REGION = (0.1, 0.9, 0.5, 0.95)
_CODE_COLUMNS = 6
_CODE_STRENGTH = 0.8  # how far a present label's cell is blended towards white


def base_frequencies(num_classes: int) -> np.ndarray:
    """The long-tailed primary-category distribution ``p_c`` proportional to ``1 / (c + 1)``, (C,) float64."""
    weights = 1.0 / np.arange(1, num_classes + 1)
    return weights / weights.sum()


def _from_distribution(u: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: uniforms in [0, 1) -> ids with the given probabilities."""
    cdf = np.cumsum(probabilities)
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(probabilities) - 1)


def multilabel_targets(primary_u: np.ndarray, extra_u: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Label sets from uniforms (see the module docstring).

    Args:
        primary_u: (n,) uniforms for the primary category.
        extra_u: (n, ``MULTILABEL_UNIFORMS``) uniforms: label count, then (kind, pick) per further label.
        num_classes: ``C``.

    Returns:
        ``(targets, primary)``: (n, C) float32 multi-hot and the (n,) int64 primary category.
    """
    n = len(primary_u)
    frequencies = base_frequencies(num_classes)
    primary = _from_distribution(primary_u, frequencies).astype(np.int64)
    targets = np.zeros((n, num_classes), np.float32)
    targets[np.arange(n), primary] = 1.0
    count = _from_distribution(extra_u[:, 0], np.asarray(LABEL_COUNT_PROBABILITIES)) + 1
    group_start = (primary // GROUP_SIZE) * GROUP_SIZE
    group_size = np.minimum(group_start + GROUP_SIZE, num_classes) - group_start
    for j in range(1, len(LABEL_COUNT_PROBABILITIES)):
        kind, pick = extra_u[:, 2 * j - 1], extra_u[:, 2 * j]
        from_group = group_start + np.minimum((pick * group_size).astype(np.int64), group_size - 1)
        label = np.where(kind < CO_OCCURRENCE, from_group, _from_distribution(pick, frequencies))
        wanted = count > j
        targets[np.flatnonzero(wanted), label[wanted]] = 1.0
    return targets, primary


def scenes_given_primary(
    scene_u: np.ndarray, follow_u: np.ndarray, primary: np.ndarray, bias: float, num_classes: int, num_scenes: int
) -> np.ndarray:
    """Scenes of multilabel samples: with probability ``bias`` one of the primary category's scenes.

    Scene ``s`` belongs to category ``s % num_classes``; a category without scenes (``>= num_scenes``), or a sample
    that does not follow, gets a uniform scene. Returns (n,) int64.
    """
    uniform = np.minimum((scene_u * num_scenes).astype(np.int64), num_scenes - 1)
    owned = -(-(num_scenes - primary) // num_classes)  # scenes s < num_scenes with s % C == primary (ceil division)
    owned = np.maximum(owned, 0)
    nth = np.minimum((scene_u * np.maximum(owned, 1)).astype(np.int64), np.maximum(owned, 1) - 1)
    follows = (follow_u < bias) & (owned > 0)
    return np.where(follows, primary + num_classes * nth, uniform)


def continuous_positions(scene_u: np.ndarray, num_scenes: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous scene positions ``t`` in [0, num_scenes) and the nearest scene type ``round(t) % num_scenes``."""
    positions = scene_u * num_scenes
    return positions, np.floor(positions + 0.5).astype(np.int64) % num_scenes


def paint_label_code(
    canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, boxes: np.ndarray, code: np.ndarray, num_classes: int
) -> None:
    """Blends each category's cell of the person's label code towards white, in place.

    The cells form a grid (``_CODE_COLUMNS`` wide) over the lower body of the target's box; cell ``c`` is
    ``code[:, c]`` in [0, 1] bright. Both renderings (context grid and subject crop) use this, through their
    sample positions in image coordinates.

    Args:
        canvas: (n, 3, H, W) float32 images in [0, 1] colour.
        xs: (n, W) and ``ys`` (n, H): sample positions of the canvas in image coordinates.
        ys: See ``xs``.
        boxes: (n, 4) target boxes x1, y1, x2, y2.
        code: (n, C) cell brightness (present labels near 1, absent near 0, with noise).
        num_classes: ``C``.
    """
    rows = -(-num_classes // _CODE_COLUMNS)
    x_from, x_to, y_from, y_to = _CODE_REGION
    sides = np.maximum(boxes[:, 2:] - boxes[:, :2], 1).astype(np.float32)
    fx = (xs - boxes[:, 0:1]) / sides[:, 0:1]  # (n, W) box fractions
    fy = (ys - boxes[:, 1:2]) / sides[:, 1:2]  # (n, H)
    column = np.floor((fx - x_from) / (x_to - x_from) * _CODE_COLUMNS).astype(np.int64)
    row = np.floor((fy - y_from) / (y_to - y_from) * rows).astype(np.int64)
    inside = ((column >= 0) & (column < _CODE_COLUMNS))[:, None, :] & ((row >= 0) & (row < rows))[:, :, None]
    cell = row[:, :, None] * _CODE_COLUMNS + column[:, None, :]
    inside &= cell < num_classes
    cell = np.where(inside, cell, 0)
    alpha = np.take_along_axis(code, cell.reshape(len(code), -1), axis=1).reshape(cell.shape)
    alpha = _CODE_STRENGTH * np.clip(alpha, 0.0, 1.0) * inside
    canvas += alpha[:, None].astype(np.float32) * (1.0 - canvas)
