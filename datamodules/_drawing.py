"""Drawing primitives of the synthetic data: face parameters, colours, signed distances, anti-aliased painting.

Plumbing of ``ccim_lightning.datamodules.synthetic`` (vectorised numpy over a batch of image windows).
"""

from __future__ import annotations

import numpy as np

# Face parameters per emotion: mouth curve (+ corners up), mouth opening, brow tilt (+ inner ends down), brow raise.
EXPRESSIONS = np.array(
    [
        [-0.3, 0.0, 1.0, -0.3],  # angry
        [1.0, 0.0, 0.0, 0.0],  # happy
        [0.0, 0.0, 0.0, 0.0],  # neutral
        [-1.0, 0.0, -1.0, 0.3],  # sad
        [0.0, 1.0, 0.0, 1.0],  # surprise
        [-0.5, 0.6, -1.0, 0.6],  # fear
        [-0.6, 0.0, 0.6, -0.8],  # disgust
    ],
    dtype=np.float32,
)

SKIN_LIGHT = np.array([0.96, 0.82, 0.70], dtype=np.float32)
SKIN_DARK = np.array([0.36, 0.23, 0.16], dtype=np.float32)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; (n,) arrays in [0, 1] (hue wraps) -> (n, 3) float32."""
    h6 = (h % 1.0) * 6.0
    s, v = np.clip(s, 0.0, 1.0), np.clip(v, 0.0, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + h6[:, None]) % 6.0
    rgb = v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb.astype(np.float32)


def choice(u: np.ndarray, k: int) -> np.ndarray:
    """Maps uniforms in [0, 1) to integers uniform in [0, k)."""
    return np.minimum((u * k).astype(np.int64), k - 1)


def paint(view: np.ndarray, sd: np.ndarray, colour: np.ndarray, step: np.ndarray) -> None:
    """Alpha-blends flat colours into ``view`` (b, 3, h, w) in place where the signed distance ``sd`` < 0.

    Args:
        view: Canvas windows, modified in place.
        sd: (b, h, w) signed distances in image pixels, negative inside the shape.
        colour: (b, 3) colour per window.
        step: (b, 1, 1) sample spacing in image pixels; edges are anti-aliased over one sample.
    """
    alpha = np.clip(0.5 - sd / step, 0.0, 1.0)[:, None]
    view -= alpha * (view - colour[:, :, None, None])


def box_distance(x: np.ndarray, y: np.ndarray, half_w: np.ndarray, half_h: np.ndarray, radius: np.ndarray):
    """Signed distance to a rounded rectangle centred at the origin (broadcasting (b, 1, w) x (b, h, 1))."""
    qx, qy = np.abs(x) - (half_w - radius), np.abs(y) - (half_h - radius)
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - radius


def composite_person(view: np.ndarray, x: np.ndarray, y: np.ndarray, step: np.ndarray, p: dict) -> None:
    """Draws one person per window: rounded body, round head and a face.

    Args:
        view: (b, 3, h, w) canvas windows, modified in place.
        x: (b, 1, w) image x coordinate of each window column, relative to the person's centre line.
        y: (b, h, 1) image y coordinate of each window row, relative to the person's top.
        step: (b, 1, 1) sample spacing in image pixels.
        p: Person parameters, each (b,) or (b, k): ``h``, ``skin``, ``cloth``, ``ink``, ``face``.
    """
    h = p["h"][:, None, None]
    paint(view, box_distance(x, y - 0.7 * h, 0.25 * h, 0.3 * h, 0.1 * h), p["cloth"], step)
    r = 0.22 * h
    y = y - (r + 0.01 * h)  # relative to the head's centre
    paint(view, np.sqrt(x * x + y * y) - r, p["skin"], step)

    curve, opening, tilt, lift = (p["face"][:, k, None, None] for k in range(4))
    ax = np.abs(x)  # the face is mirror-symmetric
    features = np.sqrt((ax - 0.38 * r) ** 2 + (y + 0.08 * r) ** 2) - 0.13 * r  # eyes
    # brows: bars centred at (+-0.4 r, brow_y), rotated so that their inner ends go down when tilt > 0
    angle = 0.5 * tilt
    brow_y = -0.45 * r - 0.15 * r * lift
    across = np.abs(y - (brow_y - np.tan(angle) * (ax - 0.4 * r))) * np.cos(angle) - 0.07 * r
    brows = np.maximum(across, np.abs(ax - 0.4 * r) - 0.22 * r * np.cos(angle))
    # mouth: a parabola whose corners rise by 0.22 r * curve, thickened by the opening
    mouth_w, rise = 0.4 * r, 0.22 * r * curve
    u = np.clip(x, -mouth_w, mouth_w)
    below = (y - (0.45 * r - rise * (u / mouth_w) ** 2)) / np.sqrt(1.0 + (2.0 * rise * u / (mouth_w * mouth_w)) ** 2)
    mouth = np.sqrt((x - u) ** 2 + below**2) - (0.07 + 0.14 * np.maximum(opening, 0.0)) * r
    paint(view, np.minimum(np.minimum(features, brows), mouth), np.repeat(p["ink"][:, None], 3, axis=1), step)
