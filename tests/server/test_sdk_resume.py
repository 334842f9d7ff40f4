"""The SDK resumes a stream on its own when its server drains (issue 19): two real replicas of
the tiny model share one snapshot store; replica A gets SIGTERM once three sessions streaming
from it have each sent their first chunk, ends each stream with UNAVAILABLE and a resume token
in its trailers, and the SDK continues the sessions on B. The caller's video must be the
uninterrupted run's, chunk for chunk.

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

from client import Client, ConnectOptions, GenerateOptions, MagiError, RetryPolicy
from client.writers import Fmp4Writer
from tests.client.test_cli import count_frames
from tests.serverproc import ServerProcess

# one worker runs the module: its module fixtures are made once
pytestmark = pytest.mark.xdist_group("sdk_resume")

WAIT_S = 60.0  # longest wait for the other sessions' first chunks
CHUNKS = 6
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


@pytest.fixture(scope="module")
def drained(replicas, tmp_path_factory) -> SimpleNamespace:
    """Three sessions on A (raw and fMP4 resumed on their own, one raw with resume off);
    A gets SIGTERM once each has yielded its first chunk. Their Outcomes, and A's log."""
    a, b = replicas.a, replicas.b
    out = tmp_path_factory.mktemp("drained") / "drained.mp4"
    resuming = ConnectOptions(a.address, retry=FAST, resume_target=b.address)
    by_hand = ConnectOptions(a.address, retry=dataclasses.replace(FAST, resume_for_s=0))
    runs = {
        "drained-raw": (resuming, True),
        "drained-fmp4": (resuming, False),
        "by-hand": (by_hand, True),
    }
    # each session holds its first chunk until all have one, then A is told to drain
    barrier = threading.Barrier(len(runs), action=a.terminate, timeout=WAIT_S)
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

    threads = [threading.Thread(target=stream, args=(n, *run)) for n, run in runs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    return SimpleNamespace(
        raw=outcomes["drained-raw"],
        fmp4=outcomes["drained-fmp4"],
        by_hand=outcomes["by-hand"],
        a_log=a.logs(),
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
