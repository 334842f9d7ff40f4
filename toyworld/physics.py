"""Deterministic 2-D rigid-body simulation of a SceneSpec.

Friction-free, non-rotating circles and axis-aligned squares; semi-implicit Euler with a fixed
number of sub-steps per frame; object-object collisions are perfectly elastic (impulse along
the contact normal), walls and floor use the scene's restitution.

The state is a handful of Python floats (IEEE float64, like numpy's) rather than numpy arrays:
with at most three objects numpy's per-call overhead would dominate, and the generator must
make hundreds of scenes a second. Results are returned as numpy float64 arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scenes import CHUNK_FRAMES, FPS, SceneSpec

SUBSTEPS = 8  # at the sampler's top speeds an object moves < 1 px per sub-step: no tunnelling
# A floor rebound lower than this (px) would be invisible; zeroing it ends the otherwise endless
# micro-bouncing of a resting object under gravity, so it truly rests.
REST_BOUNCE_PX = 0.25
# Contacts slower than this (px/s, half a pixel per frame) are resting contact, not events.
MIN_CONTACT_SPEED = 0.5 * FPS


@dataclass(frozen=True)
class Contact:
    frame: int  # the frame whose step contains the contact
    kind: str  # "floor", "left", "right", "ceiling" or "object"
    obj: int
    other: int = -1  # the other object of an "object" contact
    speed: float = 0.0  # approach speed, px/s
    rebound: float = 0.0  # speed away from a wall or floor after the contact, px/s


@dataclass(frozen=True, eq=False)
class Trajectory:
    positions: np.ndarray  # (T, N, 2) float64 centres (x, y), px
    velocities: np.ndarray  # (T, N, 2) float64, px/s
    gravity: np.ndarray  # (T,) bool: gravity acted during the step into this frame
    contacts: tuple[Contact, ...]


@dataclass(slots=True)
class _Body:
    x: float
    y: float
    vx: float
    vy: float
    half: float
    inv_mass: float
    ball: bool


def _bodies(spec: SceneSpec) -> list[_Body]:
    out = []
    for o in spec.objects:
        # mass proportional to area, so a big box shoves a small ball
        area = math.pi * o.half**2 if o.shape == "ball" else o.size**2
        out.append(
            _Body(
                *map(float, o.position),
                *map(float, o.velocity),
                o.half,
                1.0 / area,
                o.shape == "ball",
            )
        )
    return out


def simulate(spec: SceneSpec, substeps: int = SUBSTEPS) -> Trajectory:
    """Run the scene for spec.num_frames frames; frame 0 is the initial state."""
    bodies = _bodies(spec)
    n_frames, n = spec.num_frames, len(bodies)
    pos = np.empty((n_frames, n, 2))
    vel = np.empty((n_frames, n, 2))
    grav = np.zeros(n_frames, dtype=bool)
    contacts: list[Contact] = []
    gravity = spec.physics.gravity
    dt = 1.0 / (FPS * substeps)
    for f in range(n_frames):
        if f % CHUNK_FRAMES == 0:
            gravity = _apply_events(spec, f // CHUNK_FRAMES, bodies, gravity)
        if f > 0:
            g = spec.physics.gravity_accel if gravity else 0.0
            for _ in range(substeps):
                _substep(bodies, spec, g, dt, f, contacts)
        grav[f] = gravity
        for i, b in enumerate(bodies):
            pos[f, i] = b.x, b.y
            vel[f, i] = b.vx, b.vy
    return Trajectory(pos, vel, grav, tuple(contacts))


def _apply_events(spec: SceneSpec, chunk: int, bodies: list[_Body], gravity: bool) -> bool:
    for e in spec.events:
        if e.chunk != chunk:
            continue
        if e.kind == "push":
            bodies[e.obj].vx += e.delta_v[0]
            bodies[e.obj].vy += e.delta_v[1]
        else:
            gravity = e.kind == "gravity_on"
    return gravity


def _substep(
    bodies: list[_Body], spec: SceneSpec, g: float, dt: float, frame: int, contacts: list[Contact]
) -> None:
    for b in bodies:
        b.vy += g * dt  # velocity first (semi-implicit Euler): stable, energy drift bounded
        b.x += b.vx * dt
        b.y += b.vy * dt
    for i in range(len(bodies)):
        for j in range(i + 1, len(bodies)):
            _collide(bodies, i, j, frame, contacts)
    # walls last, so no object ends a sub-step outside the frame
    for i, b in enumerate(bodies):
        _walls(b, i, spec, g, frame, contacts)


def _walls(
    b: _Body, i: int, spec: SceneSpec, g: float, frame: int, contacts: list[Contact]
) -> None:
    e, size, phys = spec.physics.restitution, float(spec.size), spec.physics
    if phys.walls:
        if b.x - b.half < 0.0:
            b.x = b.half
            b.vx = _bounce(-b.vx, e, 0.0, "left", i, frame, contacts)
        elif b.x + b.half > size:
            b.x = size - b.half
            b.vx = -_bounce(b.vx, e, 0.0, "right", i, frame, contacts)
        if b.y - b.half < 0.0:
            b.y = b.half
            b.vy = _bounce(-b.vy, e, 0.0, "ceiling", i, frame, contacts)
    if phys.floor and b.y + b.half > size:
        b.y = size - b.half
        b.vy = -_bounce(b.vy, e, g, "floor", i, frame, contacts)


def _bounce(
    approach: float, e: float, g: float, kind: str, i: int, frame: int, contacts: list[Contact]
) -> float:
    """Rebound speed (>= 0) away from a wall hit at `approach` px/s (<= 0: moving away)."""
    if approach <= 0.0:
        return -approach  # already leaving: keep the velocity as it is
    out = e * approach
    if g > 0.0 and out * out < 2.0 * g * REST_BOUNCE_PX:
        out = 0.0  # the rebound would rise less than REST_BOUNCE_PX: rest instead
    if approach > MIN_CONTACT_SPEED:
        contacts.append(Contact(frame, kind, i, -1, approach, out))
    return out


def _normal(a: _Body, b: _Body) -> tuple[float, float, float] | None:
    """Contact normal (from a to b) and penetration depth, or None if a and b don't touch."""
    dx, dy = b.x - a.x, b.y - a.y
    if a.ball and b.ball:
        d = math.hypot(dx, dy)
        pen = a.half + b.half - d
        if pen <= 0.0:
            return None
        return (dx / d, dy / d, pen) if d > 0.0 else (1.0, 0.0, pen)
    if not a.ball and not b.ball:
        return _min_axis(dx, dy, a.half + b.half)
    ball, box, sign = (a, b, -1.0) if a.ball else (b, a, 1.0)
    # closest point of the box to the ball centre; the normal runs from it to the centre
    qx = min(max(ball.x, box.x - box.half), box.x + box.half)
    qy = min(max(ball.y, box.y - box.half), box.y + box.half)
    ex, ey = ball.x - qx, ball.y - qy
    d = math.hypot(ex, ey)
    if d == 0.0:  # centre inside the box: push out along the shallower axis
        hit = _min_axis(ball.x - box.x, ball.y - box.y, ball.half + box.half)
        return None if hit is None else (sign * hit[0], sign * hit[1], hit[2])
    if d >= ball.half:
        return None
    return sign * ex / d, sign * ey / d, ball.half - d


def _min_axis(dx: float, dy: float, reach: float) -> tuple[float, float, float] | None:
    ox, oy = reach - abs(dx), reach - abs(dy)
    if ox <= 0.0 or oy <= 0.0:
        return None
    if ox < oy:
        return (1.0 if dx >= 0.0 else -1.0), 0.0, ox
    return 0.0, (1.0 if dy >= 0.0 else -1.0), oy


def _collide(bodies: list[_Body], i: int, j: int, frame: int, contacts: list[Contact]) -> None:
    a, b = bodies[i], bodies[j]
    hit = _normal(a, b)
    if hit is None:
        return
    nx, ny, pen = hit
    inv = a.inv_mass + b.inv_mass
    # separate in proportion to inverse mass: the centre of mass does not move
    a.x -= nx * pen * a.inv_mass / inv
    a.y -= ny * pen * a.inv_mass / inv
    b.x += nx * pen * b.inv_mass / inv
    b.y += ny * pen * b.inv_mass / inv
    vrel = (b.vx - a.vx) * nx + (b.vy - a.vy) * ny
    if vrel >= 0.0:
        return  # already separating
    impulse = -2.0 * vrel / inv  # (1 + e) with e = 1: elastic, momentum and energy conserved
    a.vx -= impulse * a.inv_mass * nx
    a.vy -= impulse * a.inv_mass * ny
    b.vx += impulse * b.inv_mass * nx
    b.vy += impulse * b.inv_mass * ny
    if -vrel > MIN_CONTACT_SPEED:
        contacts.append(Contact(frame, "object", i, j, -vrel))
