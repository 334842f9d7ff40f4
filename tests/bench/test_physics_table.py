"""bench/physics_table.py on two scenes: the tables print, and its V2V frames line up in time."""

from __future__ import annotations

import numpy as np

from bench.physics_table import (
    KINDS,
    PER_FRAME,
    SCORED,
    V2V_FIRST_CHUNK_FRAMES,
    V2V_SCORED,
    continuation_kind,
)
from model.vae import video_frames_for
from tests.bench import run_bench
from toyworld.scenes import Event, ObjectSpec, SceneSpec


def test_v2v_stream_frames_are_scored_against_the_same_times() -> None:
    # the first generated chunk outputs latents 8..11 (frames 48..63) of the continuation
    assert video_frames_for(4) == V2V_FIRST_CHUNK_FRAMES == 12 + 1
    # stream index -> frame: 0..11 -> 48..59 (12 -> one frame for 60..63), 13.. -> 64..
    stream_time = np.r_[48:60, 60, 64:112]
    assert np.array_equal(stream_time[V2V_SCORED], SCORED)
    assert np.array_equal(SCORED, np.r_[48:60, 64:96])
    assert set(PER_FRAME) <= set(SCORED)


def test_continuation_kind_names_the_first_event_after_the_prefix() -> None:
    ball = (ObjectSpec("ball", "red", 12.0, (32.0, 20.0)),)

    def kind(*events: Event) -> str:
        return continuation_kind(SceneSpec(64, 4, ball, events=events))

    assert kind() == kind(Event(1, "gravity_on")) == "physics only"  # in the prefix: seen
    assert kind(Event(2, "push", 0, (40.0, 0.0))) == "event at frame 48"
    assert kind(Event(3, "gravity_on")) == "event at frame 72"
    assert kind(Event(3, "gravity_off"), Event(2, "gravity_on")) == "event at frame 48"
    assert KINDS == ("physics only", "event at frame 48", "event at frame 72")


def test_two_scenes_print_the_table_the_differences_and_the_per_frame_curves() -> None:
    # 4 Euler steps per chunk (the window's 4 stages, one step each) instead of the model's 16:
    # the same sessions, chunks and frames, the sampler's steps cut short
    out = run_bench(
        "physics_table.py", "--scenes", "2", "--batch", "2", "--threads", "1", "--num-steps", "4"
    )
    firsts = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")]
    modes = ["| V2V", "| I2V", "| copy last frame", "| ground truth (ceiling)"]
    differences = ["| V2V − copy last frame", "| V2V − I2V"]
    by_kind = [d for d in differences for _ in KINDS]
    assert firsts == [
        "| mode",
        *modes,
        "| difference",
        *differences,
        "| difference",
        *by_kind,
        "| mode",
        *modes,
    ]
    assert all(f"frame {f}" in out for f in PER_FRAME)
