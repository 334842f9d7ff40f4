"""No request stalls another's output (issue #18): costly decodes beside a streaming session.

A real server (tiny model, loopback) streams one session alone, then again while other clients
keep sending requests whose inputs are slow to decode (8K RGBA PNGs: inflate plus compositing
over white at full size) and a long prefix video with one keyframe (refused from its packets,
never decoded). Decoding has its own bounded pool, so the stream's largest gap between chunks
stays near its unloaded figure, and every costly request gets an answer: started, or
INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a reason.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib

import av
import grpc
import numpy as np
import pytest

from server.media import PNG_SIGNATURE
from tests.server.helpers import request, stub

# the module shares one server: one xdist worker runs it all (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_stall")

CHUNKS = 8  # of the measured stream
SIZE = 64  # output width and height, pixels
IMAGE_SENDERS = 4  # clients sending 8K PNGs back to back, beside one sending the video
# One decode thread, so decodes take at most one of CI's two cores. The queue holds the
# senders' requests plus one: the burst sent as the load starts meets RESOURCE_EXHAUSTED. A
# pool shared with encoding would put ~5 decodes of ~1.2 s before each chunk.
FLAGS = ("--max-sessions", "1", "--decode-threads", "1", "--decode-queue", "6")
BURST = 3  # extra image requests sent at once as the load starts


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server(*FLAGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 7680x4320 RGBA PNG (5.5 MB): about a second to decode, 0.6 s to build."""
    width, height = 7680, 4320
    x = np.arange(width)
    rows = []
    for y in range(height):
        row = np.empty((width, 4), np.uint8)
        row[:, 0], row[:, 1], row[:, 2], row[:, 3] = (x + y) % 256, x * 3 % 256, y % 256, x ^ y
        rows.append(b"\x00" + row.tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = zlib.compress(b"".join(rows), 1)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def keyframeless_mp4() -> bytes:
    """600 frames at 30 fps with a keyframe only at the start: its tail costs a full decode."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 176, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": "keyint=infinite:scenecut=0"}
        ramp = np.arange(320, dtype=np.uint8)[None, :, None].repeat(176, 0).repeat(3, 2)
        for k in range(600):
            frame = av.VideoFrame.from_ndarray(ramp + np.uint8(k % 200), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


async def chunk_gaps(api, chunks: int = CHUNKS) -> list[float]:
    """Seconds between consecutive chunks of one stream."""
    arrivals = []
    async for event in api.StreamGenerate(request(chunks=chunks, size=SIZE, seed=3)):
        if event.HasField("chunk"):
            arrivals.append(time.monotonic())
    assert len(arrivals) == chunks
    return list(np.diff(arrivals))


async def answer(api, **media) -> tuple[str, str]:
    """(outcome, details) of one costly request; a started session is cancelled at once (with
    one session slot, held by the stream, it is only queued)."""
    call = api.StreamGenerate(request(chunks=1, size=SIZE, **media))
    try:
        async for event in call:
            return ("started", "") if event.HasField("started") else ("other", str(event))
        return "other", "the stream ended without an event"
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details()
    finally:
        call.cancel()


async def keep_sending(api, stop: asyncio.Event, answers: list, **media) -> None:
    """Until stop: one request at a time; the one in flight at stop is still answered."""
    while not stop.is_set():
        outcome = await answer(api, **media)
        answers.append(outcome)
        if outcome[0] == "RESOURCE_EXHAUSTED":
            await asyncio.sleep(1.0)  # as its retry hint asks


async def send_once(api, answers: list, **media) -> None:
    answers.append(await answer(api, **media))


async def test_costly_decodes_do_not_stall_a_streaming_session(server, big_png, keyframeless_mp4):
    async with grpc.aio.insecure_channel(server.address) as channel:
        api = stub(channel)
        await chunk_gaps(api, chunks=2)  # warm-up: the worker's first steps are slower
        baseline = max(await chunk_gaps(api))

        # the video is refused from its packets: no full decode, a reason to act on
        t0 = time.monotonic()
        outcome, details = await answer(api, prefix_video=keyframeless_mp4)
        refusal_s = time.monotonic() - t0
        assert outcome == "INVALID_ARGUMENT" and "keyframe at least every" in details

        stop, answers = asyncio.Event(), []
        load = [
            *(keep_sending(api, stop, answers, image=big_png) for _ in range(IMAGE_SENDERS)),
            keep_sending(api, stop, answers, prefix_video=keyframeless_mp4),
            *(send_once(api, answers, image=big_png) for _ in range(BURST)),
        ]
        tasks = [asyncio.create_task(job) for job in load]
        try:
            await asyncio.sleep(0.5)  # the decode pool is busy before the stream starts
            loaded = max(await chunk_gaps(api))
        finally:
            stop.set()
            failures = [r for r in await asyncio.gather(*tasks, return_exceptions=True) if r]
        assert not failures

    print(
        f"\nmax chunk gap: {baseline:.3f} s alone, {loaded:.3f} s under load; keyframe-less "
        f"video refused in {refusal_s:.3f} s; answers: "
        f"{ {k: sum(a[0] == k for a in answers) for k in {a[0] for a in answers}} }"
    )
    allowed = {"started", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    assert {a[0] for a in answers} <= allowed, [a for a in answers if a[0] not in allowed]
    assert any(a[0] == "started" for a in answers)  # the images really were decoded
    for outcome, details in answers:
        if outcome == "INVALID_ARGUMENT":
            assert "keyframe at least every" in details
        if outcome == "RESOURCE_EXHAUSTED":
            assert "decode pool" in details
    # Decodes share the machine's cores, never the stream's encode thread. A shared pool makes
    # this gap the decode backlog, ~5 x 1.2 s here (6.68 s against 0.24 s in the issue); the
    # bound leaves room for a busy 2-core machine.
    assert loaded < max(4 * baseline, baseline + 2.5), (baseline, loaded)
