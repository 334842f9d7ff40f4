"""The VideoGeneration RPCs end to end: a real server process and worker over loopback."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from proto import video_generation_pb2 as pb
from server import media
from tests.server.conftest import wait_for
from tests.server.helpers import (
    PROMPT,
    chunks,
    decode_mp4,
    encode_image,
    encode_mp4,
    ffprobe_frames,
    fmp4,
    kinds,
    request,
    stub,
)


@pytest.fixture
async def api(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield stub(channel)


async def next_chunk(call) -> pb.Chunk:
    async for event in call:
        if event.WhichOneof("event") == "chunk":
            return event.chunk
    raise AssertionError("the stream ended before another chunk")


async def test_t2v_fmp4_stream_is_one_playable_mp4_with_every_frame(api, tmp_path):
    call = api.StreamGenerate(request(chunks=2, size=64))
    events = [e async for e in call]
    assert await call.code() == grpc.StatusCode.OK
    assert kinds(events) == ["started", "chunk", "chunk", "finished"]
    started, finished = events[0].started, events[-1].finished
    sid = dict(await call.initial_metadata())["x-session-id"]
    assert started.session_id == sid and started.params.seed == 1
    assert started.params.width_px == 64 and started.params.timeline[0].version == 1
    got = chunks(events)
    assert [c.chunk_index for c in got] == [0, 1]
    assert [c.first_frame_index for c in got] == [0, 24]
    assert got[0].init_segment and not got[1].init_segment
    assert all(c.prompt_text == PROMPT and c.prompt_version == 1 for c in got)
    assert all(c.timings.denoise_ms > 0 and c.timings.encode_ms > 0 for c in got)
    assert finished.state == pb.SESSION_STATE_FINISHED and finished.status_code == 0
    assert finished.stats.chunks_done == 2 and finished.stats.frames_done == 48
    (tmp_path / "out.mp4").write_bytes(fmp4(events))
    assert ffprobe_frames(tmp_path / "out.mp4") == (48, 64, 64)
    assert decode_mp4(fmp4(events)).shape == (48, 64, 64, 3)


async def test_raw_rgb24_frames_reassemble_in_order(api):
    req = request(chunks=1, size=32, output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24)
    events = [e async for e in api.StreamGenerate(req)]
    assert kinds(events) == ["started", "chunk", *["frame"] * 24, "finished"]
    header, frames = events[1].chunk, [e.frame for e in events[2:-1]]
    assert header.frame_count == 24 and not header.media_segment and not header.init_segment
    assert [f.frame_index for f in frames] == list(range(24))
    assert [f.last_in_chunk for f in frames] == [False] * 23 + [True]
    video = np.frombuffer(b"".join(f.rgb24 for f in frames), np.uint8).reshape(24, 32, 32, 3)
    assert video.std() > 0  # real pixels, not padding


async def test_same_request_and_seed_gives_the_same_video(api):
    req = request(chunks=1, size=32, output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24, seed=42)
    a = [e.frame.rgb24 for e in [e async for e in api.StreamGenerate(req)] if e.HasField("frame")]
    b = [e.frame.rgb24 for e in [e async for e in api.StreamGenerate(req)] if e.HasField("frame")]
    assert a == b


async def test_prompt_pushed_mid_stream_steers_from_the_reported_chunk(api):
    call = api.StreamGenerate(request(chunks=0, session_id="steer-1"))
    first = await next_chunk(call)
    assert first.prompt_version == 1
    ack = await api.UpdatePrompt(pb.PromptUpdate(session_id="steer-1", text="a blue cube"))
    assert ack.prompt_version == 2 and ack.from_chunk > first.chunk_index
    seen = [first]
    while seen[-1].chunk_index < ack.from_chunk + 1:
        seen.append(await next_chunk(call))
    for c in seen:
        want = (2, "a blue cube") if c.chunk_index >= ack.from_chunk else (1, PROMPT)
        assert (c.prompt_version, c.prompt_text) == want, c.chunk_index
    info = await api.GetSession(pb.GetSessionRequest(session_id="steer-1"))
    assert info.prompt_version == 2 and info.state == pb.SESSION_STATE_RUNNING
    assert [(t.from_chunk, t.version) for t in info.timeline] == [(0, 1), (ack.from_chunk, 2)]
    assert info.next_steerable_chunk > ack.from_chunk
    reply = await api.CancelSession(pb.CancelSessionRequest(session_id="steer-1"))
    assert reply.state == pb.SESSION_STATE_CANCELLED
    rest = [e async for e in call]
    assert rest[-1].finished.state == pb.SESSION_STATE_CANCELLED
    assert await call.code() == grpc.StatusCode.OK


async def test_interact_starts_steers_and_cancels_on_one_stream(api):
    outbox: asyncio.Queue = asyncio.Queue()

    async def client_events():
        while (event := await outbox.get()) is not None:
            yield event

    await outbox.put(pb.ClientEvent(start=request(chunks=50)))
    call = api.Interact(client_events())
    events = call.__aiter__()
    started = (await anext(events)).started
    assert started.session_id
    await outbox.put(pb.ClientEvent(prompt=pb.PromptUpdate(text="now it is green")))
    await outbox.put(pb.ClientEvent(prompt=pb.PromptUpdate(text="x", from_chunk=10**6)))
    acks, chunk_list = [], []
    while len(acks) < 2 or not chunk_list or chunk_list[-1].chunk_index < acks[0].from_chunk:
        event = await anext(events)
        if event.HasField("prompt_ack"):
            acks.append(event.prompt_ack)
        elif event.HasField("chunk"):
            chunk_list.append(event.chunk)
    assert acks[0].prompt_version == 2 and not acks[0].rejection
    assert acks[1].prompt_version == 0 and "past the session's last chunk" in acks[1].rejection
    assert chunk_list[-1].prompt_version == 2
    await outbox.put(pb.ClientEvent(cancel=pb.CancelSessionRequest()))
    rest = [e async for e in events]
    assert rest[-1].finished.state == pb.SESSION_STATE_CANCELLED
    await outbox.put(None)
    assert await call.code() == grpc.StatusCode.OK


async def test_breaking_an_interact_call_cancels_its_session(api, server):
    async def start_then_wait():
        yield pb.ClientEvent(start=request(chunks=0))
        await asyncio.sleep(60)

    call = api.Interact(start_then_wait())
    await next_chunk(call)
    sid = dict(await call.initial_metadata())["x-session-id"]
    call.cancel()
    info = await _wait_state(api, sid, pb.SESSION_STATE_CANCELLED)
    assert "disconnected" in info.status_message
    assert "never retrieved" not in server.logs()


async def test_interact_refuses_a_malformed_sequence(api):
    async def second_start():
        yield pb.ClientEvent(start=request(chunks=0))
        yield pb.ClientEvent(start=request(chunks=0))

    call = api.Interact(second_start())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already running" in info.value.details()
    sid = dict(await call.initial_metadata())["x-session-id"]
    await _wait_state(api, sid, pb.SESSION_STATE_CANCELLED)

    async def prompt_first():
        yield pb.ClientEvent(prompt=pb.PromptUpdate(text="x"))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in api.Interact(prompt_first()):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be start" in info.value.details()


PNG_BOMB = (
    media.PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR" + (50_000).to_bytes(4, "big") * 2 + bytes(100)
)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"width_px": 100}, "width_px"),
        ({"height_px": 512}, "height_px"),
        ({"num_chunks": 2, "timeline": [pb.TimelineEntry(text="")]}, "timeline[0].text"),
        ({"timeline": [pb.TimelineEntry(text="x" * 201)]}, "timeline[0].text"),
        ({"image": b"not an image"}, "image"),
        ({"image": PNG_BOMB}, "image"),  # 50000 x 50000 px claimed in the header
        ({"prefix_video": b"not an mp4 at all"}, "prefix_video"),
        ({"model": "nope"}, "model"),
        ({"mode": pb.GENERATION_MODE_V2V}, "mode"),
        ({"mode": 9}, "mode"),
        ({"output_encoding": 7}, "output_encoding"),
        ({"session_id": "bad id!"}, "session_id"),
        ({"sampling": pb.Sampling(num_steps=6)}, "sampling.num_steps"),
        ({"sampling": pb.Sampling(num_steps=1000)}, "sampling.num_steps"),
        ({"sampling": pb.Sampling(text_guidance_scales=[1.0])}, "sampling.text_guidance_scales"),
        (
            {"sampling": pb.Sampling(shortcut_mode=pb.SHORTCUT_MODE_16_16_8)},
            "sampling.shortcut_mode",
        ),
    ],
)
async def test_invalid_requests_name_the_field_and_leave_running_sessions_alone(
    api, changes, field
):
    running = api.StreamGenerate(request(chunks=0))
    before = await next_chunk(running)
    req = request(chunks=2)
    for key, value in changes.items():
        if key == "timeline":
            del req.timeline[:]
            req.timeline.extend(value)
        elif key == "sampling":
            req.sampling.CopyFrom(value)
        else:
            setattr(req, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in api.StreamGenerate(req):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:")
    after = await next_chunk(running)
    assert after.chunk_index == before.chunk_index + 1
    running.cancel()


async def test_unknown_sessions_are_not_found(api):
    for rpc, message in (
        (api.GetSession, pb.GetSessionRequest(session_id="nobody")),
        (api.CancelSession, pb.CancelSessionRequest(session_id="nobody")),
        (api.UpdatePrompt, pb.PromptUpdate(session_id="nobody", text="x")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(message)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_session_id_in_use_is_refused_and_ended_sessions_refuse_prompts(api):
    events = [e async for e in api.StreamGenerate(request(chunks=1, session_id="dup-1"))]
    assert events[-1].finished.state == pb.SESSION_STATE_FINISHED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in api.StreamGenerate(request(chunks=1, session_id="dup-1")):
            pass
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.UpdatePrompt(pb.PromptUpdate(session_id="dup-1", text="late"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reply = await api.CancelSession(pb.CancelSessionRequest(session_id="dup-1"))
    assert reply.state == pb.SESSION_STATE_FINISHED  # idempotent on an ended session


async def test_client_cancel_ends_and_frees_the_session(api, server):
    call = api.StreamGenerate(request(chunks=0))
    await next_chunk(call)
    sid = dict(await call.initial_metadata())["x-session-id"]
    call.cancel()
    info = await _wait_state(api, sid, pb.SESSION_STATE_CANCELLED)
    assert info.status_code == grpc.StatusCode.CANCELLED.value[0]
    assert "disconnected" in info.status_message
    await asyncio.to_thread(
        wait_for, lambda: server.metric("magistream_sessions_active") == 0, 10, "no active sessions"
    )
    await asyncio.to_thread(
        wait_for, lambda: server.metric("magistream_memory_reserved_bytes") == 0, 10, "memory freed"
    )


async def test_a_deadline_ends_the_call_and_frees_the_session(api):
    call = api.StreamGenerate(request(chunks=0), timeout=1.5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    sid = dict(await call.initial_metadata())["x-session-id"]
    info = await _wait_state(api, sid, pb.SESSION_STATE_CANCELLED)
    assert info.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


async def test_i2v_from_a_png_and_v2v_from_an_mp4(api):
    image = encode_image(np.full((40, 50, 3), 128, np.uint8))
    events = [e async for e in api.StreamGenerate(request(chunks=1, image=image))]
    assert events[0].started.params.mode == pb.GENERATION_MODE_I2V
    assert [c.frame_count for c in chunks(events)] == [24]
    video = encode_mp4(np.random.default_rng(0).integers(0, 255, (40, 48, 80, 3), np.uint8), 30)
    events = [e async for e in api.StreamGenerate(request(chunks=2, prefix_video=video))]
    assert events[0].started.params.mode == pb.GENERATION_MODE_V2V
    got = chunks(events)
    assert [(c.chunk_index, c.first_frame_index, c.frame_count) for c in got] == [
        (0, 0, 13),
        (1, 13, 24),
    ]
    assert decode_mp4(fmp4(events)).shape == (37, 64, 64, 3)


async def test_list_models_describes_the_served_model(api):
    reply = await api.ListModels(pb.ListModelsRequest())
    (info,) = reply.models
    assert reply.default_model == info.name == "tiny" and info.preset == "tiny"
    assert info.fps == 24 and info.frames_per_chunk == 24 and info.window_size == 4
    assert info.resolution.max_width_px == 256 and info.resolution.multiple_of_px == 16
    assert info.default_sampling.num_steps == 8 and info.cfg_number == 3
    assert list(info.modes) == [
        pb.GENERATION_MODE_T2V,
        pb.GENERATION_MODE_I2V,
        pb.GENERATION_MODE_V2V,
    ]


async def _wait_state(api, sid: str, state: int, timeout_s: float = 10) -> pb.SessionInfo:
    for _ in range(int(timeout_s / 0.05)):
        info = await api.GetSession(pb.GetSessionRequest(session_id=sid))
        if info.state == state:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"session {sid} never reached state {state}: {info}")
