"""generate_video: determinism, shapes, masks vs rendered colours, the sampler over many seeds."""

from __future__ import annotations

import time

import numpy as np
import pytest

from toyworld import (
    CHUNK_FRAMES,
    PALETTE,
    ObjectSpec,
    PhysicsSpec,
    SceneSpec,
    generate_dataset,
    generate_video,
    sample_scene,
    video_from_spec,
)

SEEDS = range(60)


def test_same_seed_gives_identical_video() -> None:
    for seed in (0, 7, 123):
        a, b = generate_video(seed, 3), generate_video(seed, 3)
        assert a.spec == b.spec
        assert np.array_equal(a.frames, b.frames)
        assert np.array_equal(a.masks, b.masks)
        assert np.array_equal(a.positions, b.positions)
        assert a.captions == b.captions
    assert not np.array_equal(generate_video(1, 2).frames, generate_video(2, 2).frames)


@pytest.mark.parametrize("chunks, size", [(1, 64), (2, 64), (3, 96)])
def test_shapes_and_frame_count(chunks: int, size: int) -> None:
    v = generate_video(5, chunks, size)
    n = len(v.spec.objects)
    t = CHUNK_FRAMES * chunks
    assert v.frames.shape == (t, size, size, 3) and v.frames.dtype == np.uint8
    assert v.masks.shape == (t, n, size, size) and v.masks.dtype == bool
    assert v.positions.shape == (t, n, 2) and v.positions.dtype == np.float64
    assert v.union_mask.shape == (t, size, size)
    assert len(v.captions) == chunks == v.num_chunks
    assert v.frames[v.chunk(chunks - 1)].shape[0] == CHUNK_FRAMES


def test_masks_are_exactly_the_pixels_of_each_colour() -> None:
    for seed in SEEDS:
        v = generate_video(seed, 2)
        for i, obj in enumerate(v.spec.objects):
            colour_px = np.all(v.frames == np.array(PALETTE[obj.colour], np.uint8), axis=-1)
            assert np.array_equal(colour_px, v.masks[:, i]), (seed, i)
        background = np.all(v.frames == np.array(v.spec.background, np.uint8), axis=-1)
        assert np.array_equal(background, ~v.union_mask), seed
        assert v.masks.sum(axis=1).max() <= 1  # visible masks never overlap


def test_masks_follow_positions() -> None:
    ball = ObjectSpec("ball", "red", 12.0, (20.0, 10.0), (15.0, 0.0))
    box = ObjectSpec("box", "blue", 10.0, (50.0, 30.0), (-20.0, 10.0))
    v = video_from_spec(SceneSpec(64, 2, (ball, box), PhysicsSpec(True, 320.0, 0.8)))
    for i, obj in enumerate(v.spec.objects):
        area = v.masks[:, i].sum(axis=(1, 2))
        expected = np.pi * obj.half**2 if obj.shape == "ball" else obj.size**2
        assert np.all(np.abs(area - expected) < 0.25 * expected)
        rows, cols = np.indices(v.masks.shape[2:])
        for f in range(0, v.masks.shape[0], 7):
            m = v.masks[f, i]
            centroid = np.array([(cols[m] + 0.5).mean(), (rows[m] + 0.5).mean()])
            assert np.allclose(centroid, v.positions[f, i], atol=1.0), (i, f)


def test_antialiased_frames_keep_masks_and_soften_edges() -> None:
    sharp, soft = generate_video(3, 1), generate_video(3, 1, antialias=True)
    inter = (sharp.masks & soft.masks).sum()
    union = (sharp.masks | soft.masks).sum()
    assert inter / union > 0.85
    assert len(np.unique(soft.frames.reshape(-1, 3), axis=0)) > len(soft.spec.objects) + 1


def test_sampler_scenes_are_valid_and_varied() -> None:
    kinds, events, counts = set(), 0, set()
    for seed in SEEDS:
        spec = sample_scene(seed, 3)
        v = video_from_spec(spec)
        half = np.array([o.half for o in spec.objects])[None, :, None]
        assert np.all(v.positions >= half - 1e-9) and np.all(v.positions <= 64 - half + 1e-9)
        assert all(c and c[0] in "a" for c in v.captions)
        kinds |= {o.shape for o in spec.objects}
        counts.add(len(spec.objects))
        events += bool(spec.events)
    assert kinds == {"ball", "box"} and counts == {1, 2, 3}
    assert 0.3 * len(SEEDS) < events < len(SEEDS)


def test_200_scenes_generate_in_a_few_seconds() -> None:
    start = time.perf_counter()
    videos = list(generate_dataset(range(200), num_chunks=2))
    elapsed = time.perf_counter() - start
    assert len(videos) == 200
    # about 1 s on an idle core; generous for a shared 2-core machine
    assert elapsed < 10.0, f"200 scenes took {elapsed:.1f} s"
