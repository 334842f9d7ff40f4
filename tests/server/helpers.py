"""Small client-side helpers for the end-to-end tests (grpc.aio stubs, decoding checks)."""

from __future__ import annotations

import io
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import grpc
import numpy as np

from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc

PROMPT = "a red ball rolls"


def request(text: str = PROMPT, chunks: int = 2, size: int = 64, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        timeline=[pb.TimelineEntry(from_chunk=0, text=text)],
        num_chunks=chunks,
        # 0: until cancelled (the servers of these tests start with --allow-unbounded 1)
        unbounded=fields.pop("unbounded", chunks == 0),
        width_px=size,
        height_px=size,
        seed=fields.pop("seed", 1),
        **fields,
    )


def stub(channel: grpc.aio.Channel) -> pb_grpc.VideoGenerationStub:
    return pb_grpc.VideoGenerationStub(channel)


def kinds(events: list[pb.GenerateEvent]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def chunks(events: list[pb.GenerateEvent]) -> list[pb.Chunk]:
    return [e.chunk for e in events if e.WhichOneof("event") == "chunk"]


def fmp4(events: list[pb.GenerateEvent]) -> bytes:
    return b"".join(c.init_segment + c.media_segment for c in chunks(events))


def decode_mp4(data: bytes) -> np.ndarray:
    """Every frame of an MP4, uint8 (T, H, W, 3)."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def ffprobe_frames(path: Path) -> tuple[int, int, int]:
    """(decoded frames, width, height) as ffprobe counts them."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames,width,height",
            "-of",
            "csv=p=0",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    width, height, frames = (int(x) for x in out.split(","))
    return frames, width, height


def encode_image(rgb: np.ndarray, codec: str = "png") -> bytes:
    """PNG (codec png) or JPEG (codec mjpeg) bytes of an RGB image."""
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height = rgb.shape[1], rgb.shape[0]
    ctx.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    if codec != "png":
        frame = frame.reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """A plain (non-fragmented) H.264 MP4 of uint8 (T, H, W, 3) frames."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "qp": "0"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()
