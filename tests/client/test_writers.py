"""Writers: a file that plays after every chunk, raw frames to MP4 / PNG / .npy exactly."""

from __future__ import annotations

import av
import numpy as np
import pytest

from client.events import ChunkEvent
from client.writers import Fmp4Writer, NpyWriter, PngWriter, RawMp4Writer, npy_header
from proto import video_generation_pb2 as pb
from tests.client.fakes import FRAMES, fmp4_segments, frames
from tests.client.test_cli import count_frames

W, H = 48, 32  # PyAV pads rows of this width; packing must strip the padding


def raw_chunk(index: int) -> ChunkEvent:
    return ChunkEvent(
        index,
        index * FRAMES,
        FRAMES,
        W,
        H,
        24,
        "p",
        1,
        pb.ChunkTimings(),
        frames=frames(index, W, H),
    )


def test_fmp4_writer_file_plays_after_every_chunk(tmp_path):
    path = tmp_path / "out.mp4"
    writer = Fmp4Writer(path)
    for index in range(3):
        init, media = fmp4_segments(index, W, H)
        payload = (init if index == 0 else b"") + media
        writer.write(
            ChunkEvent(
                index, index * FRAMES, FRAMES, W, H, 24, "p", 1, pb.ChunkTimings(), payload=payload
            )
        )
        assert count_frames(path) == (index + 1) * FRAMES  # readable before close
    writer.close()


def test_raw_mp4_writer_file_plays_after_every_chunk_with_the_frames_colours(tmp_path):
    path = tmp_path / "out.mp4"
    writer = RawMp4Writer(path)
    for index in range(2):
        writer.write(raw_chunk(index))
        assert count_frames(path) == (index + 1) * FRAMES
    writer.close()
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 2 * FRAMES
    # lossy, but a flat colour survives within a few levels
    expected = np.frombuffer(frames(1, W, H)[5], np.uint8).reshape(H, W, 3)
    assert np.abs(decoded[FRAMES + 5].astype(int) - expected).max() <= 6


def test_png_writer_writes_each_frame_losslessly_by_frame_index(tmp_path):
    PngWriter(tmp_path).write(raw_chunk(1))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == f"frame_{FRAMES:06d}.png" and len(names) == FRAMES
    with av.open(str(tmp_path / f"frame_{FRAMES + 3:06d}.png")) as container:
        image = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert image.tobytes() == frames(1, W, H)[3]


def test_npy_writer_matches_numpy_for_every_chunk(tmp_path):
    NpyWriter(tmp_path).write(raw_chunk(2))
    array = np.load(tmp_path / "chunk_0002.npy")
    assert array.shape == (FRAMES, H, W, 3) and array.dtype == np.uint8
    assert array.tobytes() == b"".join(frames(2, W, H))
    assert len(npy_header((1, 2, 3))) % 64 == 0


def test_raw_writers_refuse_an_fmp4_chunk_and_vice_versa(tmp_path):
    fmp4 = ChunkEvent(0, 0, FRAMES, W, H, 24, "p", 1, pb.ChunkTimings(), payload=b"x")
    with pytest.raises(ValueError, match="no raw frames"):
        NpyWriter(tmp_path).write(fmp4)
    with pytest.raises(ValueError, match="no fMP4 payload"):
        Fmp4Writer(tmp_path / "o.mp4").write(raw_chunk(0))
