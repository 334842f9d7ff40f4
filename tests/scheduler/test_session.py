"""The request record: what it refuses when built, and what the engine needs to open it."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.session import SessionParams

PROMPTS = ((0, "a red ball"),)


def test_an_input_given_for_another_mode_is_refused():
    with pytest.raises(ValueError, match="only when mode is i2v"):
        SessionParams("s", PROMPTS, 1, 64, 64, image=b"png")
    with pytest.raises(ValueError, match="only when mode is v2v"):
        SessionParams("s", PROMPTS, 1, 64, 64, mode="i2v", video=b"mp4")


def test_the_engine_opens_a_record_only_with_its_id_seed_and_decoded_input():
    as_validated = SessionParams("", PROMPTS, 1, 64, 64, seed=None, mode="i2v", image=b"png")
    with pytest.raises(ValueError, match="id and seed"):
        as_validated.check_openable()
    named = SessionParams("s", PROMPTS, 1, 64, 64, seed=3, mode="i2v", image=b"png")
    with pytest.raises(ValueError, match="decoded"):
        named.check_openable()
    missing = SessionParams("s", PROMPTS, 1, 64, 64, seed=3, mode="v2v")
    with pytest.raises(ValueError, match="decoded"):
        missing.check_openable()
    frame = np.zeros((64, 64, 3), np.uint8)
    SessionParams("s", PROMPTS, 1, 64, 64, seed=3, mode="i2v", image=frame).check_openable()
    SessionParams("s", PROMPTS, None, 64, 64, seed=0).check_openable()
