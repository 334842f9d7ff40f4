"""Interact under load: a burst of prompts, a cancel behind it, prompts the session cannot take.

Real server and worker on loopback (the shared tiny-model server). The proto promises one
`prompt_ack` per `ClientEvent.prompt`, in the order sent, and `finished` last; a cancel ends
the session at once, not after the prompts queued before it.

The in-flight bound is checked in-process (the last test), against test_sessions' fake engine
connection: a real engine answers too fast, and a real client's HTTP/2 buffers too large, to
hold thousands of prompts back in a test of a few seconds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import CollectorRegistry

from engine import ipc
from proto import video_generation_pb2 as pb
from server.config import Limits
from server.interact import ClientReader
from server.metrics import Metrics
from server.sessions import SessionManager
from tests.server.helpers import request, stub
from tests.server.test_sessions import FakeEngine, key, open_session, params, queued

BURST = 1000
CHUNKS = 200  # long enough that a session never finishes by itself during a burst
MARK_EVERY = 100  # every 100th prompt of a burst asks for a chunk past the end: a known refusal
PAST_THE_END = "past the session's last chunk"
ENDED = "ended"  # "... ended (cancelled) before this prompt was applied", "... has ended ..."


@pytest.fixture
async def api(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield stub(channel)


@dataclass
class Received:
    at: float  # time.monotonic() when the client read it
    event: pb.GenerateEvent

    @property
    def kind(self) -> str:
        return self.event.WhichOneof("event")


@dataclass
class InteractCall:
    """One Interact call: what the client sends goes through `send`; `events` is what it read."""

    api: object
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    events: list[Received] = field(default_factory=list)
    cancel_sent_at: float | None = None

    async def _client_events(self):
        while (event := await self.outbox.get()) is not None:
            if event.HasField("cancel"):
                self.cancel_sent_at = time.monotonic()
            yield event

    def start(self, chunks: int, **fields) -> None:
        self.outbox.put_nowait(pb.ClientEvent(start=request(chunks=chunks, size=32, **fields)))
        self.call = self.api.Interact(self._client_events())
        self._reading = self.call.__aiter__()

    def send(self, *events: pb.ClientEvent | None) -> None:
        for event in events:
            self.outbox.put_nowait(event)  # None half-closes

    async def read_until(self, done) -> Received:
        async for event in self._reading:
            self.events.append(Received(time.monotonic(), event))
            if done(self.events[-1]):
                return self.events[-1]
        raise AssertionError(f"the call ended first ({len(self.events)} events read)")

    async def read_to_end(self) -> None:
        async for event in self._reading:
            self.events.append(Received(time.monotonic(), event))
        self.outbox.put_nowait(None)
        assert await self.call.code() == grpc.StatusCode.OK

    def of(self, kind: str) -> list[Received]:
        return [e for e in self.events if e.kind == kind]

    def acks(self) -> list[pb.PromptAck]:
        return [e.event.prompt_ack for e in self.of("prompt_ack")]


def burst(n: int = BURST) -> list[pb.ClientEvent]:
    """n prompts; every MARK_EVERY-th asks for a chunk past the end, so its ack is known."""
    return [
        pb.ClientEvent(
            prompt=pb.PromptUpdate(text=f"prompt {i}", from_chunk=10**6)
            if i % MARK_EVERY == MARK_EVERY - 1
            else pb.PromptUpdate(text=f"prompt {i}")
        )
        for i in range(n)
    ]


def assert_one_ack_each_in_order(acks: list[pb.PromptAck], n: int) -> list[int]:
    """Exactly n acks, each accepted or rejected with a reason, in the order sent; the
    versions given, which the engine numbers in the order it applies prompts."""
    assert len(acks) == n
    for i, ack in enumerate(acks):
        assert (ack.prompt_version > 0) != bool(ack.rejection), (i, ack)
        if i % MARK_EVERY == MARK_EVERY - 1:
            assert ack.prompt_version == 0 and (
                PAST_THE_END in ack.rejection or ENDED in ack.rejection
            ), (i, ack)
    versions = [a.prompt_version for a in acks if a.prompt_version]
    assert versions == list(range(2, 2 + len(versions)))  # the start's timeline is version 1
    first_ended = next((i for i, a in enumerate(acks) if ENDED in a.rejection), n)
    assert not any(a.prompt_version for a in acks[first_ended:])  # nothing applied after the end
    return versions


async def test_a_burst_of_prompts_and_a_cancel_gets_every_ack_in_order_and_ends_at_once(api):
    call = InteractCall(api)
    call.start(CHUNKS)
    await call.read_until(lambda e: e.kind == "chunk")  # running, with chunks flowing
    call.send(*burst(), pb.ClientEvent(cancel=pb.CancelSessionRequest()))
    await call.read_to_end()

    assert call.events[-1].kind == "finished"
    assert call.events[-1].event.finished.state == pb.SESSION_STATE_CANCELLED
    assert_one_ack_each_in_order(call.acks(), BURST)
    # The cancel did not wait behind the prompts' answers: after it came at most the chunks
    # made while the server read the burst, those queued for the stream (two) and one in
    # transit; not the other ~190 (before: one prompt per engine step, and the session ran out).
    after = [e for e in call.of("chunk") if e.at > call.cancel_sent_at]
    assert len(after) <= 6, [e.event.chunk.chunk_index for e in after]
    assert call.events[-1].at - call.cancel_sent_at < 8.0  # seconds; 0.3-0.5 s here


async def test_a_burst_of_prompts_is_applied_within_a_few_engine_steps(api):
    call = InteractCall(api)
    call.start(CHUNKS)
    await call.read_until(lambda e: e.kind == "chunk")
    sid = call.events[0].event.started.session_id
    call.send(*burst())
    await call.read_until(lambda e: len(call.of("prompt_ack")) == BURST)

    versions = assert_one_ack_each_in_order(call.acks(), BURST)
    assert len(versions) == BURST - BURST // MARK_EVERY  # all but the marked ones applied
    # One prompt per engine step would have taken a thousand steps; the engine applies every
    # prompt waiting before its next step, so the whole burst lands within a few chunks.
    in_burst = [e for e in call.of("chunk") if e.at > call.of("chunk")[0].at]
    assert len(in_burst) <= 20, len(in_burst)
    # The last prompt steers from the chunk its ack names, and the session's record is current.
    last = call.acks()[-2]  # the very last is a marked one
    steered = await call.read_until(
        lambda e: e.kind == "chunk" and e.event.chunk.chunk_index >= last.from_chunk
    )
    assert steered.event.chunk.prompt_version == last.prompt_version
    assert steered.event.chunk.prompt_text == f"prompt {BURST - 2}"
    info = await api.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.prompt_version == last.prompt_version
    assert info.timeline[-1].version == last.prompt_version
    call.send(pb.ClientEvent(cancel=pb.CancelSessionRequest()))
    await call.read_to_end()
    assert call.events[-1].kind == "finished"


async def test_prompts_after_the_last_steerable_chunk_are_rejected_before_finished(api):
    chunks = 4
    call = InteractCall(api)
    # 64 Euler steps a chunk (the model's 8 by default): the last chunk denoises for a while
    # (about a second here) after it entered the window, time to push prompts before the end
    call.start(chunks, sampling=pb.Sampling(num_steps=64))
    reading = asyncio.create_task(call.read_to_end())
    while not call.events:
        await asyncio.sleep(0.01)
    sid = call.events[0].event.started.session_id
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:  # every chunk has entered, the last ones still denoise
        info = await api.GetSession(pb.GetSessionRequest(session_id=sid))
        assert info.state in (pb.SESSION_STATE_QUEUED, pb.SESSION_STATE_RUNNING)
        if info.state == pb.SESSION_STATE_RUNNING and info.next_steerable_chunk == chunks:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError(f"session {sid} never ran with every chunk in its window")
    # Sent as the session is about to finish: the engine refuses them (no chunk left), or the
    # session finishes while they are on their way; either way each is answered before
    # `finished`, in order.
    late = 300
    call.send(*[pb.ClientEvent(prompt=pb.PromptUpdate(text=f"late {i}")) for i in range(late)])
    call.send(None)  # half-close: the session runs on to its end
    await reading

    kinds = [e.kind for e in call.events]
    assert kinds[-1] == "finished" and kinds.count("finished") == 1
    assert call.events[-1].event.finished.state == pb.SESSION_STATE_FINISHED
    acks = call.acks()
    assert len(acks) == late
    for ack in acks:
        assert ack.prompt_version == 0 and ack.session_id == sid
        assert "nothing to steer" in ack.rejection or ENDED in ack.rejection, ack.rejection
    assert [e.event.chunk.prompt_version for e in call.of("chunk")] == [1] * chunks


async def test_a_stream_reads_no_further_than_its_in_flight_limit_and_drops_nothing():
    engine = FakeEngine()
    manager = SessionManager(engine, Metrics(CollectorRegistry()), ttl_s=60.0, startup_timeout_s=1)
    engine.on_event, engine.on_lost = manager.on_event, manager.on_worker_lost
    session = await open_session(engine, manager, params(session_id="s", num_chunks=50))
    pulled = 0

    async def client_events():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield pb.ClientEvent(prompt=pb.PromptUpdate(text=f"prompt {i}"))

    async def settle():  # let the reader and the acker run as far as they can
        for _ in range(100):
            await asyncio.sleep(0)

    reader = ClientReader(session, manager, Limits(), max_in_flight=8)
    reader.start(client_events())
    acks: list[pb.PromptAck] = []
    answered = 1  # engine.sent[0] opened the session
    while len(acks) < 24:
        await settle()
        assert pulled - len(acks) == 8  # read no further than the limit
        commands, answered = engine.sent[answered:], len(engine.sent)
        # answered newest first: the acks still go out in the order read
        for command in reversed(commands):
            version = 2 + int(command.text.split()[-1])
            engine.answer(ipc.PromptApplied(command.request_id, key("s"), 3, version, None))
        await settle()
        for ack in queued(session):
            acks.append(ack)
            reader.sent()  # the stream handed it to gRPC: a slot is free
    assert [a.prompt_version for a in acks] == list(range(2, 26))
    # Eight more are read and on their way to the engine when the session is cancelled: each
    # is answered, in order, and the prompts the server never read are left to `finished`.
    await settle()
    assert pulled == 32
    manager.cancel(manager.get("s"), "cancelled by the client")
    late = await reader.close()
    assert len(late) == 8 and all("ended (cancelled)" in a.rejection for a in late)
    assert pulled == 32
    reader.stop()
