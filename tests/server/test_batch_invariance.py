"""Batch invariance through a real server (issue 19): sessions streamed at once, with different
sizes, modes, step counts and prompt timelines, each give the raw frames the same request gives
when it runs alone on that server. The proto's promise: equal requests give equal videos."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from proto import video_generation_pb2 as pb
from tests.server.helpers import encode_image, stub

IMAGE = encode_image(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))
REQUESTS = {
    "small": dict(num_chunks=3, width_px=32, height_px=32, seed=11),
    "switch": dict(
        num_chunks=3,
        width_px=48,
        height_px=32,
        seed=12,
        timeline=[pb.TimelineEntry(text="a red ball"), pb.TimelineEntry(from_chunk=1, text="x")],
    ),
    "i2v": dict(num_chunks=2, width_px=48, height_px=48, seed=13, image=IMAGE),
    "steps4": dict(
        num_chunks=2, width_px=32, height_px=32, seed=14, sampling=pb.Sampling(num_steps=4)
    ),
}


def frames(address: str, name: str, run: str) -> list[bytes]:
    fields = {"timeline": [pb.TimelineEntry(text="a red ball rolls")], **REQUESTS[name]}
    request = pb.GenerateRequest(
        **fields, session_id=f"{name}-{run}", output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24
    )
    with grpc.insecure_channel(address) as channel:
        events = stub(channel).StreamGenerate(request, timeout=120)
        return [e.frame.rgb24 for e in events if e.HasField("frame")]


def test_sessions_streamed_together_give_the_frames_each_gives_alone(server):
    alone = {name: frames(server.address, name, "alone") for name in REQUESTS}
    assert all(len(set(f)) > 1 for f in alone.values())  # real, moving frames
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = {n: pool.submit(frames, server.address, n, "together") for n in REQUESTS}
        together = {n: f.result() for n, f in together.items()}
    for name in REQUESTS:
        assert len(together[name]) == len(alone[name]) == 24 * REQUESTS[name]["num_chunks"]
        assert together[name] == alone[name], f"{name}: frames differ when batched"
