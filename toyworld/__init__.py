"""toyworld: procedural synthetic-physics videos with chunk captions, masks and positions.

The training data of the `toy` world model; see docs/toyworld.md.
"""

from .physics import Contact, Trajectory, simulate
from .scenes import (
    CHUNK_FRAMES,
    FPS,
    PALETTE,
    Event,
    ObjectSpec,
    PhysicsSpec,
    SceneSpec,
    sample_scene,
)
from .video import ToyVideo, generate_dataset, generate_video, still_frame, video_from_spec

__all__ = [
    "CHUNK_FRAMES",
    "FPS",
    "PALETTE",
    "Contact",
    "Event",
    "ObjectSpec",
    "PhysicsSpec",
    "SceneSpec",
    "ToyVideo",
    "Trajectory",
    "generate_dataset",
    "generate_video",
    "sample_scene",
    "simulate",
    "still_frame",
    "video_from_spec",
]
