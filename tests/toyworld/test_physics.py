"""Simulator sanity: bounces stay in the frame, energy behaves, collisions conserve momentum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toyworld import Event, ObjectSpec, PhysicsSpec, SceneSpec, simulate


def _mass(o: ObjectSpec) -> float:
    return math.pi * o.half**2 if o.shape == "ball" else o.size**2


def _drop(restitution: float = 0.8, chunks: int = 3) -> SceneSpec:
    ball = ObjectSpec("ball", "red", 12.0, (20.0, 10.0), (15.0, 0.0))
    return SceneSpec(64, chunks, (ball,), PhysicsSpec(True, 320.0, restitution))


def test_ball_under_gravity_bounces_and_stays_inside() -> None:
    spec = _drop()
    traj = simulate(spec)
    half, size = spec.objects[0].half, spec.size
    xy = traj.positions[:, 0]
    assert np.all(xy >= half - 1e-9) and np.all(xy <= size - half + 1e-9)
    floor = [c for c in traj.contacts if c.kind == "floor"]
    assert len(floor) >= 2 and floor[0].rebound > 0
    # it moved down first, then back up after the first bounce
    vy = traj.velocities[:, 0, 1]
    assert vy[1] > 0 and np.any(vy[floor[0].frame :] < 0)
    # each bounce is lower than the drop: restitution < 1 loses energy
    apex_after = xy[floor[0].frame :, 1].min()
    assert apex_after > xy[0, 1] + 1.0


def test_mechanical_energy_never_grows_under_gravity() -> None:
    spec = _drop(restitution=0.9)
    traj = simulate(spec)
    g, size = spec.physics.gravity_accel, spec.size
    v = traj.velocities[:, 0]
    energy = 0.5 * (v**2).sum(axis=1) + g * (size - traj.positions[:, 0, 1])
    # semi-implicit Euler drifts by O(g * v * dt) between contacts; allow 2 %
    assert energy.max() <= energy[0] * 1.02
    assert energy[-1] < energy[0]


def test_resting_ball_comes_to_rest_on_the_floor() -> None:
    traj = simulate(_drop(restitution=0.5, chunks=4))
    last = traj.positions[-24:, 0]
    assert np.allclose(last[:, 1], 64 - 6.0)  # bottom on the floor, no micro-bouncing
    assert np.allclose(traj.velocities[-24:, 0, 1], 0.0)


def test_elastic_walls_conserve_kinetic_energy_without_gravity() -> None:
    objs = (ObjectSpec("box", "blue", 10.0, (30.0, 30.0), (70.0, -45.0)),)
    traj = simulate(SceneSpec(64, 2, objs, PhysicsSpec(False, 0.0, 1.0)))
    speed2 = (traj.velocities[:, 0] ** 2).sum(axis=1)
    assert len(traj.contacts) >= 2  # it did hit walls
    np.testing.assert_allclose(speed2, speed2[0], rtol=1e-12)


@pytest.mark.parametrize(
    "shapes, offset",
    [
        (("ball", "ball"), 0.0),
        (("ball", "ball"), 4.0),
        (("ball", "box"), 3.0),
        (("box", "box"), 2.0),
    ],
)
def test_elastic_collision_conserves_momentum_and_energy(
    shapes: tuple[str, str], offset: float
) -> None:
    objs = (
        ObjectSpec(shapes[0], "red", 12.0, (24.0, 48.0), (40.0, 0.0)),
        ObjectSpec(shapes[1], "green", 16.0, (72.0, 48.0 + offset), (-30.0, 0.0)),
    )
    # a large frame without walls: nothing but the collision changes the velocities
    spec = SceneSpec(96, 2, objs, PhysicsSpec(False, 0.0, 1.0, walls=False, floor=False))
    traj = simulate(spec)
    hits = [c for c in traj.contacts if c.kind == "object"]
    assert hits and all(c.kind == "object" for c in traj.contacts)
    m = np.array([_mass(o) for o in objs])
    momentum = (m[None, :, None] * traj.velocities).sum(axis=1)
    np.testing.assert_allclose(momentum, momentum[0][None].repeat(len(momentum), 0), atol=1e-9)
    energy = 0.5 * (m[None, :] * (traj.velocities**2).sum(axis=2)).sum(axis=1)
    np.testing.assert_allclose(energy, energy[0], rtol=1e-9)
    # and the collision really changed the motion
    assert not np.allclose(traj.velocities[-1], traj.velocities[0])


def test_push_event_changes_velocity_at_the_chunk_boundary() -> None:
    ball = ObjectSpec("ball", "red", 12.0, (20.0, 58.0))
    spec = SceneSpec(64, 2, (ball,), PhysicsSpec(), (Event(1, "push", 0, (50.0, 0.0)),))
    traj = simulate(spec)
    assert np.allclose(traj.positions[:24, 0], traj.positions[0, 0])  # rests until the push
    assert traj.velocities[24, 0, 0] == pytest.approx(50.0)
    assert traj.positions[24, 0, 0] > traj.positions[23, 0, 0]  # frame 24 already moved


def test_gravity_switch_event() -> None:
    box = ObjectSpec("box", "yellow", 10.0, (32.0, 20.0))
    spec = SceneSpec(64, 2, (box,), PhysicsSpec(gravity=False), (Event(1, "gravity_on"),))
    traj = simulate(spec)
    assert not traj.gravity[:24].any() and traj.gravity[24:].all()
    assert np.allclose(traj.positions[:24, 0], (32.0, 20.0))
    assert traj.positions[30, 0, 1] > 20.0
