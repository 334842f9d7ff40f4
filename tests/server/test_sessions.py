"""SessionManager in-process, against a fake engine connection: no server or worker process.

The fake stands in for server.supervisor.Supervisor: it keeps the commands the manager sends,
and the test answers them with engine events by calling the manager's handlers on the event
loop, as the supervisor does with what its reader thread hands over. The real-process tests in
test_service.py and test_app.py check the same paths end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from engine import ipc
from scheduler.session import SessionParams, SessionState
from server.auth import ANONYMOUS
from server.errors import (
    InvalidRequest,
    NotSteerable,
    ServerFull,
    SessionExists,
    SessionNotFound,
    SnapshotUnusable,
    Unavailable,
)
from server.metrics import Metrics
from server.sessions import LiveSession, SessionEnd, SessionManager, session_key
from server.validation import PromptSpec

PROMPT = "a red ball rolls"
FRAMES = 4  # frames per fake chunk
SIZE = 16  # pixels per side of a fake chunk


class FakeEngine:
    """What SessionManager uses of a Supervisor: send, wait_ready, ready; and the two callbacks
    the supervisor makes into the manager (engine events, worker loss)."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()  # set: the worker is up and answering
        self.ready.set()
        self.sent: list[ipc.Command] = []  # every command, in order
        self._unread: asyncio.Queue[ipc.Command] = asyncio.Queue()
        self.on_event: Callable[[ipc.Event], None] = lambda message: None
        self.on_lost: Callable[[str], None] = lambda reason: None

    def send(self, command: ipc.Command) -> None:
        if not self.ready.is_set():  # as the Supervisor: no worker, no command
            raise Unavailable("the worker is restarting; retry shortly")
        self.sent.append(command)
        self._unread.put_nowait(command)

    async def wait_ready(self, timeout_s: float | None) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except TimeoutError:
            raise Unavailable("the worker is not ready; retry shortly") from None

    async def command(self) -> ipc.Command:
        """The next command the manager sent, once it has sent it."""
        return await asyncio.wait_for(self._unread.get(), 1.0)

    def answer(self, *events: ipc.Event) -> None:
        """Deliver events in order within one loop tick, as a burst from the reader thread."""
        for message in events:
            self.on_event(message)

    def die(self, reason: str) -> None:
        self.ready.clear()
        self.on_lost(reason)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def manager(engine: FakeEngine, registry: CollectorRegistry) -> SessionManager:
    manager = SessionManager(engine, Metrics(registry), ttl_s=60.0, startup_timeout_s=1.0)
    engine.on_event, engine.on_lost = manager.on_event, manager.on_worker_lost
    return manager


def params(session_id: str = "", seed: int | None = 7, **fields: object) -> SessionParams:
    fields.setdefault("num_chunks", 3)
    return SessionParams(
        session_id=session_id,
        prompts=((0, PROMPT),),
        height=64,
        width=64,
        seed=seed,
        **fields,
    )


def key(session_id: str) -> str:
    """The engine's name for a session the tests open (as the anonymous principal)."""
    return session_key(ANONYMOUS, session_id)


def chunk(session_id: str, index: int) -> ipc.ChunkReady:
    return ipc.ChunkReady(
        session_id=session_id,
        chunk_index=index,
        first_frame=index * FRAMES,
        frame_count=FRAMES,
        height=SIZE,
        width=SIZE,
        frames=bytes([index]) * (FRAMES * SIZE * SIZE * 3),
        prompt_text=PROMPT,
        prompt_version=1,
        queue_s=0.0,
        denoise_s=0.01,
        decode_s=0.01,
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def queued(session: LiveSession) -> list[object]:
    """What the session's stream would read now, without waiting for more."""
    items = []
    while not session._events.empty():
        items.append(session._events.get_nowait())
    return items


async def open_session(
    engine: FakeEngine, manager: SessionManager, request: SessionParams, queue_position: int = 0
) -> LiveSession:
    """Open a session and answer the engine's side: opened, at this place in the queue."""
    opening = asyncio.create_task(manager.open(request))
    command = await engine.command()
    engine.answer(ipc.SessionOpened(command.request.session_id, queue_position))
    return await opening


async def open_refused(engine: FakeEngine, manager: SessionManager, reason: str) -> Exception:
    opening = asyncio.create_task(manager.open(params(session_id="s")))
    await engine.command()
    engine.answer(ipc.OpenRefused(key("s"), reason, "no room for 64x64 now"))
    with pytest.raises(Exception) as caught:
        await opening
    return caught.value


# ---- open -------------------------------------------------------------------------------------


async def test_open_sends_the_request_with_id_and_seed_set_and_retains_no_image(engine, manager):
    image = np.zeros((64, 64, 3), np.uint8)
    opening = asyncio.create_task(manager.open(params(seed=None, mode="i2v", image=image)))
    command = await engine.command()
    assert isinstance(command, ipc.OpenSession)
    sent = command.request
    assert sent.session_id and sent.seed is not None
    assert sent.image is image  # the engine gets the decoded input
    command.request.check_openable()
    engine.answer(ipc.SessionOpened(sent.session_id, 0))
    session = await opening
    assert session.key == sent.session_id and session.seed == sent.seed
    assert session.spec.image is None and session.spec.video is None
    assert session.spec == SessionParams(**{**vars(sent), "image": None})
    assert manager.get(session.id) is session
    assert engine.sent == [command]


async def test_open_keeps_the_session_id_and_seed_the_request_names(engine, manager):
    session = await open_session(engine, manager, params(session_id="mine", seed=42))
    sent = engine.sent[0].request
    assert sent.session_id == key("mine") and sent.seed == 42  # ids are per principal
    assert session.id == "mine" and session.seed == 42


async def test_open_answered_at_once_leaves_the_session_running(engine, manager, registry):
    session = await open_session(engine, manager, params(), queue_position=0)
    assert session.state == SessionState.RUNNING and session.queue_position == 0
    assert sample(registry, "magistream_sessions_active") == 1
    assert sample(registry, "magistream_sessions_queued") == 0


async def test_open_answered_with_a_place_leaves_the_session_queued_until_admitted(
    engine, manager, registry
):
    session = await open_session(engine, manager, params(session_id="s"), queue_position=2)
    assert session.state == SessionState.QUEUED and session.queue_position == 2
    assert sample(registry, "magistream_sessions_queued") == 1
    assert sample(registry, "magistream_sessions_active") == 0

    engine.answer(ipc.SessionProgress(key("s"), SessionState.QUEUED, 1, 0))
    assert session.queue_position == 1
    engine.answer(ipc.SessionProgress(key("s"), SessionState.RUNNING, 0, 2))
    assert session.state == SessionState.RUNNING and session.queue_position == 0
    assert session.next_steerable_chunk == 2
    assert sample(registry, "magistream_sessions_queued") == 0
    assert sample(registry, "magistream_sessions_active") == 1


async def test_open_refused_full_raises_server_full_with_a_retry_hint(engine, manager):
    error = await open_refused(engine, manager, "full")
    assert isinstance(error, ServerFull)
    assert error.retry_after_ms == 2000  # no chunk timed yet: two 1 s chunks
    assert error.trailing_metadata() == (("retry-after-ms", "2000"),)
    assert "no room for 64x64 now" in str(error)
    assert manager.sessions == {}


async def test_open_refused_invalid_raises_invalid_request(engine, manager):
    error = await open_refused(engine, manager, "invalid")
    assert isinstance(error, InvalidRequest) and "no room for 64x64 now" in str(error)
    assert manager.sessions == {}


async def test_open_refused_internal_raises_an_internal_error(engine, manager):
    error = await open_refused(engine, manager, "internal")
    # not a ServiceError: the interceptor reports any other exception as INTERNAL
    assert type(error) is RuntimeError and "no room for 64x64 now" in str(error)
    with pytest.raises(SessionNotFound):
        manager.get("s")


async def test_open_with_a_session_id_in_use_raises_session_exists(engine, manager):
    first = await open_session(engine, manager, params(session_id="taken"))
    with pytest.raises(SessionExists, match="taken"):
        await manager.open(params(session_id="taken"))
    assert len(engine.sent) == 1
    assert manager.get("taken") is first and not first.ended


async def test_only_the_first_of_two_opens_waiting_for_the_worker_claims_an_id(engine, manager):
    engine.ready.clear()
    first = asyncio.create_task(manager.open(params(session_id="s")))
    second = asyncio.create_task(manager.open(params(session_id="s")))
    await asyncio.sleep(0)
    assert manager.sessions == {} and engine.sent == []
    engine.ready.set()
    await engine.command()
    engine.answer(ipc.SessionOpened(key("s"), 0))
    with pytest.raises(SessionExists):
        await second
    assert (await first).id == "s"
    assert len(engine.sent) == 1


async def test_open_fails_unavailable_when_the_worker_is_not_up_in_time(engine, manager):
    engine.ready.clear()
    manager.startup_timeout_s = 0.01
    with pytest.raises(Unavailable):
        await manager.open(params(session_id="s"))
    assert manager.sessions == {} and engine.sent == []


async def test_a_client_leaving_while_its_session_opens_cancels_it(engine, manager):
    opening = asyncio.create_task(manager.open(params(session_id="s")))
    await engine.command()
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert await engine.command() == ipc.CancelSession(key("s"))
    assert manager.get("s").state == SessionState.CANCELLED
    engine.answer(ipc.SessionOpened(key("s"), 0))  # the worker's late answer changes nothing
    assert manager.get("s").state == SessionState.CANCELLED


async def test_an_end_delivered_with_the_open_answer_keeps_the_session_ended(engine, manager):
    opening = asyncio.create_task(manager.open(params(session_id="s")))
    await engine.command()
    engine.answer(
        ipc.SessionOpened(key("s"), 0),
        ipc.SessionEnded(key("s"), SessionState.FAILED, "engine step failed: boom"),
    )
    session = await opening
    assert session.ended
    assert session.state == SessionState.FAILED


async def test_an_admission_delivered_with_the_open_answer_leaves_it_running(
    engine, manager, registry
):
    opening = asyncio.create_task(manager.open(params(session_id="s")))
    await engine.command()
    engine.answer(
        ipc.SessionOpened(key("s"), 1), ipc.SessionProgress(key("s"), SessionState.RUNNING, 0, 0)
    )
    session = await opening
    assert session.state == SessionState.RUNNING and session.queue_position == 0
    assert sample(registry, "magistream_sessions_active") == 1


# ---- draining ---------------------------------------------------------------------------------


async def test_draining_refuses_new_opens_and_keeps_live_sessions(engine, manager):
    live = await open_session(engine, manager, params(session_id="live"))
    manager.draining = True
    with pytest.raises(Unavailable, match="shutting down"):
        await manager.open(params(session_id="new"))
    assert list(manager.sessions) == [key("live")] and len(engine.sent) == 1
    engine.answer(chunk(key("live"), 0))
    assert [c.chunk_index for c in queued(live)] == [0]


async def test_a_drain_that_starts_while_an_open_waits_for_the_worker_refuses_it(engine, manager):
    engine.ready.clear()
    opening = asyncio.create_task(manager.open(params(session_id="s")))
    await asyncio.sleep(0)
    manager.draining = True
    engine.ready.set()
    with pytest.raises(Unavailable, match="shutting down"):
        await opening
    assert manager.sessions == {} and engine.sent == []


# ---- chunks and the end -----------------------------------------------------------------------


async def test_chunks_are_queued_in_order_and_counted(engine, manager, registry):
    session = await open_session(engine, manager, params(session_id="s"))
    other = await open_session(engine, manager, params(session_id="other"))
    engine.answer(
        chunk(key("s"), 0), chunk(key("other"), 0), chunk(key("s"), 1), chunk(key("s"), 2)
    )
    engine.answer(chunk(key("unknown"), 0))  # a session forgotten here: dropped
    assert sample(registry, "magistream_chunks_generated_total") == 4
    assert sample(registry, "magistream_frames_generated_total") == 4 * FRAMES

    got = [await session.next_event() for _ in range(3)]
    assert [c.chunk_index for c in got] == [0, 1, 2]
    assert [c.chunk_index for c in queued(other)] == [0]
    for item in got:
        manager.chunk_streamed(session, item)
    assert session.chunks_done == 3 and session.frames_done == 3 * FRAMES
    assert session.time_to_first_chunk_s is not None and session.last_chunk_at is not None
    assert sample(registry, "magistream_time_to_first_chunk_seconds_count") == 1
    assert sample(registry, "magistream_inter_chunk_latency_seconds_count") == 2
    assert engine.sent[2:] == [ipc.Consumed(key("s"))] * 3


async def test_retry_hint_is_two_chunk_intervals_but_at_least_250_ms(engine, manager):
    assert manager.retry_after_ms() == 2000  # nothing timed yet
    session = await open_session(engine, manager, params(session_id="s"))
    engine.answer(chunk(key("s"), 0), chunk(key("s"), 1))
    for item in queued(session):
        manager.chunk_streamed(session, item)  # back to back: an interval of microseconds
    assert manager.retry_after_ms() == 250


@pytest.mark.parametrize(
    ("state", "code", "error"),
    [
        (SessionState.FINISHED, grpc.StatusCode.OK, None),
        (SessionState.CANCELLED, grpc.StatusCode.CANCELLED, None),
        (SessionState.FAILED, grpc.StatusCode.INTERNAL, "engine step failed: boom"),
    ],
    ids=["finished-ok", "cancelled-cancelled", "failed-internal"],
)
async def test_engine_end_maps_the_state_to_a_status_code_after_the_chunks(
    engine, manager, registry, state, code, error
):
    session = await open_session(engine, manager, params(session_id="s"))
    engine.answer(chunk(key("s"), 0), ipc.SessionEnded(key("s"), state, error))
    items = queued(session)
    assert [type(item) for item in items] == [ipc.ChunkReady, SessionEnd]
    assert items[1] == SessionEnd(state, code, error or "") == session.end
    assert session.ended and session.state == state and session.ended_at is not None
    assert manager.live() == []
    labels = {"state": state.value, "code": code.name}  # "finished", not "SessionState.FINISHED"
    assert sample(registry, "magistream_sessions_finished_total", **labels) == 1
    assert sample(registry, "magistream_sessions_active") == 0


async def test_chunk_streamed_after_the_end_sends_no_consumed(engine, manager):
    session = await open_session(engine, manager, params(session_id="s", num_chunks=1))
    engine.answer(chunk(key("s"), 0), ipc.SessionEnded(key("s"), SessionState.FINISHED))
    last = await session.next_event()
    manager.chunk_streamed(session, last)
    assert session.chunks_done == 1
    assert not any(isinstance(c, ipc.Consumed) for c in engine.sent)


# ---- prompts ----------------------------------------------------------------------------------


async def test_update_prompt_sends_it_and_resolves_with_the_engine_timeline(
    engine, manager, registry
):
    session = await open_session(engine, manager, params(session_id="s"))
    updating = asyncio.create_task(manager.update_prompt(PromptSpec("s", "it turns blue", 2, True)))
    command = await engine.command()
    assert command == ipc.UpdatePrompt(command.request_id, key("s"), "it turns blue", 2, True)
    timeline = ((0, PROMPT, 1), (2, "it turns blue", 2))
    applied = ipc.PromptApplied(command.request_id, key("s"), 2, 2, timeline)
    engine.answer(applied)
    assert await updating == applied
    assert session.timeline == timeline and session.prompt_version == 2
    assert sample(registry, "magistream_prompt_updates_total", result="accepted") == 1


async def test_update_prompt_rejected_by_the_engine_raises_not_steerable(engine, manager, registry):
    session = await open_session(engine, manager, params(session_id="s"))
    updating = asyncio.create_task(manager.update_prompt(PromptSpec("s", "blue", None, False)))
    command = await engine.command()
    refusal = "chunk 1 is already in the window"
    engine.answer(ipc.PromptRejected(command.request_id, key("s"), refusal))
    with pytest.raises(NotSteerable, match="chunk 1 is already in the window"):
        await updating
    assert session.timeline == ((0, PROMPT, 1),) and session.prompt_version == 1
    assert sample(registry, "magistream_prompt_updates_total", result="rejected") == 1


async def test_prompt_answers_are_matched_to_their_requests(engine, manager):
    await open_session(engine, manager, params(session_id="s"))
    first = asyncio.create_task(manager.update_prompt(PromptSpec("s", "one", None, False)))
    one = await engine.command()
    second = asyncio.create_task(manager.update_prompt(PromptSpec("s", "two", None, False)))
    two = await engine.command()
    assert one.request_id != two.request_id
    engine.answer(
        ipc.PromptRejected(two.request_id, key("s"), "no chunk left"),
        ipc.PromptApplied(one.request_id, key("s"), 1, 2, ((0, PROMPT, 1), (1, "one", 2))),
    )
    assert (await first).version == 2
    with pytest.raises(NotSteerable):
        await second


async def test_update_prompt_of_an_ended_session_raises_without_asking_the_engine(engine, manager):
    await open_session(engine, manager, params(session_id="s"))
    engine.answer(ipc.SessionEnded(key("s"), SessionState.FINISHED))
    with pytest.raises(NotSteerable, match="has ended"):
        await manager.update_prompt(PromptSpec("s", "blue", None, False))
    assert len(engine.sent) == 1


async def test_update_prompt_past_the_last_chunk_raises_invalid_request(engine, manager):
    await open_session(engine, manager, params(session_id="s", num_chunks=3))
    with pytest.raises(InvalidRequest, match="from_chunk"):
        await manager.update_prompt(PromptSpec("s", "blue", 3, False))
    with pytest.raises(SessionNotFound):
        await manager.update_prompt(PromptSpec("nope", "blue", None, False))
    assert len(engine.sent) == 1


# ---- cancel -----------------------------------------------------------------------------------


async def test_cancel_sends_cancel_session_and_ends_the_session_at_once(engine, manager, registry):
    session = await open_session(engine, manager, params(session_id="s"))
    assert manager.cancel(manager.get("s"), "cancelled by CancelSession") == SessionState.CANCELLED
    assert engine.sent[-1] == ipc.CancelSession(key("s"))
    end = SessionEnd(
        SessionState.CANCELLED, grpc.StatusCode.CANCELLED, "cancelled by CancelSession"
    )
    assert queued(session) == [end]
    labels = {"state": "cancelled", "code": "CANCELLED"}
    assert sample(registry, "magistream_sessions_finished_total", **labels) == 1
    assert manager.cancel(manager.get("s"), "again") == SessionState.CANCELLED  # no second command
    assert engine.sent.count(ipc.CancelSession(key("s"))) == 1


async def test_engine_events_after_a_cancel_are_dropped(engine, manager, registry):
    session = await open_session(engine, manager, params(session_id="s"))
    manager.cancel(manager.get("s"), "cancelled by the client")
    queued(session)
    engine.answer(chunk(key("s"), 0), ipc.SessionEnded(key("s"), SessionState.FINISHED))
    assert queued(session) == []
    assert session.state == SessionState.CANCELLED
    assert sample(registry, "magistream_chunks_generated_total") == 0
    labels = {"state": "finished", "code": "OK"}
    assert sample(registry, "magistream_sessions_finished_total", **labels) == 0


async def test_release_of_a_live_session_cancels_it_with_the_given_code(engine, manager):
    session = await open_session(engine, manager, params(session_id="s"))
    manager.release(session, "deadline exceeded", grpc.StatusCode.DEADLINE_EXCEEDED)
    assert session.end.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert session.state == SessionState.CANCELLED
    manager.release(session, "client disconnected")  # over already: nothing changes
    assert session.end.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert engine.sent.count(ipc.CancelSession(key("s"))) == 1


async def test_a_released_session_keeps_no_unsent_chunks(engine, manager):
    """Its stream broke with chunks queued: the ended session keeps its summary only."""
    session = await open_session(engine, manager, params(session_id="s"))
    engine.answer(chunk(key("s"), 0), chunk(key("s"), 1))
    manager.release(session, "client disconnected")
    assert session._events.empty() and session.chunks_done == 0
    assert manager.get("s").state == SessionState.CANCELLED  # the summary stays for the TTL


async def test_cancel_while_the_worker_restarts_ends_the_session_without_a_command(engine, manager):
    session = await open_session(engine, manager, params(session_id="s"))
    engine.ready.clear()
    assert manager.cancel(manager.get("s"), "cancelled by CancelSession") == SessionState.CANCELLED
    assert session.ended and not any(isinstance(c, ipc.CancelSession) for c in engine.sent)


# ---- worker loss ------------------------------------------------------------------------------


async def test_worker_loss_fails_every_live_session_with_unavailable(engine, manager, registry):
    running = await open_session(engine, manager, params(session_id="running"))
    waiting = await open_session(engine, manager, params(session_id="waiting"), queue_position=1)
    done = await open_session(engine, manager, params(session_id="done"))
    engine.answer(ipc.SessionEnded(key("done"), SessionState.FINISHED))
    engine.die("the worker process died (exit code -9); retry the request")
    for session in (running, waiting):
        assert session.state == SessionState.FAILED
        assert session.end == SessionEnd(
            SessionState.FAILED,
            grpc.StatusCode.UNAVAILABLE,
            "the worker process died (exit code -9); retry the request",
        )
        assert queued(session)[-1] == session.end
    assert done.state == SessionState.FINISHED and done.end.code == grpc.StatusCode.OK
    labels = {"state": "failed", "code": "UNAVAILABLE"}
    assert sample(registry, "magistream_sessions_finished_total", **labels) == 2
    assert sample(registry, "magistream_sessions_active") == 0
    assert sample(registry, "magistream_sessions_queued") == 0


async def test_worker_loss_fails_a_waiting_open_and_prompt_with_unavailable(engine, manager):
    await open_session(engine, manager, params(session_id="s"))
    updating = asyncio.create_task(manager.update_prompt(PromptSpec("s", "blue", None, False)))
    await engine.command()
    opening = asyncio.create_task(manager.open(params(session_id="new")))
    await engine.command()
    engine.die("the worker process died (exit code 1); retry the request")
    with pytest.raises(Unavailable, match="exit code 1"):
        await updating
    with pytest.raises(Unavailable, match="exit code 1"):
        await opening
    assert "new" not in manager.sessions


# ---- retention --------------------------------------------------------------------------------


async def test_ended_sessions_are_forgotten_after_the_ttl(engine, manager):
    manager.ttl_s = 0.01
    live = await open_session(engine, manager, params(session_id="live"))
    await open_session(engine, manager, params(session_id="ended"))
    engine.answer(ipc.SessionEnded(key("ended"), SessionState.FINISHED))
    manager.sweep()
    assert manager.get("ended").state == SessionState.FINISHED  # ended just now: still visible
    with pytest.raises(SessionExists):  # and its id still taken
        await manager.open(params(session_id="ended"))
    await asyncio.sleep(0.02)
    manager.sweep()
    with pytest.raises(SessionNotFound):
        manager.get("ended")
    assert manager.get("live") is live
    assert (await open_session(engine, manager, params(session_id="ended"))).id == "ended"


# ---- snapshots --------------------------------------------------------------------------------


async def test_a_server_without_a_snapshot_store_says_how_to_get_one(engine, manager):
    await open_session(engine, manager, params(session_id="s"))
    with pytest.raises(SnapshotUnusable, match="start it with --snapshot-dir"):
        await manager.snapshot("s", ANONYMOUS)
    with pytest.raises(SessionNotFound):  # the owner's own sessions only, store or not
        await manager.snapshot("s", "mallory")


async def test_an_event_put_back_by_a_broken_call_is_the_next_one_out():
    """A call that broke while its chunk was encoded puts the chunk back (service._events):
    an Attach must get it before the chunks that came after it."""
    session = LiveSession(SessionParams("", ((0, PROMPT),), 3, SIZE, SIZE), "s", ANONYMOUS)
    first, second, third = (object() for _ in range(3))
    for event in (first, second, third):
        session.push(event)
    taken = await session.next_event()
    session.put_back(taken)
    assert [await session.next_event() for _ in range(3)] == [first, second, third]
    assert session.empty
