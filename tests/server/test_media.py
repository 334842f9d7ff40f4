"""Client media: sizes read from headers before decoding, pixels scaled, video tails resampled."""

from __future__ import annotations

import numpy as np
import pytest

from server import media
from tests.server.helpers import encode_image, encode_mp4


def test_headers_give_the_size_without_decoding():
    rgb = np.zeros((30, 50, 3), np.uint8)
    assert media.probe_image(encode_image(rgb, "png")) == ("png", 50, 30)
    assert media.probe_image(encode_image(rgb[:16, :32].copy(), "mjpeg")) == ("jpeg", 32, 16)
    assert media.probe_mp4(encode_mp4(np.zeros((3, 32, 48, 3), np.uint8), 24)) == (48, 32)


def test_an_image_bomb_header_is_read_as_such():
    bomb = media.PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR" + (100_000).to_bytes(4, "big") * 2
    assert media.probe_image(bomb) == ("png", 100_000, 100_000)


@pytest.mark.parametrize("data", [b"GIF89a....", b"", b"\xff\xd8\xff"])
def test_unknown_or_truncated_images_are_refused(data):
    with pytest.raises(media.MediaError):
        media.probe_image(data)


def test_image_is_scaled_to_the_requested_size():
    rgb = np.full((30, 50, 3), (200, 20, 90), np.uint8)
    out = media.decode_image(encode_image(rgb), 64, 32, max_pixels=10_000)
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (200, 20, 90)).max() <= 2


def test_video_tail_is_the_last_frames_resampled_to_24_fps():
    # 60 frames at 30 fps whose brightness is their index x 4: the last 32 output frames at
    # 24 fps span 31/24 s back from the last source frame (index 59).
    levels = (np.arange(60) * 4).astype(np.uint8)
    video = np.broadcast_to(levels[:, None, None, None], (60, 16, 16, 3)).copy()
    out = media.decode_video_tail(encode_mp4(video, 30), 32, 32, 10_000, fps=24, frames=32)
    assert out.shape == (32, 32, 32, 3)
    got = out.reshape(32, -1).mean(axis=1) / 4
    times = 59 / 30 - (31 - np.arange(32)) / 24
    want = np.floor(times * 30 + 1e-6)
    assert np.abs(got - want).max() < 0.6


def test_a_video_too_short_for_the_prefix_is_refused():
    video = np.zeros((20, 16, 16, 3), np.uint8)
    with pytest.raises(media.MediaError, match="at least 32"):
        media.decode_video_tail(encode_mp4(video, 24), 16, 16, 10_000, fps=24, frames=32)
