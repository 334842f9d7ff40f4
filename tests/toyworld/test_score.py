"""Physics-IQ style scores on frames whose masks are known."""

from __future__ import annotations

import numpy as np
import pytest

from toyworld import generate_video
from toyworld.score import (
    Scores,
    centroids,
    colour_masks,
    frame_ious,
    mean_scores,
    paired_difference,
    score,
)


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


def test_frame_ious_average_to_the_spatiotemporal_iou() -> None:
    v = generate_video(5, 1)
    colours = [o.colour for o in v.spec.objects]
    shifted = np.roll(v.frames, 3, axis=2)
    ious = frame_ious(shifted, v.frames, colours)
    assert ious.shape == (len(v.frames),)
    assert ious.mean() == pytest.approx(score(shifted, v.frames, colours).spatiotemporal_iou)
    assert np.all(frame_ious(v.frames, v.frames, colours) == 1.0)


def test_paired_difference_cancels_what_the_scenes_share() -> None:
    # scene difficulty varies a lot, the lead of a over b is a steady 0.1 +- 0.01
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, size=40)
    lead = 0.1 + rng.uniform(-0.01, 0.01, size=40)
    a = [Scores(x + d, x + d, x + d, 0.01) for x, d in zip(base, lead, strict=True)]
    b = [Scores(x, x, x, 0.02) for x in base]
    d = paired_difference(a, b)
    assert d.mean.spatial_iou == pytest.approx(lead.mean())
    assert d.mean.mse == pytest.approx(-0.01)
    expected = 1.96 * lead.std(ddof=1) / np.sqrt(40)
    assert d.half_width.spatial_iou == pytest.approx(expected)
    assert d.half_width.spatial_iou < 0.01  # far narrower than the spread between scenes
    assert d.half_width.mse == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference(a, b[:-1])
