"""Chunk captions describe the simulated motion, and change where the motion changes."""

from __future__ import annotations

import re

from toyworld import (
    PALETTE,
    Event,
    ObjectSpec,
    PhysicsSpec,
    SceneSpec,
    generate_video,
    sample_scene,
    video_from_spec,
)


def _captions(
    objects: list[ObjectSpec],
    physics: PhysicsSpec | None = None,
    events: list[Event] | tuple[Event, ...] = (),
    chunks: int = 2,
) -> tuple[str, ...]:
    spec = SceneSpec(64, chunks, tuple(objects), physics or PhysicsSpec(), tuple(events))
    return video_from_spec(spec).captions


def test_falling_ball_falls_and_bounces_in_the_first_chunk() -> None:
    ball = ObjectSpec("ball", "red", 12.0, (32.0, 10.0))
    captions = _captions([ball], PhysicsSpec(restitution=0.8))
    assert captions[0] == "a red ball falls and bounces"
    assert "bounces" in captions[1]


def test_ball_still_in_the_air_just_falls() -> None:
    ball = ObjectSpec("ball", "green", 10.0, (32.0, 10.0))
    # weak gravity: 40 px/s^2 brings it down 20 px in a second, short of the floor
    captions = _captions([ball], PhysicsSpec(gravity_accel=40.0), chunks=1)
    assert captions == ("a green ball falls",)


def test_push_changes_the_caption_at_the_push_chunk() -> None:
    ball = ObjectSpec("ball", "red", 12.0, (30.0, 58.0))
    box = ObjectSpec("box", "blue", 12.0, (52.0, 58.0))
    events = [Event(1, "push", 0, (-10.0, 0.0)), Event(2, "push", 1, (-15.0, 0.0))]
    captions = _captions([ball, box], events=events, chunks=3)
    assert captions == (
        "a red ball rests on the floor, and a blue box rests on the floor",
        "a red ball is pushed and rolls to the left, and a blue box rests on the floor",
        "a red ball rolls to the left, and a blue box is pushed and slides to the left",
    )


def test_push_up_makes_a_hop() -> None:
    box = ObjectSpec("box", "white", 12.0, (30.0, 58.0))
    hop = [Event(1, "push", 0, (0.0, -120.0))]
    captions = _captions([box], PhysicsSpec(restitution=0.0), hop)
    assert captions == ("a white box rests on the floor", "a white box is pushed up and lands")
    captions = _captions([box], PhysicsSpec(restitution=0.8), hop)
    assert captions[1] == "a white box is pushed up and bounces"


def test_gravity_switch_changes_the_caption() -> None:
    box = ObjectSpec("box", "yellow", 10.0, (32.0, 20.0))
    captions = _captions([box], PhysicsSpec(gravity=False), [Event(1, "gravity_on")])
    assert captions == ("a yellow box stays still", "a yellow box falls and bounces")


def test_constant_velocity_and_wall_bounce() -> None:
    box = ObjectSpec("box", "blue", 10.0, (40.0, 32.0), (-50.0, 0.0))
    captions = _captions([box], PhysicsSpec(gravity=False, restitution=1.0))
    assert captions[0] == "a blue box moves to the left and bounces off the left wall"
    assert captions[1] == "a blue box moves to the right and bounces off the right wall"


def test_two_balls_collide() -> None:
    a = ObjectSpec("ball", "red", 12.0, (14.0, 32.0), (40.0, 0.0))
    b = ObjectSpec("ball", "cyan", 12.0, (50.0, 32.0), (-40.0, 0.0))
    captions = _captions([a, b], PhysicsSpec(gravity=False, restitution=1.0), chunks=1)
    assert captions[0].endswith(", and the red ball and the cyan ball collide")
    assert captions[0].startswith("a red ball moves to the right")
    assert ", a cyan ball moves to the left" in captions[0]


def test_rolling_on_the_floor() -> None:
    ball = ObjectSpec("ball", "orange", 12.0, (10.0, 58.0), (20.0, 0.0))
    assert _captions([ball], chunks=1) == ("an orange ball rolls to the right",)


def test_sampled_captions_change_at_events() -> None:
    changed = total = 0
    for seed in range(200):
        spec = sample_scene(seed, 3)
        if not spec.events:
            continue
        v = generate_video(seed, 3)
        for e in spec.events:
            total += 1
            changed += v.captions[e.chunk] != v.captions[e.chunk - 1]
    assert total > 50 and changed == total


_COLOUR = "(" + "|".join(PALETTE) + ")"
_DIR = "(to the left|to the right|up|down|(up|down) and to the (left|right))"
_WALL = "(the left wall|the right wall|the ceiling|the floor)"
_VERB = (
    f"(falls( {_DIR})?|rises|rises and falls|(falls and )?bounces( {_DIR})?|(falls and )?lands"
    f"|rolls( {_DIR})?|slides( {_DIR})?|moves {_DIR}|drifts|rests on the floor|stays still)"
)
_OBJECT = re.compile(
    f"an? {_COLOUR} (ball|box) (is pushed (up )?and )?{_VERB}"
    f"( and (bounces off|hits) {_WALL}( and {_WALL})*)?"
)
_COLLIDE = re.compile(f"the {_COLOUR} (ball|box) and the {_COLOUR} (ball|box) collide")


def test_sampled_captions_follow_the_grammar() -> None:
    """The text encoder of the toy model sees a closed, small vocabulary: keep it that way."""
    for seed in range(150):
        v = generate_video(seed, 3)
        for caption in v.captions:
            parts = caption.split(", ")
            if len(parts) > 1:
                assert parts[-1].startswith("and "), caption
                parts[-1] = parts[-1][4:]
            n = len(v.spec.objects)
            for i, part in enumerate(parts):
                pattern = _OBJECT if i < n else _COLLIDE
                assert pattern.fullmatch(part), (seed, part)
            for i, obj in enumerate(v.spec.objects):  # objects in spec order
                assert f" {obj.colour} {obj.shape} " in f" {parts[i]} "
