"""Bytes that are not a valid message for the method end as INVALID_ARGUMENT, and are counted.

gRPC itself would answer such a call with UNKNOWN before any interceptor ran; the server
parses the bytes inside its status interceptor instead. Sent over raw channels (no
serializer), on the shared real server.
"""

from __future__ import annotations

import grpc
import pytest

from proto import video_generation_pb2 as pb
from tests.server.conftest import wait_for
from tests.server.helpers import request

SERVICE = "/magistream.v1.VideoGeneration/"
CORRUPT = b"\xff\xff\xff\xff\xff\xff"  # a field tag whose varint never ends
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # GetSessionRequest.session_id that is not UTF-8
# ClientEvent.prompt whose text is not UTF-8
BAD_PROMPT = b"\x12\x04" + b"\x12\x02\xff\xfe"


@pytest.fixture
async def channel(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


def calls(server, method: str, code: str) -> float:
    return server.metric("magistream_grpc_calls_total", f'code="{code}",method="{SERVICE}{method}"')


def raw(channel: grpc.aio.Channel, kind: str, method: str):
    """A multicallable that sends and receives bytes as they are."""
    return getattr(channel, kind)(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value


def counted(server, method: str, before: float) -> None:
    wait_for(
        lambda: calls(server, method, "INVALID_ARGUMENT") == before + 1,
        what=f"{method}'s refusal in magistream_grpc_calls",
    )


@pytest.mark.parametrize("garbage", [CORRUPT, BAD_UTF8], ids=["corrupt", "bad_utf8"])
async def test_unary_garbage_is_invalid_argument_and_counted(server, channel, garbage):
    before = calls(server, "GetSession", "INVALID_ARGUMENT")
    error = await refused(raw(channel, "unary_unary", "GetSession")(garbage, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "could not be parsed as a magistream.v1.GetSessionRequest" in error.details()
    counted(server, "GetSession", before)
    # bytes that do parse still reach the handler as before (an unknown session)
    valid = pb.GetSessionRequest(session_id="nobody").SerializeToString()
    error = await refused(raw(channel, "unary_unary", "GetSession")(valid, timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_server_streaming_garbage_is_invalid_argument_and_counted(server, channel):
    before = calls(server, "StreamGenerate", "INVALID_ARGUMENT")
    error = await refused(raw(channel, "unary_stream", "StreamGenerate")(CORRUPT, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "could not be parsed as a magistream.v1.GenerateRequest" in error.details()
    counted(server, "StreamGenerate", before)


async def test_interact_garbage_first_is_invalid_argument_and_counted(server, channel):
    before = calls(server, "Interact", "INVALID_ARGUMENT")
    error = await refused(raw(channel, "stream_stream", "Interact")(iter([CORRUPT]), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "could not be parsed as a magistream.v1.ClientEvent" in error.details()
    counted(server, "Interact", before)


async def test_interact_garbage_after_a_good_start_ends_the_call_invalid_argument(server, channel):
    before = calls(server, "Interact", "INVALID_ARGUMENT")
    # 8 chunks: the session is still running when the garbage is read, a moment after start
    start = pb.ClientEvent(start=request(chunks=8)).SerializeToString()
    call = raw(channel, "stream_stream", "Interact")(iter([start, BAD_PROMPT]), timeout=30)
    error = await refused(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "could not be parsed as a magistream.v1.ClientEvent" in error.details()
    counted(server, "Interact", before)
    wait_for(lambda: server.metric("magistream_sessions_active") == 0, 30, what="its session freed")
