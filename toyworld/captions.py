"""Chunk captions from a small template grammar, read off the simulated motion.

Grammar (one caption per 24-frame chunk):

    caption  := clause ("," clause)* [", and" clause]     -- one clause per object, then
                                                            one per colliding pair
    clause   := ("a" | "an") COLOUR SHAPE [ "is pushed" ["up"] "and" ] verb [ wall ]
              | "the" COLOUR SHAPE "and the" COLOUR SHAPE "collide"
    verb     := "falls" [dir] | "rises" | "rises and falls" | ["falls and"] "bounces" [dir]
              | ["falls and"] "lands" | "rolls" [dir] | "slides" [dir]
              | "moves" dir | "drifts" | "rests on the floor" | "stays still"
    wall     := "and" ("bounces off" | "hits") WALL ("and" WALL)*
    WALL     := "the left wall" | "the right wall" | "the ceiling" | "the floor" (no gravity)
    dir      := "to the left" | "to the right" | "up" | "down" | ("up" | "down") "and to the"
                ("left" | "right")

Captions describe what the trajectory actually does in the chunk (contacts come from the
simulator, directions from displacements), so a push or a gravity switch at a chunk boundary
changes the caption exactly there.
"""

from __future__ import annotations

import numpy as np

from .physics import MIN_CONTACT_SPEED, Contact, Trajectory
from .scenes import CHUNK_FRAMES, FPS, SceneSpec

MOVE_PX = 1.5  # path length below which an object counts as still over a chunk
DIR_PX = 3.0  # net displacement below which a direction is not worth stating
FLOOR_EPS = 0.5  # px: bottom edge this close to the floor counts as touching it
WALL_WORDS = {
    "left": "the left wall",
    "right": "the right wall",
    "ceiling": "the ceiling",
    "floor": "the floor",
}  # the floor counts as a wall only without gravity


def chunk_captions(spec: SceneSpec, traj: Trajectory) -> tuple[str, ...]:
    return tuple(describe_chunk(spec, traj, k) for k in range(spec.num_chunks))


def describe_chunk(spec: SceneSpec, traj: Trajectory, chunk: int) -> str:
    f0, f1 = chunk * CHUNK_FRAMES, (chunk + 1) * CHUNK_FRAMES
    inside = [c for c in traj.contacts if f0 <= c.frame < f1]
    clauses = [_object_clause(spec, traj, chunk, i, inside) for i in range(len(spec.objects))]
    pairs: list[tuple[int, int]] = []
    for c in inside:  # contacts are in time order, so pairs are listed as they first collide
        if c.kind == "object" and (c.obj, c.other) not in pairs:
            pairs.append((c.obj, c.other))
    clauses += [f"{_name(spec, i, 'the')} and {_name(spec, j, 'the')} collide" for i, j in pairs]
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + ", and " + clauses[-1]


def _name(spec: SceneSpec, i: int, article: str = "a") -> str:
    o = spec.objects[i]
    if article == "a" and o.colour[0] in "aeiou":
        article = "an"
    return f"{article} {o.colour} {o.shape}"


def _direction(dx: float, dy: float) -> str:
    ax, ay = abs(dx), abs(dy)
    if max(ax, ay) < DIR_PX:
        return ""
    horizontal = "to the left" if dx < 0 else "to the right"
    vertical = "up" if dy < 0 else "down"
    if ax > 2 * ay:
        return horizontal
    if ay > 2 * ax:
        return vertical
    return f"{vertical} and {horizontal}"


def _with_dir(verb: str, direction: str) -> str:
    return f"{verb} {direction}" if direction else verb


def _object_clause(
    spec: SceneSpec, traj: Trajectory, chunk: int, i: int, inside: list[Contact]
) -> str:
    f0, f1 = chunk * CHUNK_FRAMES, (chunk + 1) * CHUNK_FRAMES
    p = traj.positions[f0:f1, i]
    # displacement INTO each frame of the chunk; frame 0 has no predecessor, so extrapolate
    before = traj.positions[f0 - 1, i] if f0 > 0 else p[0] - traj.velocities[0, i] / FPS
    steps = np.diff(np.vstack([before[None], p]), axis=0)
    mine = [c for c in inside if i in (c.obj, c.other)]
    verb = _verb(spec, traj, i, f0, p, steps, mine)
    gravity = bool(traj.gravity[f0])  # events sit on chunk boundaries: constant in a chunk
    hits = [c.kind for c in mine if c.kind in WALL_WORDS and (c.kind != "floor" or not gravity)]
    walls = list(dict.fromkeys(WALL_WORDS[k] for k in hits))
    if walls:
        joiner = "hits" if "bounces" in verb else "bounces off"
        verb += f" and {joiner} " + " and ".join(walls)
    pushes = [e for e in spec.events if e.kind == "push" and e.obj == i and e.chunk == chunk]
    if pushes:
        verb = ("is pushed up and " if pushes[0].delta_v[1] < 0 else "is pushed and ") + verb
    return f"{_name(spec, i)} {verb}"


def _verb(
    spec: SceneSpec,
    traj: Trajectory,
    i: int,
    f0: int,
    p: np.ndarray,
    steps: np.ndarray,
    mine: list[Contact],
) -> str:
    obj = spec.objects[i]
    on_floor = spec.physics.floor & (p[:, 1] + obj.half >= spec.size - FLOOR_EPS)
    gravity = bool(traj.gravity[f0])
    dx = float(steps[:, 0].sum())  # net horizontal displacement over the chunk
    if float(np.hypot(steps[:, 0], steps[:, 1]).sum()) < MOVE_PX and not mine:
        return "rests on the floor" if on_floor.all() else "stays still"
    floor = [c for c in mine if c.kind == "floor"] if gravity else []
    if floor:
        verb = "bounces" if any(c.rebound > MIN_CONTACT_SPEED for c in floor) else "lands"
        landing = floor[0].frame - f0
        if not on_floor[0] and steps[0, 1] >= 0 and p[landing, 1] - p[0, 1] > FLOOR_EPS:
            verb = "falls and " + verb  # came down from the air (not mid-hop) in this chunk
        return _with_dir(verb, _direction(dx, 0.0)) if "bounces" in verb else verb
    if gravity and on_floor.all():
        lead = _lead(steps, mine, f0)
        return _with_dir("rolls" if obj.shape == "ball" else "slides", _direction(lead[0], 0.0))
    if gravity:
        if steps[0, 1] < 0 < steps[-1, 1]:
            return "rises and falls"
        if steps[:, 1].sum() < 0:
            return "rises"
        return _with_dir("falls", _direction(dx, 0.0))
    lead = _lead(steps, mine, f0)
    direction = _direction(float(lead[0]), float(lead[1]))
    return f"moves {direction}" if direction else "drifts"


def _lead(steps: np.ndarray, mine: list[Contact], f0: int) -> np.ndarray:
    """Displacement before the first contact (the direction a viewer reads), or the net one.

    A contact in the first quarter of the chunk is ignored: the motion after it dominates.
    """
    first = min((c.frame - f0 for c in mine), default=len(steps))
    if first >= len(steps) // 4:
        return steps[:first].sum(axis=0)
    return steps.sum(axis=0)
