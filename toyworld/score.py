"""Physics-IQ style scores of a generated continuation against the ground truth.

Masks come from segmenting frames by colour: a pixel belongs to an object when its colour is
within `COLOUR_RADIUS` of one of the scene's object colours (the background and every other
colour are far away: see `PALETTE`). The four scores, over the frames being compared:

- spatial IoU: IoU of "where an object was at any time" (the union of the masks over time);
- spatiotemporal IoU: the per-frame IoU, averaged over the frames (a frame where neither has
  an object counts 1);
- weighted spatial IoU: per pixel, the number of frames it is covered; sum(min) / sum(max);
- MSE: mean squared pixel error, pixels scaled to [0, 1].

Two modes scored on the same scenes compare scene by scene (`paired_difference`): the spread
between scenes is much larger than the difference between modes, and pairing cancels it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import PALETTE

COLOUR_RADIUS = 60.0  # RGB distance; palette colours are >= 80 apart, >= 160 from the background


@dataclass(frozen=True)
class Scores:
    spatial_iou: float
    spatiotemporal_iou: float
    weighted_spatial_iou: float
    mse: float

    def as_row(self) -> list[float]:
        return [self.spatial_iou, self.spatiotemporal_iou, self.weighted_spatial_iou, self.mse]


def colour_masks(frames: np.ndarray, colours: list[str]) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, N, H, W) bool: pixels within COLOUR_RADIUS of object n's
    colour."""
    pixels = frames.astype(np.float32)
    masks = []
    for name in colours:
        target = np.asarray(PALETTE[name], dtype=np.float32)
        masks.append(np.linalg.norm(pixels - target, axis=-1) < COLOUR_RADIUS)
    return np.stack(masks, axis=1)


def centroids(frames: np.ndarray, colour: str) -> np.ndarray:
    """(T, 2) (x, y) centre of the pixels of one colour per frame; NaN where none is seen."""
    mask = colour_masks(frames, [colour])[:, 0]
    out = np.full((len(frames), 2), np.nan)
    for t, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(xs):
            out[t] = (xs.mean(), ys.mean())
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _object_masks(
    generated: np.ndarray, truth: np.ndarray, colours: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) "any object here" masks of both; they must be (T, H, W, 3) uint8 alike."""
    if generated.shape != truth.shape:
        raise ValueError(f"shapes differ: {generated.shape} vs {truth.shape}")
    return colour_masks(generated, colours).any(axis=1), colour_masks(truth, colours).any(axis=1)


def frame_ious(generated: np.ndarray, truth: np.ndarray, colours: list[str]) -> np.ndarray:
    """(T,) per-frame IoU of the object masks: how the spatiotemporal IoU builds up over time."""
    return _frame_ious(*_object_masks(generated, truth, colours))


def _frame_ious(gen: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.array([_iou(g, r) for g, r in zip(gen, ref, strict=True)])


def score(generated: np.ndarray, truth: np.ndarray, colours: list[str]) -> Scores:
    """Both (T, H, W, 3) uint8 over the same frames."""
    gen, ref = _object_masks(generated, truth, colours)
    gen_count, ref_count = gen.sum(axis=0), ref.sum(axis=0)
    most = np.maximum(gen_count, ref_count).sum()
    weighted = 1.0 if most == 0 else float(np.minimum(gen_count, ref_count).sum() / most)
    diff = generated.astype(np.float32) / 255 - truth.astype(np.float32) / 255
    return Scores(
        spatial_iou=_iou(gen.any(axis=0), ref.any(axis=0)),
        spatiotemporal_iou=float(_frame_ious(gen, ref).mean()),
        weighted_spatial_iou=weighted,
        mse=float(np.mean(diff**2)),
    )


def mean_scores(rows: list[Scores]) -> Scores:
    values = np.mean([r.as_row() for r in rows], axis=0)
    return Scores(*(float(v) for v in values))


@dataclass(frozen=True)
class Difference:
    """Mean per-scene difference a - b of two modes, with its 95 % confidence half-width."""

    mean: Scores
    half_width: Scores


def paired_difference(a: list[Scores], b: list[Scores]) -> Difference:
    """a - b scene by scene (the same scenes, in the same order); the half-width is 1.96
    standard errors of the mean difference (normal approximation: use 30 scenes or more)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equally long lists of 2+ scenes, got {len(a)} and {len(b)}")
    diff = np.array([x.as_row() for x in a]) - np.array([y.as_row() for y in b])
    half = 1.96 * diff.std(axis=0, ddof=1) / np.sqrt(len(diff))
    return Difference(
        Scores(*(float(v) for v in diff.mean(axis=0))), Scores(*(float(v) for v in half))
    )
