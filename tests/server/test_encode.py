"""fMP4 output: one self-contained fragment per chunk; init + fragments is one valid MP4."""

from __future__ import annotations

import numpy as np

from server.encode import VideoEncoding, encode_fmp4_chunk, split_raw_frames
from tests.server.helpers import decode_mp4, ffprobe_frames


def ramp(frames: int, height: int = 48, width: int = 64, start: int = 0) -> np.ndarray:
    """Frames whose brightness encodes their index, so order and count can be read back."""
    levels = (np.arange(start, start + frames) * 9 % 256).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy()


def test_chunks_concatenate_into_one_mp4_with_every_frame_in_order(tmp_path):
    sizes, first, parts = [13, 24, 24], 0, []
    for index, n in enumerate(sizes):
        parts.append(encode_fmp4_chunk(ramp(n, start=first), first, index, 24, VideoEncoding()))
        first += n
    assert all(p.init_segment == parts[0].init_segment for p in parts)
    assert all(p.media_segment[4:8] == b"moof" for p in parts)
    data = parts[0].init_segment + b"".join(p.media_segment for p in parts)
    (tmp_path / "out.mp4").write_bytes(data)
    assert ffprobe_frames(tmp_path / "out.mp4") == (61, 64, 48)
    frames = decode_mp4(data)
    assert frames.shape == (61, 48, 64, 3)
    brightness = frames.reshape(61, -1).mean(axis=1)
    want = (np.arange(61) * 9 % 256).astype(float)
    assert np.abs(brightness - want).max() < 4  # each frame where it belongs


def test_each_fragment_decodes_on_its_own_after_the_init_segment():
    a = encode_fmp4_chunk(ramp(24), 0, 0, 24, VideoEncoding(preset="ultrafast"))
    b = encode_fmp4_chunk(ramp(24, start=24), 24, 1, 24, VideoEncoding(preset="ultrafast"))
    assert len(decode_mp4(a.init_segment + b.media_segment)) == 24  # starts on a keyframe


def test_raw_frames_split_one_message_per_frame():
    frames = ramp(3, 4, 5)
    parts = split_raw_frames(frames.tobytes(), 3)
    assert [len(p) for p in parts] == [60, 60, 60]
    assert b"".join(parts) == frames.tobytes()
