"""Backgrounds of the synthetic generator: procedural scene types, or blends of them along a continuum.

A scene *position* ``t`` in [0, num_scenes) selects the style. An integer ``t`` is scene type ``t`` exactly as the
discrete generator draws it; a fractional ``t`` (``scene_layout="continuous"``) blends the texture of type
``floor(t)`` with that of the next type (weight ``t - floor(t)``), and hue and orientation move with ``t``.
"""

from __future__ import annotations

import numpy as np

from ccim_lightning.datamodules._drawing import hsv_to_rgb

TEXTURES: tuple[str, ...] = ("stripes", "checkerboard", "dots", "horizon")
"""Background textures; scene ``s`` uses ``TEXTURES[s % 4]``, its palette and geometry also depend on ``s``."""


def background_parameters(
    u: np.ndarray, hue_normal: np.ndarray, horizon_u: np.ndarray, positions: np.ndarray, num_scenes: int, size: int
) -> dict:
    """Per-sample background parameters.

    Args:
        u: (n, 8) uniforms: saturation 1/2, value 1/2, frequency, angle, phase x/y.
        hue_normal: (n,) standard normals for the hue jitter.
        horizon_u: (n,) uniforms for the horizon height.
        positions: (n,) scene positions in [0, num_scenes) (integers for discrete scenes).
        num_scenes: Number of scene types.
        size: Image side in pixels.
    """
    first = np.floor(positions).astype(np.int64) % num_scenes
    hue = positions / num_scenes + 0.05 + 0.015 * hue_normal
    variant = first // len(TEXTURES)
    params = {
        "c1": hsv_to_rgb(hue, 0.45 + 0.2 * u[:, 0], 0.8 + 0.18 * u[:, 2]),
        "c2": hsv_to_rgb(hue + 0.07, 0.65 + 0.2 * u[:, 1], 0.35 + 0.2 * u[:, 3]),
        # angular frequency per image pixel, orientation, phases, horizon height
        "freq": 2.0 * np.pi * (4.0 + 1.5 * (variant % 3)) * (0.8 + 0.45 * u[:, 4]) / size,
        "angle": 2.39996 * positions - 0.3 + 0.6 * u[:, 5],
        "phase": 2.0 * np.pi * u[:, 6:8],
        "horizon": (0.35 + 0.3 * horizon_u) * size,
        "blend": positions - np.floor(positions),
    }
    params = {key: value.astype(np.float32) for key, value in params.items()}
    params["kind"] = first % len(TEXTURES)
    params["next_kind"] = ((first + 1) % num_scenes) % len(TEXTURES)
    return params


def _texture(b: dict, kinds: np.ndarray, xs: np.ndarray, ys: np.ndarray, step: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) texture values in about [0, 1] of each sample's ``kinds`` texture."""
    t = np.empty((len(xs), ys.shape[1], xs.shape[1]), dtype=np.float32)
    for kind in range(len(TEXTURES)):
        sel = np.flatnonzero(kinds == kind)
        if len(sel) == 0:
            continue
        x, y = xs[sel, None, :], ys[sel, :, None]
        f, p1, p2 = (v[:, None, None] for v in (b["freq"][sel], b["phase"][sel, 0], b["phase"][sel, 1]))
        if kind == 0:  # stripes
            angle = b["angle"][sel, None, None]
            t[sel] = 0.5 + 0.5 * np.sin(f * (x * np.cos(angle) + y * np.sin(angle)) + p1)
        elif kind == 1:  # checkerboard
            t[sel] = 0.5 + 0.5 * np.tanh(6.0 * np.sin(f * x + p1) * np.sin(f * y + p2))
        elif kind == 2:  # dots on a lattice
            period = 2.0 * np.pi / f
            du = (x / period + p1 / (2.0 * np.pi)) % 1.0 - 0.5
            dv = (y / period + p2 / (2.0 * np.pi)) % 1.0 - 0.5
            t[sel] = np.clip(0.5 - (np.sqrt(du * du + dv * dv) - 0.28) * period / step[sel, None, None], 0, 1)
        else:  # horizon: a sky gradient over the ground
            soft = 1.5 * step[sel, None, None]
            t[sel] = 1.0 / (1.0 + np.exp((b["horizon"][sel, None, None] - y) / soft)) + 0.3 * y / size
    return t


def render_background(b: dict, xs: np.ndarray, ys: np.ndarray, step: np.ndarray, size: int) -> np.ndarray:
    """(n, 3, H, W) textured backgrounds sampled at ``xs`` (n, W), ``ys`` (n, H) in image coordinates."""
    t = _texture(b, b["kind"], xs, ys, step, size)
    blended = np.flatnonzero(b["blend"] > 0)  # discrete scenes never blend, so their pixels stay as they were
    if len(blended):
        w = b["blend"][blended, None, None]
        other = _texture(b, b["next_kind"], xs, ys, step, size)[blended]
        t[blended] = (1.0 - w) * t[blended] + w * other
    c1, c2 = b["c1"][:, :, None, None], b["c2"][:, :, None, None]
    return c1 + t[:, None] * (c2 - c1)
