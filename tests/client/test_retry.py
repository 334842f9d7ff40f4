"""Client behaviour against a scripted grpc.aio servicer: retries with backoff for UNAVAILABLE
before a stream's first event, never after it, and never for a refusal."""

from __future__ import annotations

import grpc
import pytest

from client import AsyncClient, Client, ConnectOptions, MagiError, RetryPolicy
from client.retry import Retrier
from tests.client.fakes import SESSION, FakeServer, Script

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)


def connect(target: str, retry: RetryPolicy = FAST) -> ConnectOptions:
    return ConnectOptions(target=target, retry=retry, unary_timeout_s=10)


def test_client_retries_unavailable_before_the_first_event_then_streams():
    script = Script(unavailable_first=2)
    with FakeServer(script) as target, Client(connect(target)) as client:
        chunks = list(client.generate("a red ball", chunks=2))
    assert script.calls["StreamGenerate"] == 3
    assert [c.index for c in chunks] == [0, 1]


async def test_async_client_retries_unavailable_before_the_first_event_then_streams():
    script = Script(unavailable_first=2)
    with FakeServer(script) as target:
        async with AsyncClient(connect(target)) as client:
            stream = client.generate("a red ball", chunks=2)
            chunks = [c async for c in stream]
    assert script.calls["StreamGenerate"] == 3
    assert [c.index for c in chunks] == [0, 1]
    assert stream.session_id == SESSION and stream.finished.state == "FINISHED"


def test_client_gives_up_after_max_attempts_with_unavailable():
    script = Script(unavailable_first=10)
    with FakeServer(script) as target, Client(connect(target)) as client:
        with pytest.raises(MagiError) as caught:
            list(client.generate("a red ball", chunks=1))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.message == "worker restarting"
    assert script.calls["StreamGenerate"] == FAST.max_attempts


def test_client_never_restarts_a_stream_that_already_started():
    script = Script(break_after_started=True)
    with FakeServer(script) as target, Client(connect(target)) as client:
        stream = client.generate("a red ball", chunks=2)
        assert stream.start().session_id == SESSION
        with pytest.raises(MagiError) as caught:
            list(stream)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.session_id == SESSION
    assert script.calls["StreamGenerate"] == 1


async def test_async_client_never_restarts_a_stream_that_already_started():
    script = Script(break_after_started=True)
    with FakeServer(script) as target:
        async with AsyncClient(connect(target)) as client:
            with pytest.raises(MagiError) as caught:
                [c async for c in client.interact("a red ball", chunks=2)]
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert script.calls["Interact"] == 1


def test_client_does_not_retry_a_refusal():
    script = Script(refuse=(grpc.StatusCode.INVALID_ARGUMENT, "width_px: 72 is not allowed"))
    with FakeServer(script) as target, Client(connect(target)) as client:
        with pytest.raises(MagiError) as caught:
            client.generate("a red ball", chunks=1).start()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value) == "INVALID_ARGUMENT: width_px: 72 is not allowed"
    assert script.calls["StreamGenerate"] == 1


def test_sync_interact_retries_with_a_fresh_request_stream():
    script = Script(unavailable_first=1)
    with FakeServer(script) as target, Client(connect(target)) as client:
        with client.interact("a red ball", chunks=1) as stream:
            chunks = list(stream)
    assert script.calls["Interact"] == 2 and len(chunks) == 1


async def test_unary_calls_retry_unavailable_too():
    script = Script(unavailable_first=2)
    with FakeServer(script) as target:
        async with AsyncClient(connect(target)) as client:
            reply = await client.list_models()
    assert reply.default_model == "fake" and script.calls["ListModels"] == 3


def test_client_retries_a_server_that_is_not_listening_yet_then_gives_up():
    with FakeServer() as target:
        pass  # the port is now closed: connection refused is UNAVAILABLE
    with Client(connect(target, RetryPolicy(2, 0.01, 0.01))) as client:
        with pytest.raises(MagiError) as caught:
            client.list_models()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_is_sent_on_every_call():
    script = Script()
    with FakeServer(script) as target:
        options = ConnectOptions(target=target, token="s3cret", retry=FAST)
        with Client(options) as client:
            list(client.generate("a red ball", chunks=1))
    assert script.metadata[0]["authorization"] == "Bearer s3cret"


def test_session_id_is_chosen_by_the_client_and_sent_in_x_session_id_for_routing():
    script = Script()
    with FakeServer(script) as target, Client(ConnectOptions(target=target, retry=FAST)) as c:
        list(c.generate("a red ball", chunks=1))
        list(c.generate("a red ball", chunks=1, session_id="mine-1"))
    generated = script.metadata[0]["x-session-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0  # a uuid4, hex
    assert script.metadata[1]["x-session-id"] == "mine-1"


def test_backoff_grows_to_its_cap_and_retries_share_one_deadline():
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=1, max_backoff_s=3, jitter=0.5)
    assert list(policy.delays_s(rand=lambda: 0.5)) == [1, 2, 3, 3]
    assert list(policy.delays_s(rand=lambda: 0.0)) == [0.5, 1, 1.5, 1.5]
    now = [100.0]
    retrier = Retrier(policy, timeout_s=2.5, what="t", clock=lambda: now[0], rand=lambda: 0.5)
    unavailable = _Error(grpc.StatusCode.UNAVAILABLE)
    assert retrier.timeout_s() == 2.5
    assert retrier.delay_s(unavailable) is not None  # ~1 s, inside the deadline
    now[0] += 1.0
    assert retrier.timeout_s() == 1.5
    assert retrier.delay_s(unavailable) is None  # ~2 s would pass the deadline
    assert Retrier(policy, None, "t").delay_s(_Error(grpc.StatusCode.INTERNAL)) is None


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "test"


def test_a_resume_retries_past_max_attempts_until_resume_for_s_is_spent():
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=1, max_backoff_s=2, jitter=0)
    now = [0.0]
    retrier = Retrier(policy, None, "resume", clock=lambda: now[0], retry_for_s=7.5)
    waits = []
    while (delay := retrier.delay_s(_Error(grpc.StatusCode.UNAVAILABLE))) is not None:
        waits.append(delay)
        now[0] += delay
    assert waits == [1, 2, 2, 2]  # the next 2 s would end past 7.5 s
    assert retrier.timeout_s() is None  # the resumed call keeps the stream's (no) deadline
