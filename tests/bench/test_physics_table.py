"""bench/physics_table.py on two scenes: the tables print, and its V2V frames line up in time."""

from __future__ import annotations

import numpy as np

from bench.physics_table import PER_FRAME, SCORED, V2V_FIRST_CHUNK_FRAMES, V2V_SCORED
from model.vae import video_frames_for
from tests.bench import run_bench


def test_v2v_stream_frames_are_scored_against_the_same_times() -> None:
    # the first generated chunk outputs latents 8..11 (frames 48..63) of the continuation
    assert video_frames_for(4) == V2V_FIRST_CHUNK_FRAMES == 12 + 1
    # stream index -> frame: 0..11 -> 48..59 (12 -> one frame for 60..63), 13.. -> 64..
    stream_time = np.r_[48:60, 60, 64:112]
    assert np.array_equal(stream_time[V2V_SCORED], SCORED)
    assert np.array_equal(SCORED, np.r_[48:60, 64:96])
    assert set(PER_FRAME) <= set(SCORED)


def test_two_scenes_print_the_table_the_differences_and_the_per_frame_curves() -> None:
    out = run_bench("physics_table.py", "--scenes", "2", "--batch", "2", "--threads", "1")
    firsts = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")]
    modes = ["| V2V", "| I2V", "| copy last frame", "| ground truth (ceiling)"]
    differences = ["| V2V − copy last frame", "| V2V − I2V"]
    assert firsts == ["| mode", *modes, "| difference", *differences, "| mode", *modes]
    assert all(f"frame {f}" in out for f in PER_FRAME)
