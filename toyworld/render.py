"""Rasterise a simulated scene into RGB frames and per-object visibility masks.

Objects are painted in spec order (later on top). Without anti-aliasing every pixel is either
the background or exactly one palette colour, so the masks are exactly "the pixels of that
colour". With anti-aliasing, edge pixels blend and a mask holds the pixels an object covers
at least half of (and no later object does).
"""

from __future__ import annotations

import numpy as np

from .scenes import PALETTE, SceneSpec


def coverage(
    shape: str, half: float, centres: np.ndarray, size: int, antialias: bool = False
) -> np.ndarray:
    """Fraction of each pixel an object covers: (T, size, size) in [0, 1].

    Without anti-aliasing the coverage is bool (inside or not, judged at the pixel centre).

    centres: (T, 2) object centres (x, y) in px. Pixel (r, c) spans [c, c+1] x [r, r+1], so
    its centre is (c + 0.5, r + 0.5).
    """
    x = centres[:, 0, None, None]
    y = centres[:, 1, None, None]
    if shape == "box":
        if antialias:  # exact area: the overlap of two intervals, per axis
            edges = np.arange(size, dtype=np.float64)
            cx = np.clip(np.minimum(edges + 1, x + half) - np.maximum(edges, x - half), 0, 1)
            cy = np.clip(np.minimum(edges + 1, y + half) - np.maximum(edges, y - half), 0, 1)
            return cy.transpose(0, 2, 1) * cx
        c = np.arange(size, dtype=np.float64) + 0.5
        inside_x = np.abs(c[None, None, :] - x) <= half
        inside_y = np.abs(c[None, :, None] - y) <= half
        return inside_x & inside_y
    c = np.arange(size, dtype=np.float64) + 0.5
    dist = np.sqrt((c[None, None, :] - x) ** 2 + (c[None, :, None] - y) ** 2)
    if antialias:
        # signed-distance coverage: within 1/2 px of the rim ramps linearly; close to the exact
        # area for radii of a few px and far cheaper than supersampling
        return np.clip(half - dist + 0.5, 0.0, 1.0)
    return dist <= half


def render(
    spec: SceneSpec, positions: np.ndarray, antialias: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """frames uint8 (T, H, W, 3) and visible masks bool (T, N, H, W) for (T, N, 2) positions."""
    n_frames, n_obj = positions.shape[:2]
    size = spec.size
    # Paint object indices (0 = background) into one byte per pixel, then look colours up once:
    # far cheaper than writing 3-channel pixels object by object, and the visible masks fall
    # out as "index == object".
    index = np.zeros((n_frames, size, size), dtype=np.uint8)
    covers = []
    for i, obj in enumerate(spec.objects):
        cov = coverage(obj.shape, obj.half, positions[:, i], size, antialias)
        index[cov >= 0.5] = i + 1
        covers.append(cov)
    masks = index[:, None] == np.arange(1, n_obj + 1, dtype=np.uint8)[None, :, None, None]
    lut = np.array([spec.background] + [PALETTE[o.colour] for o in spec.objects], np.uint8)
    if not antialias:
        return np.take(lut, index, axis=0), masks
    canvas = np.take(lut.astype(np.float32), np.zeros_like(index), axis=0)
    for i, cov in enumerate(covers):
        touched = cov > 0.0  # objects cover a few % of the frame: blend only there
        alpha = cov[touched][:, None].astype(np.float32)
        canvas[touched] = canvas[touched] * (1.0 - alpha) + alpha * lut[i + 1]
    return np.rint(canvas).astype(np.uint8), masks
