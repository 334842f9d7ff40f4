"""Scene specifications for toyworld videos, and a seeded sampler of them.

Coordinates are pixels of the rendered frame: x to the right, y DOWN (image order), the origin
at the top-left corner, positions are object centres. Velocities are px/s, accelerations
px/s^2. A spec fully determines a video (simulate + render + caption), so held-out scenes can
be stored as seeds or as specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

FPS = 24  # the service's output rate; the VAE's temporal tile is one second
CHUNK_FRAMES = 24  # frames per chunk: chunk_width 6 latent frames x temporal factor 4

Shape = Literal["ball", "box"]
EventKind = Literal["push", "gravity_on", "gravity_off"]

# Saturated, mutually distant colours, all far from the background: masks are recovered by
# exact colour match (no anti-aliasing) and stay separable after lossy video coding.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "cyan": (40, 210, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (40, 40, 48)


@dataclass(frozen=True)
class ObjectSpec:
    shape: Shape
    colour: str  # a PALETTE key
    size: float  # ball diameter or box side, px
    position: tuple[float, float]  # centre (x, y), px
    velocity: tuple[float, float] = (0.0, 0.0)  # px/s

    def __post_init__(self) -> None:
        if self.shape not in ("ball", "box"):
            raise ValueError(f"shape must be ball or box, got {self.shape!r}")
        if self.colour not in PALETTE:
            raise ValueError(f"colour must be one of {sorted(PALETTE)}, got {self.colour!r}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")

    @property
    def half(self) -> float:
        """Radius of a ball, half side of a box: the distance from centre to a wall contact."""
        return self.size / 2


@dataclass(frozen=True)
class PhysicsSpec:
    gravity: bool = True  # at frame 0; events may switch it
    gravity_accel: float = 320.0  # px/s^2, downwards
    restitution: float = 0.8  # walls and floor; object-object collisions are always elastic
    walls: bool = True  # left, right and ceiling
    floor: bool = True  # the bottom edge of the frame

    def __post_init__(self) -> None:
        if not 0.0 <= self.restitution <= 1.0:
            raise ValueError(f"restitution must be in [0, 1], got {self.restitution}")


@dataclass(frozen=True)
class Event:
    """Something that happens just before the first frame of `chunk`.

    Events sit on chunk boundaries so that a chunk's caption can describe one regime of motion;
    the caption changes exactly where the motion does.
    """

    chunk: int
    kind: EventKind
    obj: int = -1  # the pushed object (push only)
    delta_v: tuple[float, float] = (0.0, 0.0)  # added velocity, px/s (push only)


@dataclass(frozen=True)
class SceneSpec:
    size: int  # square frame side, px; a multiple of 8 suits the VAE's spatial compression
    num_chunks: int
    objects: tuple[ObjectSpec, ...]
    physics: PhysicsSpec = PhysicsSpec()
    events: tuple[Event, ...] = ()
    background: tuple[int, int, int] = BACKGROUND
    seed: int | None = None  # the sampler's seed, for provenance only

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= len(PALETTE):
            raise ValueError(f"need 1..{len(PALETTE)} objects, got {len(self.objects)}")
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            # masks by colour and unambiguous captions both need one colour per object
            raise ValueError(f"object colours must be distinct, got {colours}")
        if self.num_chunks < 1 or self.size < 8:
            raise ValueError("need num_chunks >= 1 and size >= 8")
        for e in self.events:
            if not 0 <= e.chunk < self.num_chunks:
                raise ValueError(f"event chunk {e.chunk} outside 0..{self.num_chunks - 1}")
            if e.kind == "push" and not 0 <= e.obj < len(self.objects):
                raise ValueError(f"push event names object {e.obj}")

    @property
    def num_frames(self) -> int:
        return self.num_chunks * CHUNK_FRAMES


# --------------------------------------------------------------------------------------------
# Sampler. All quantities scale with the frame size so a 96x96 scene looks like a 64x64 one.

SCENARIOS = ("drop", "floor", "drift", "collide", "gravity_switch")
_Built = tuple[tuple[ObjectSpec, ...], PhysicsSpec, tuple[Event, ...]]  # a scenario's output
GRAVITY_PER_SIZE = 5.0  # g = 5 * size px/s^2: a drop from the top lands in about 0.6 s


def sample_scene(seed: int, num_chunks: int, size: int = 64) -> SceneSpec:
    """A random but reproducible scene: same (seed, num_chunks, size) -> same spec."""
    rng = np.random.default_rng(seed)
    scenario = SCENARIOS[int(rng.integers(len(SCENARIOS)))]
    if scenario == "gravity_switch" and num_chunks < 2:
        scenario = "drift"  # the switch needs a chunk boundary to happen on
    builder = {
        "drop": _drop,
        "floor": _floor,
        "drift": _drift,
        "collide": _collide,
        "gravity_switch": _gravity_switch,
    }[scenario]
    objects, physics, events = builder(rng, num_chunks, float(size))
    return SceneSpec(size, num_chunks, objects, physics, events, seed=seed)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _shapes_colours(
    rng: np.random.Generator, n: int, balls_only: bool = False
) -> tuple[list[str], list[str]]:
    colours = [str(c) for c in rng.choice(list(PALETTE), size=n, replace=False)]
    shapes = ["ball" if balls_only or rng.random() < 0.6 else "box" for _ in range(n)]
    return shapes, colours


def _sizes(rng: np.random.Generator, n: int, s: float) -> list[float]:
    # 10..16 px at 64x64: one to two latent pixels after 8x compression, still clearly visible
    return [round(_u(rng, 0.15, 0.25) * s, 2) for _ in range(n)]


def _place(
    rng: np.random.Generator, sizes: list[float], s: float, y_range: tuple[float, float]
) -> list[tuple[float, float]]:
    """Non-overlapping centres; each object gets its own horizontal slot so drops don't stack."""
    n = len(sizes)
    slots = rng.permutation(n)  # slot order independent of object order (and draw order)
    out = []
    for k, d in enumerate(sizes):
        slot = int(slots[k])
        lo, hi = slot * s / n + d / 2 + 1, (slot + 1) * s / n - d / 2 - 1
        x = _u(rng, lo, max(lo, hi))
        y = _u(rng, max(y_range[0], d / 2 + 1), min(y_range[1], s - d / 2 - 1))
        out.append((round(x, 2), round(y, 2)))
    return out


def _maybe_push(
    rng: np.random.Generator, num_chunks: int, n: int, s: float, p: float
) -> tuple[Event, ...]:
    """At most one push, on a chunk boundary, so chunk-wise prompts see a motion change."""
    if num_chunks < 2 or rng.random() >= p:
        return ()
    chunk = int(rng.integers(1, num_chunks))
    obj = int(rng.integers(n))
    dv = (float(rng.choice([-1.0, 1.0])) * _u(rng, 0.8, 1.5) * s, -_u(rng, 0.0, 0.6) * s)
    return (Event(chunk, "push", obj, (round(dv[0], 2), round(dv[1], 2))),)


def _drop(rng: np.random.Generator, num_chunks: int, s: float) -> _Built:
    n = int(rng.integers(1, 4))
    shapes, colours = _shapes_colours(rng, n)
    sizes = _sizes(rng, n, s)
    pos = _place(rng, sizes, s, (0.0, 0.45 * s))
    objs = tuple(
        ObjectSpec(
            shapes[k],
            colours[k],
            sizes[k],
            pos[k],
            (round(_u(rng, -0.5, 0.5) * s, 2), round(_u(rng, -0.4, 0.1) * s, 2)),
        )
        for k in range(n)
    )
    physics = PhysicsSpec(True, GRAVITY_PER_SIZE * s, round(_u(rng, 0.55, 0.85), 3))
    return objs, physics, _maybe_push(rng, num_chunks, n, s, 0.5)


def _floor(rng: np.random.Generator, num_chunks: int, s: float) -> _Built:
    """Objects on the floor, resting or sliding; usually one gets pushed later."""
    n = int(rng.integers(1, 4))
    shapes, colours = _shapes_colours(rng, n)
    sizes = _sizes(rng, n, s)
    pos = _place(rng, sizes, s, (0.0, s))
    objs = tuple(
        ObjectSpec(
            shapes[k],
            colours[k],
            sizes[k],
            (pos[k][0], s - sizes[k] / 2),
            (round(_u(rng, -0.6, 0.6) * s, 2) if rng.random() < 0.4 else 0.0, 0.0),
        )
        for k in range(n)
    )
    physics = PhysicsSpec(True, GRAVITY_PER_SIZE * s, round(_u(rng, 0.55, 0.85), 3))
    return objs, physics, _maybe_push(rng, num_chunks, n, s, 0.85)


def _random_velocity(
    rng: np.random.Generator, s: float, lo: float, hi: float
) -> tuple[float, float]:
    angle, speed = _u(rng, 0.0, 2 * np.pi), _u(rng, lo, hi) * s
    return (round(speed * float(np.cos(angle)), 2), round(speed * float(np.sin(angle)), 2))


def _drift(rng: np.random.Generator, num_chunks: int, s: float) -> _Built:
    """No gravity, elastic walls: constant velocity between bounces and collisions."""
    n = int(rng.integers(1, 4))
    shapes, colours = _shapes_colours(rng, n)
    sizes = _sizes(rng, n, s)
    pos = _place(rng, sizes, s, (0.0, s))
    objs = tuple(
        ObjectSpec(shapes[k], colours[k], sizes[k], pos[k], _random_velocity(rng, s, 0.3, 1.0))
        for k in range(n)
    )
    events: tuple[Event, ...] = ()
    if num_chunks >= 2 and rng.random() < 0.4:
        events = (Event(int(rng.integers(1, num_chunks)), "gravity_on"),)
    return objs, PhysicsSpec(False, GRAVITY_PER_SIZE * s, 1.0), events


def _collide(rng: np.random.Generator, num_chunks: int, s: float) -> _Built:
    """Two balls on a collision course in the first chunk (no gravity)."""
    shapes, colours = _shapes_colours(rng, 2, balls_only=True)
    sizes = _sizes(rng, 2, s)
    y = _u(rng, 0.3, 0.7) * s
    dy = _u(rng, -0.3, 0.3) * min(sizes)  # off-centre hits deflect vertically too
    speeds = (_u(rng, 0.5, 1.0) * s, _u(rng, 0.5, 1.0) * s)
    objs = (
        ObjectSpec(
            shapes[0], colours[0], sizes[0], (0.22 * s, round(y, 2)), (round(speeds[0], 2), 0.0)
        ),
        ObjectSpec(
            shapes[1],
            colours[1],
            sizes[1],
            (0.78 * s, round(y + dy, 2)),
            (round(-speeds[1], 2), 0.0),
        ),
    )
    return objs, PhysicsSpec(False, GRAVITY_PER_SIZE * s, 1.0), ()


def _gravity_switch(rng: np.random.Generator, num_chunks: int, s: float) -> _Built:
    """Objects hang or drift slowly, then gravity switches on at a chunk boundary."""
    n = int(rng.integers(1, 4))
    shapes, colours = _shapes_colours(rng, n)
    sizes = _sizes(rng, n, s)
    pos = _place(rng, sizes, s, (0.0, 0.5 * s))
    objs = tuple(
        ObjectSpec(
            shapes[k],
            colours[k],
            sizes[k],
            pos[k],
            _random_velocity(rng, s, 0.0, 0.3) if rng.random() < 0.5 else (0.0, 0.0),
        )
        for k in range(n)
    )
    events = (Event(int(rng.integers(1, num_chunks)), "gravity_on"),)
    physics = PhysicsSpec(False, GRAVITY_PER_SIZE * s, round(_u(rng, 0.55, 0.85), 3))
    return objs, physics, events
