"""bench/physics_table.py on one scene: the table prints, and its V2V frames line up in time."""

from __future__ import annotations

import numpy as np

from bench.physics_table import SCORED, V2V_FIRST_CHUNK_FRAMES, V2V_SCORED
from model.vae import video_frames_for
from tests.bench import run_bench


def test_v2v_stream_frames_are_scored_against_the_same_times() -> None:
    # the first generated chunk outputs latents 8..11 (frames 48..63) of the continuation
    assert video_frames_for(4) == V2V_FIRST_CHUNK_FRAMES == 12 + 1
    # stream index -> frame: 0..11 -> 48..59 (12 -> one frame for 60..63), 13.. -> 64..
    stream_time = np.r_[48:60, 60, 64:112]
    assert np.array_equal(stream_time[V2V_SCORED], SCORED)
    assert np.array_equal(SCORED, np.r_[48:60, 64:96])


def test_one_scene_prints_the_four_rows() -> None:
    out = run_bench("physics_table.py", "--scenes", "1", "--batch", "1", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| V2V",
        "| I2V",
        "| copy last frame",
        "| ground truth (ceiling)",
    ]
