"""The SDK resumes a stream on its own when its server drains (issue 19): two real replicas of
the tiny model share one snapshot store; replica A gets SIGTERM once four sessions streaming
from it have each sent their first chunk, ends each stream with UNAVAILABLE and a resume token
in its trailers, and the SDK continues the sessions on B. The caller's video must be the
uninterrupted run's, chunk for chunk. An Interact session drains with them: its stream
resumes too, and its prompts (one pushed as A drains) are neither lost nor acked twice.

The SDK is pointed at B for the resume (`ConnectOptions.resume_target`): behind a router both
would be one address (docs/client.md). A drains with --grace-period-s 0, so a session with
chunks left is always snapshotted rather than let finish. One drain serves every test here
(each server start costs seconds on 2 cores): the `drained` fixture streams the three sessions
at once, and each test checks one of them. B is the shared test server (its store is A's).
(The retry window's unit test: tests/client/test_retry.py.)"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from client import Ack, Client, ConnectOptions, GenerateOptions, MagiError, RetryPolicy
from client.aio import AsyncClient, _Push
from client.events import Started
from client.writers import Fmp4Writer
from proto import video_generation_pb2 as pb
from tests.client.test_cli import count_frames
from tests.serverproc import ServerProcess

# one worker runs the module: its module fixtures are made once
pytestmark = pytest.mark.xdist_group("sdk_resume")

WAIT_S = 60.0  # longest wait for the other sessions' first chunks
CHUNKS = 6
# the Interact session's: room for a prompt pushed after the resume, once the one pushed as A
# drained has steered a chunk, to land before the end (B may run up to the output queue plus a
# window ahead of the push on a loaded machine)
INTERACT_CHUNKS = 18
# quick retries: nothing here waits for a replacement replica
FAST = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, resume_for_s=20.0)


def options(session_id: str, raw: bool) -> GenerateOptions:
    return GenerateOptions(
        prompts=((0, "a red ball rolls"), (3, "the ball falls")),
        chunks=CHUNKS,
        width=32,
        height=32,
        seed=5,
        # twice the tiny model's default: chunks come slowly enough that SIGTERM lands well
        # before the last one (fMP4 chunks are too small for flow control to hold them back)
        steps=16,
        raw=raw,
        session_id=session_id,
    )


@pytest.fixture(scope="module")
def replicas(server, start_server) -> SimpleNamespace:
    """A, to drain, and B, which stays up: the shared server (its snapshot store is A's)."""
    a = start_server(*("--snapshot-dir", str(server.snapshot_dir), "--grace-period-s", "0"))
    return SimpleNamespace(a=a, b=server)


@dataclasses.dataclass
class Outcome:
    """One session streamed from A through its drain."""

    chunks: dict[int, object] = dataclasses.field(default_factory=dict)  # index -> frames/payload
    order: list[int] = dataclasses.field(default_factory=list)  # indices as they were yielded
    resumes: int = 0
    finished: str | None = None  # the final `finished` state
    error: MagiError | None = None
    file: Path | None = None  # fMP4: the payloads appended as they came
    acks: list[Ack] = dataclasses.field(default_factory=list)  # Interact: as they came
    prompt_texts: dict[int, str] = dataclasses.field(default_factory=dict)  # index -> text
    timeline: list = dataclasses.field(default_factory=list)  # Interact: B's at the end


@pytest.fixture(scope="module")
def drained(replicas, tmp_path_factory) -> SimpleNamespace:
    """Four sessions on A (raw, fMP4 and Interact resumed on their own, one raw with resume
    off); A gets SIGTERM once each has yielded its first chunk, and the Interact session
    pushes a prompt as it drains. Their Outcomes, and A's log."""
    a, b = replicas.a, replicas.b
    out = tmp_path_factory.mktemp("drained") / "drained.mp4"
    resuming = ConnectOptions(a.address, retry=FAST, resume_target=b.address)
    by_hand = ConnectOptions(a.address, retry=dataclasses.replace(FAST, resume_for_s=0))
    runs = {
        "drained-raw": (resuming, True),
        "drained-fmp4": (resuming, False),
        "by-hand": (by_hand, True),
    }
    interacting = {}  # the Interact stream, for the push made as A drains

    def drain() -> None:
        a.terminate()
        # races the drain: answered by A before its snapshot or after it, unanswered, or
        # written on a call that has ended; pushed again, or not, as the snapshot says
        interacting["stream"].push_prompt("a yellow ball")

    # each session holds its first chunk until all have one, then A is told to drain
    barrier = threading.Barrier(len(runs) + 1, action=drain, timeout=WAIT_S)
    outcomes = {name: Outcome(file=None if raw else out) for name, (_, raw) in runs.items()}

    def stream(name: str, connect: ConnectOptions, raw: bool) -> None:
        outcome = outcomes[name]
        writer = None if raw else Fmp4Writer(outcome.file)
        try:
            with Client(connect) as client, client.generate(options(name, raw)) as s:
                try:
                    for chunk in s:
                        outcome.order.append(chunk.index)
                        outcome.chunks[chunk.index] = chunk.frames if raw else chunk.payload
                        if writer is not None:
                            writer.write(chunk)
                        if chunk.index == outcome.order[0]:
                            barrier.wait()
                except MagiError as e:
                    outcome.error = e
                outcome.resumes = s.resumes
                outcome.finished = s.finished.state if s.finished else None
        finally:
            if writer is not None:
                writer.close()

    def interact(outcome: Outcome) -> None:
        with Client(resuming) as client, client.interact(interact_options("interact")) as s:
            interacting["stream"] = s
            s.push_prompt("a blue ball", from_chunk=2)  # answered by A
            pushed_after = False
            try:
                for item in s:
                    if isinstance(item, Ack):
                        outcome.acks.append(item)
                        continue
                    outcome.order.append(item.index)
                    outcome.chunks[item.index] = item.frames
                    outcome.prompt_texts[item.index] = item.prompt_text
                    if item.index == outcome.order[0]:
                        barrier.wait()
                    elif s.resumes and not pushed_after and item.prompt_text == "a yellow ball":
                        # on the resumed call, once yellow steers: green lands after it (at
                        # one chunk, the later of two prompts replaces the earlier)
                        s.push_prompt("a green ball")
                        pushed_after = True
            except MagiError as e:
                outcome.error = e
            outcome.resumes = s.resumes
            outcome.finished = s.finished.state if s.finished else None
        with Client(b.address) as client:
            outcome.timeline = list(client.get_session("interact").timeline)

    outcomes["interact"] = Outcome()
    threads = [threading.Thread(target=stream, args=(n, *run)) for n, run in runs.items()]
    threads.append(threading.Thread(target=interact, args=(outcomes["interact"],)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    return SimpleNamespace(
        raw=outcomes["drained-raw"],
        fmp4=outcomes["drained-fmp4"],
        by_hand=outcomes["by-hand"],
        interact=outcomes["interact"],
        a_log=a.logs(),
    )


def interact_options(session_id: str, prompts=((0, "a red ball rolls"),)) -> GenerateOptions:
    return dataclasses.replace(
        options(session_id, raw=True), prompts=tuple(prompts), chunks=INTERACT_CHUNKS
    )


def solo(b: ServerProcess, session_id: str, raw: bool, file: Path | None = None) -> dict:
    """An uninterrupted run of the same request on B: index -> frames (raw) or payload."""
    with Client(b.address) as client:
        chunks = {c.index: c for c in client.generate(options(session_id, raw))}
    if file is not None:
        file.write_bytes(b"".join(c.payload for c in chunks.values()))
    return {i: c.frames if raw else c.payload for i, c in chunks.items()}


def test_a_stream_whose_server_drains_resumes_on_another_with_every_chunk_identical(
    drained, replicas
):
    got = drained.raw
    assert got.error is None, got.error
    assert got.resumes == 1 and got.finished == "FINISHED"
    assert got.order == list(range(CHUNKS))  # each chunk once, in order
    want = solo(replicas.b, "solo-raw", raw=True)
    for index in range(CHUNKS):
        assert got.chunks[index] == want[index], f"chunk {index} differs from the solo run"
    assert "event=session.snapshot session=anonymous/drained-raw" in drained.a_log


def test_a_resumed_fmp4_stream_appends_to_one_valid_file(drained, replicas, tmp_path):
    got = drained.fmp4
    assert got.error is None, got.error
    assert got.resumes == 1 and got.finished == "FINISHED"
    assert got.order == list(range(CHUNKS))
    assert count_frames(got.file) == 24 * CHUNKS
    # the init segment once, then every chunk's fragment: the solo run's bytes exactly
    solo(replicas.b, "solo-fmp4", raw=False, file=tmp_path / "solo.mp4")
    assert got.file.read_bytes() == (tmp_path / "solo.mp4").read_bytes()


def test_a_caller_who_opts_out_gets_the_token_and_resumes_by_hand(drained, replicas):
    got = drained.by_hand
    error = got.error
    assert got.resumes == 0 and error is not None
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.session_id == "by-hand"
    assert error.resume_token and 1 <= error.resume_from_chunk <= max(got.order) + 1
    resumed = GenerateOptions.resume(error.resume_token, session_id="by-hand", raw=True)
    with Client(replicas.b.address) as client:
        rest = {c.index: c.frames for c in client.generate(resumed)}
    assert min(rest) == error.resume_from_chunk and max(rest) == CHUNKS - 1
    assert {**got.chunks, **rest} == solo(replicas.b, "solo-by-hand", raw=True)


def test_an_interact_stream_resumes_with_its_prompts_and_every_chunk_identical(drained, replicas):
    got = drained.interact
    assert got.error is None, got.error
    assert got.resumes == 1 and got.finished == "FINISHED"
    assert got.order == list(range(INTERACT_CHUNKS))
    # one Ack per push, in push order: the one pushed as A drained is neither lost nor doubled
    assert [(a.text, a.accepted) for a in got.acks] == [
        ("a blue ball", True),
        ("a yellow ball", True),
        ("a green ball", True),
    ], got.acks
    entries = {e.text: e.from_chunk for e in got.timeline}
    assert set(entries) == {"a red ball rolls", *(a.text for a in got.acks)}
    blue, yellow, green = got.acks
    assert entries["a blue ball"] == blue.from_chunk >= 2
    # yellow lands where its Ack says, or later where A acked it after its snapshot and B had
    # entered that chunk before the SDK pushed it again (docs/client.md)
    assert entries["a yellow ball"] >= yellow.from_chunk
    # the prompt pushed on the resumed call steers the chunks from where it landed
    assert entries["a green ball"] == green.from_chunk < INTERACT_CHUNKS
    assert got.prompt_texts[INTERACT_CHUNKS - 1] == "a green ball"
    # the uninterrupted run of the timeline the session ended with, on B
    prompts = sorted((e.from_chunk, e.text) for e in got.timeline)
    with Client(replicas.b.address) as client:
        want = {c.index: c.frames for c in client.generate(interact_options("solo-i", prompts))}
    for index in range(INTERACT_CHUNKS):
        assert got.chunks[index] == want[index], f"chunk {index} differs from the solo run"
    assert "event=session.snapshot session=anonymous/interact" in drained.a_log


async def test_the_snapshot_timeline_says_which_prompts_an_interact_resume_pushes_again():
    """The rule a resume applies to the prompts of its break (AsyncInteractStream._reconcile),
    case by case: the drain above decides by timing which case it meets."""

    def entries(*triples) -> list[pb.TimelineEntry]:
        return [pb.TimelineEntry(from_chunk=f, text=t, version=v) for f, t, v in triples]

    client = AsyncClient("localhost:1")  # never called: the rule needs no server

    def stream_with_pushes():
        """blue answered on A (version 2, chunk 3); yellow and green unanswered at the break"""
        stream = client.interact("red", chunks=10)
        params = pb.SessionParams(timeline=entries((0, "red", 1)))
        stream.started = Started("s", params, 0)
        for seq, (text, from_chunk) in enumerate([("blue", None), ("yellow", None), ("green", 6)]):
            push = _Push(seq, text, from_chunk, replace_later=False)
            stream._unyielded.append(push)
            stream._wire.append(push)
        stream._answered(pb.PromptAck(prompt_version=2, from_chunk=3))  # blue, on A
        return stream

    # the snapshot holds blue and yellow: yellow's Ack is the snapshot's entry; green goes again
    held = stream_with_pushes()
    again = held._reconcile(entries((0, "red", 1), (3, "blue", 2), (4, "yellow", 3)))
    assert [p.text for p in again] == ["green"]
    assert [p.ack for p in held._unyielded][:2] == [Ack("blue", 2, 3), Ack("yellow", 3, 4)]
    # a snapshot older than blue's version: blue goes again where it landed, with the others
    older = stream_with_pushes()
    again = older._reconcile(entries((0, "red", 1)))
    assert [(p.text, p.applied) for p in again] == [
        ("blue", (2, 3)),
        ("yellow", None),
        ("green", None),
    ]
    older._wire.extend(again)
    older._answered(pb.PromptAck(prompt_version=2, from_chunk=3))  # blue's again: not yielded
    assert older._unyielded[0].ack == Ack("blue", 2, 3) and older._unyielded[1].ack is None
    # the same text earlier than green asked for is another prompt: green goes again
    early = stream_with_pushes()
    timeline = entries((0, "red", 1), (3, "blue", 2), (4, "yellow", 3), (5, "green", 4))
    assert [p.text for p in early._reconcile(timeline)] == ["green"]
    await client.close()
