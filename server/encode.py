"""Output encoding: H.264 fragmented MP4 with one self-contained fragment per chunk.

The MP4 muxer writes a fragment only when the NEXT keyframe arrives, and PyAV cannot ask it to
flush earlier. So each chunk gets its own short-lived muxer and encoder: the chunk's frames
become exactly one moof+mdat that starts on an IDR frame, with its decode time (tfdt) and
fragment number set so that init + fragments of every chunk concatenate into one valid MP4.
The init segment (ftyp+moov) depends only on the size and encoder settings, so every chunk's
muxer writes the same one; the session sends the first.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

# empty_moov: samples live in fragments only; default_base_moof: offsets relative to each moof,
# so a fragment is position independent; frag_discont + avoid_negative_ts=disabled: tfdt comes
# from the first frame's timestamp instead of restarting at 0; skip_trailer: no mfra index.
_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+frag_discont+skip_trailer"


@dataclass(frozen=True)
class VideoEncoding:
    """libx264 settings for FMP4_H264 output."""

    preset: str = "veryfast"  # x264 speed/size trade-off
    crf: int = 23  # constant rate factor: lower = better quality, larger files

    def __post_init__(self) -> None:
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {self.crf}")


@dataclass(frozen=True)
class EncodedChunk:
    init_segment: bytes  # ftyp + moov, identical for every chunk of a session
    media_segment: bytes  # moof + mdat of this chunk


def encode_fmp4_chunk(
    frames: np.ndarray, first_frame: int, chunk_index: int, fps: int, settings: VideoEncoding
) -> EncodedChunk:
    """frames: uint8 (T, H, W, 3) RGB with even H and W (yuv420p needs them)."""
    _, height, width, _ = frames.shape
    buffer = io.BytesIO()
    options = {
        "movflags": _MOVFLAGS,
        "fragment_index": str(chunk_index + 1),  # mfhd sequence numbers grow across chunks
        "avoid_negative_ts": "disabled",
    }
    time_base = Fraction(1, fps)
    with av.open(buffer, mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = time_base
        # bf=0: no B-frames, so decode order is display order and dts never precedes the
        # chunk's first timestamp; a GOP longer than a chunk keeps one keyframe per fragment.
        stream.options = {
            "preset": settings.preset,
            "crf": str(settings.crf),
            "bf": "0",
            "g": str(max(2 * len(frames), 48)),
        }
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = first_frame + k, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return _split_init(buffer.getvalue())


def _split_init(data: bytes) -> EncodedChunk:
    pos = 0
    while pos + 8 <= len(data):
        kind = data[pos + 4 : pos + 8]
        if kind not in (b"ftyp", b"moov"):
            break
        pos += int.from_bytes(data[pos : pos + 4], "big")
    return EncodedChunk(init_segment=data[:pos], media_segment=data[pos:])


def split_raw_frames(frames: bytes, frame_count: int) -> list[bytes]:
    """One RGB24 frame per message (each well under gRPC's 4 MiB default at our sizes)."""
    size = len(frames) // frame_count
    view = memoryview(frames)
    return [bytes(view[k * size : (k + 1) * size]) for k in range(frame_count)]
