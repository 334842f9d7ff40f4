"""ToyVideo: frames, masks, positions and chunk captions of one generated scene."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .captions import chunk_captions
from .physics import Contact, simulate
from .render import render
from .scenes import CHUNK_FRAMES, FPS, ObjectSpec, PhysicsSpec, SceneSpec, sample_scene


@dataclass(frozen=True, eq=False)
class ToyVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, T = 24 * num_chunks
    masks: np.ndarray  # (T, N, H, W) bool: pixels where object n is visible
    positions: np.ndarray  # (T, N, 2) float64 object centres (x, y), px, y down
    velocities: np.ndarray  # (T, N, 2) float64, px/s
    captions: tuple[str, ...]  # one per chunk of CHUNK_FRAMES frames
    spec: SceneSpec
    contacts: tuple[Contact, ...] = ()
    fps: int = FPS

    @property
    def union_mask(self) -> np.ndarray:
        """(T, H, W) bool: any object (the Physics-IQ style "moving object" mask)."""
        return self.masks.any(axis=1)

    @property
    def num_chunks(self) -> int:
        return len(self.captions)

    def chunk(self, k: int) -> slice:
        """Frame slice of chunk k: video.frames[video.chunk(k)] with video.captions[k]."""
        return slice(k * CHUNK_FRAMES, (k + 1) * CHUNK_FRAMES)


def video_from_spec(spec: SceneSpec, antialias: bool = False) -> ToyVideo:
    traj = simulate(spec)
    frames, masks = render(spec, traj.positions, antialias)
    captions = chunk_captions(spec, traj)
    return ToyVideo(frames, masks, traj.positions, traj.velocities, captions, spec, traj.contacts)


def generate_video(seed: int, num_chunks: int, size: int = 64, antialias: bool = False) -> ToyVideo:
    """Deterministic: the same (seed, num_chunks, size, antialias) gives identical arrays."""
    return video_from_spec(sample_scene(seed, num_chunks, size), antialias)


def still_frame(thing: ObjectSpec, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: one object at rest in mid-air (no gravity) on the background, the
    start image of an i2v session."""
    spec = SceneSpec(size, 1, (thing,), PhysicsSpec(gravity=False))
    return video_from_spec(spec).frames[0]


def generate_dataset(
    seeds: range | list[int], num_chunks: int, size: int = 64, antialias: bool = False
) -> Iterator[ToyVideo]:
    for seed in seeds:
        yield generate_video(seed, num_chunks, size, antialias)
