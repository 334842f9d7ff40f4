"""The sync Client is a face over the asyncio one: on the same server situations both give the
same events and the same errors, and the sync face's loop thread comes and goes with its
Client. The server is the scripted grpc.aio fake (fakes.py) on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import pytest

from client import (
    AsyncClient,
    Client,
    ConnectOptions,
    MagiError,
    RetryPolicy,
    TlsOptions,
)
from tests.client.fakes import SESSION, FakeServer, Script

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
REFUSAL = (grpc.StatusCode.INVALID_ARGUMENT, "width_px: 72 is not allowed")
# situation -> (Script fields, generate fields, the status code the stream ends with)
SITUATIONS = {
    "streams to the end": ({}, {}, None),
    "raw frames": ({}, {"raw": True}, None),
    "retried before started": ({"unavailable_first": 2}, {}, None),
    "gives up retrying": ({"unavailable_first": 10}, {}, grpc.StatusCode.UNAVAILABLE),
    "refused": ({"refuse": REFUSAL}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    "broken after started": ({"break_after_started": True}, {}, grpc.StatusCode.UNAVAILABLE),
    "ends before started": ({"opening": "nothing"}, {}, grpc.StatusCode.INTERNAL),
    "a chunk before started": ({"opening": "chunk"}, {}, grpc.StatusCode.INTERNAL),
}


def connect(target: str) -> ConnectOptions:
    return ConnectOptions(target=target, retry=FAST, unary_timeout_s=10)


@dataclass(frozen=True)
class Outcome:
    """What one face saw of one stream, in terms both faces share."""

    items: tuple  # what iteration gave, described
    error: tuple | None  # (code, message, session_id) of the MagiError that ended it
    session_id: str | None
    finished: str | None  # the `finished` state
    calls: dict  # RPC name -> calls the server received


def describe(item) -> tuple:
    """A ChunkEvent or Ack as plain values (fMP4 payloads by length: the fake encodes each
    call's chunks anew)."""
    if hasattr(item, "index"):
        return (
            "chunk",
            item.index,
            item.first_frame,
            item.frame_count,
            (item.width, item.height, item.fps),
            (item.prompt_text, item.prompt_version),
            bool(item.payload),
            item.frames,
        )
    return ("ack", item.text, item.version, item.from_chunk, item.rejection)


def sync_outcome(script: Script, rpc: str, fields: dict) -> Outcome:
    items, error = [], None
    with FakeServer(script) as target, Client(connect(target)) as client:
        stream = getattr(client, rpc)("a red ball", chunks=2, **fields)
        try:
            for item in stream:
                items.append(describe(item))
        except MagiError as e:
            error = (e.code, e.message, e.session_id)
    finished = stream.finished.state if stream.finished else None
    return Outcome(tuple(items), error, stream.session_id, finished, dict(script.calls))


async def async_outcome(script: Script, rpc: str, fields: dict) -> Outcome:
    items, error = [], None
    with FakeServer(script) as target:
        async with AsyncClient(connect(target)) as client:
            stream = getattr(client, rpc)("a red ball", chunks=2, **fields)
            try:
                async for item in stream:
                    items.append(describe(item))
            except MagiError as e:
                error = (e.code, e.message, e.session_id)
    finished = stream.finished.state if stream.finished else None
    return Outcome(tuple(items), error, stream.session_id, finished, dict(script.calls))


@pytest.mark.parametrize("rpc", ["generate", "interact"])
@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_sync_and_async_clients_see_the_same_stream(situation, rpc):
    script_fields, fields, code = SITUATIONS[situation]
    seen = sync_outcome(Script(**script_fields), rpc, fields)
    other = asyncio.run(async_outcome(Script(**script_fields), rpc, fields))
    if script_fields.get("opening") == "nothing":
        # a stream that ends at once may lose its x-session-id header in grpc's trailers-only
        # path; the code and message are what must agree
        seen, other = _without_session_id(seen), _without_session_id(other)
    assert seen == other
    if code is None:
        assert [item[1] for item in seen.items] == [0, 1] and seen.finished == "FINISHED"
    else:
        assert seen.error[0] == code


def _without_session_id(outcome: Outcome) -> Outcome:
    error = None if outcome.error is None else outcome.error[:2]
    return dataclasses.replace(outcome, error=error)


@pytest.mark.parametrize("rpc", ["generate", "interact"])
@pytest.mark.parametrize("opening", ["nothing", "chunk"])
def test_a_stream_without_started_is_internal_on_both_faces_and_not_retried(opening, rpc):
    # The server closed the stream with status OK, or sent a chunk, where `started` belongs:
    # it broke the protocol, which is INTERNAL (as the Assembler's protocol errors are), and
    # an OK status is no reason to try again.
    sync = sync_outcome(Script(opening=opening), rpc, {})
    code, message, session_id = sync.error
    assert code == grpc.StatusCode.INTERNAL and message.startswith("protocol error: the stream")
    # from the x-session-id header; a stream that ends at once may come back trailers-only
    # without it (grpc's choice, not ours)
    assert session_id == SESSION or (opening == "nothing" and session_id is None)
    assert sum(sync.calls.values()) == 1 and sync.items == ()
    other = asyncio.run(async_outcome(Script(opening=opening), rpc, {})).error
    assert other[:2] == sync.error[:2]


def test_sync_and_async_unary_calls_give_the_same_replies_and_errors():
    def sync_calls(target: str) -> tuple:
        with Client(connect(target)) as client:
            with pytest.raises(MagiError) as caught:
                client.get_session("abc")
            return client.list_models(), client.cancel("abc"), _error(caught.value)

    async def async_calls(target: str) -> tuple:
        async with AsyncClient(connect(target)) as client:
            with pytest.raises(MagiError) as caught:
                await client.get_session("abc")
            return await client.list_models(), await client.cancel("abc"), _error(caught.value)

    with FakeServer(Script(unavailable_first=1)) as target:
        sync = sync_calls(target)
    with FakeServer(Script(unavailable_first=1)) as target:
        assert asyncio.run(async_calls(target)) == sync
    assert sync[1] == "CANCELLED" and sync[2][0] == grpc.StatusCode.NOT_FOUND


def _error(error: MagiError) -> tuple:
    return error.code, error.message, error.session_id


# ---- the loop thread ----------------------------------------------------------------------------


def test_a_client_starts_its_thread_at_the_first_call_and_close_ends_it():
    with FakeServer() as target:
        before = set(threading.enumerate())
        client = Client(connect(target))
        assert set(threading.enumerate()) == before  # nothing runs until a call
        list(client.generate("a red ball", chunks=1))
        assert client.list_models().default_model == "fake"
        assert [t.name for t in set(threading.enumerate()) - before] == ["magi-client-loop"]
        client.close()
        assert set(threading.enumerate()) == before
        client.close()  # a second close is a no-op
        with pytest.raises(ValueError, match="closed"):
            client.list_models()


def test_a_started_stream_of_a_closed_client_ends_with_cancelled():
    with FakeServer(Script(hold_after_chunks=1)) as target:
        client = Client(connect(target))
        stream = client.generate("a red ball", chunks=2)
        stream.start()
        client.close()
        with pytest.raises(MagiError) as caught:
            list(stream)
        stream.close()  # nothing left to break: a no-op
    assert caught.value.code == grpc.StatusCode.CANCELLED
    assert caught.value.session_id == SESSION


def test_a_client_dropped_without_close_ends_its_thread():
    with FakeServer() as target:
        before = set(threading.enumerate())
        client = Client(connect(target))
        client.list_models()
        del client
        gc.collect()
        _wait(lambda: set(threading.enumerate()) == before, "the loop thread to end")


def test_a_missing_pem_fails_at_construction_with_no_thread(tmp_path):
    before = set(threading.enumerate())
    tls = TlsOptions(ca_file=tmp_path / "missing.pem")
    with pytest.raises(FileNotFoundError):
        Client(ConnectOptions(target="127.0.0.1:1", tls=tls))
    assert set(threading.enumerate()) == before


def test_close_from_another_thread_ends_an_iterating_stream_with_cancelled():
    script = Script(hold_after_chunks=1)
    with FakeServer(script) as target:
        client = Client(connect(target))
        stream = client.generate("a red ball", chunks=4)
        chunks = []
        with pytest.raises(MagiError) as caught:
            for chunk in stream:
                chunks.append(chunk.index)
                threading.Timer(0.2, client.close).start()
        _wait(lambda: script.broken == 1, "the server to see the stream break")
    assert chunks == [0]
    assert caught.value.code == grpc.StatusCode.CANCELLED
    assert caught.value.session_id == SESSION


def test_breaking_out_of_a_dropped_stream_cancels_its_call():
    script = Script(hold_after_chunks=1)
    with FakeServer(script) as target, Client(connect(target)) as client:
        for _ in client.generate("a red ball", chunks=4):
            break
        # the dropped stream's call is cancelled in the loop thread, where grpc.aio wants it
        _wait(lambda: script.broken == 1, "the server to see the stream break")


def test_a_kept_stream_stays_open_after_a_break_until_close():
    script = Script(chunk_delay_s=0.05)
    with FakeServer(script) as target, Client(connect(target)) as client:
        stream = client.generate("a red ball", chunks=3)
        for chunk in stream:
            first = chunk.index
            break
        rest = [c.index for c in stream]  # as with a grpc call: iterating again goes on
        assert [first, *rest] == [0, 1, 2] and stream.finished.state == "FINISHED"
    held = Script(hold_after_chunks=1)
    with FakeServer(held) as target, Client(connect(target)) as client:
        stream = client.generate("a red ball", chunks=3)
        for _ in stream:
            break
        time.sleep(0.2)
        assert held.broken == 0
        stream.close()
        _wait(lambda: held.broken == 1, "the server to see the stream break")


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs SIGINT to raise KeyboardInterrupt in this thread",
)
def test_ctrl_c_while_iterating_cancels_the_call_and_the_client_still_works():
    script = Script(hold_after_chunks=1)
    main = threading.main_thread().ident
    ctrl_c = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
    with FakeServer(script) as target, Client(connect(target)) as client:
        with client.generate("a red ball", chunks=4) as stream:
            with pytest.raises(KeyboardInterrupt):
                for _ in stream:
                    ctrl_c.start()  # lands while the next read waits in the loop thread
            # the interrupted read was cancelled in the loop, and with it the call
            _wait(lambda: script.broken == 1, "the server to see the stream break")
        assert client.list_models().default_model == "fake"


def test_threads_racing_to_start_a_stream_open_one_call():
    script = Script()
    with FakeServer(script) as target, Client(connect(target)) as client:
        stream = client.interact("a red ball", chunks=1)
        ids = []
        starters = [
            threading.Thread(target=lambda: ids.append(stream.start().session_id)) for _ in range(4)
        ]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        assert len(list(stream)) == 1
    assert ids == [SESSION] * 4 and script.calls["Interact"] == 1


def _wait(predicate, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
