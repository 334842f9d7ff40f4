"""Physics-IQ style scores on frames whose masks are known."""

from __future__ import annotations

import numpy as np
import pytest

from model.toyworld import generate_video
from model.toyworld.score import centroids, colour_masks, mean_scores, score


def test_identical_frames_score_perfectly() -> None:
    v = generate_video(3, 1)
    colours = [o.colour for o in v.spec.objects]
    s = score(v.frames, v.frames, colours)
    assert s.as_row() == [1.0, 1.0, 1.0, 0.0]


def test_colour_masks_recover_the_rendered_masks() -> None:
    v = generate_video(11, 1)
    colours = [o.colour for o in v.spec.objects]
    assert np.array_equal(colour_masks(v.frames, colours), v.masks)


def test_shifted_objects_lose_iou_and_gain_error() -> None:
    v = generate_video(5, 1)
    colours = [o.colour for o in v.spec.objects]
    shifted = np.roll(v.frames, 6, axis=2)  # everything 6 px to the right
    s = score(shifted, v.frames, colours)
    assert s.spatiotemporal_iou < 0.9 and s.mse > 0
    blank = np.broadcast_to(v.frames[:, :1, :1], v.frames.shape).copy()  # background only
    empty = score(blank, v.frames, colours)
    assert empty.spatial_iou == 0.0 and empty.weighted_spatial_iou == 0.0
    assert mean_scores([s, empty]).mse == pytest.approx((s.mse + empty.mse) / 2)


def test_centroids_follow_the_simulated_positions() -> None:
    v = generate_video(7, 1)
    obj = v.spec.objects[0]
    c = centroids(v.frames, obj.colour)
    visible = ~np.isnan(c[:, 0])
    err = np.abs(c[visible] - v.positions[visible, 0])
    assert np.median(err) < 1.0
