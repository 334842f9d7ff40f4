"""Fork and rewind through a real server (issue 19): GenerateRequest.fork continues one of the
caller's sessions from a recent chunk; the fork's frames equal the source's for as long as their
timelines agree; a chunk outside the fork history is FAILED_PRECONDITION; the request's other
fields are checked at the edge; `magi-client fork` writes the fork to a file."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import grpc
import pytest

from client.cli import main
from engine import ipc
from proto import video_generation_pb2 as pb
from server import convert
from tests.client.test_cli import count_frames
from tests.server.conftest import wait_for
from tests.server.helpers import request, stub

# one worker runs the module: its module fixtures are made once
pytestmark = pytest.mark.xdist_group("fork")

PROMPT = "a red ball rolls"


def source_request(sid: str, chunks: int = 6) -> pb.GenerateRequest:
    raw = pb.OUTPUT_ENCODING_RAW_RGB24
    return request(PROMPT, chunks, 32, session_id=sid, seed=77, output_encoding=raw)


def fork_request(sid: str, source: str, at: int, timeline=()) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        session_id=sid,
        fork=pb.ForkSource(session_id=source, at_chunk=at),
        timeline=[pb.TimelineEntry(from_chunk=c, text=t) for c, t in timeline],
        output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24,
    )


def stream(channel, request) -> tuple[pb.SessionStarted, dict[int, list[bytes]], pb.GenerateEvent]:
    """started, raw frames by chunk index, and the last event."""
    events = list(stub(channel).StreamGenerate(request, timeout=120))
    chunks: dict[int, list[bytes]] = {}
    current = None
    for e in events:
        if e.HasField("chunk"):
            current = chunks.setdefault(e.chunk.chunk_index, [])
        elif e.HasField("frame"):
            current.append(e.frame.rgb24)
    return events[0].started, chunks, events[-1]


@pytest.fixture(scope="module")
def source(server):
    """A finished 6-chunk session and its frames (forks of an ended session)."""
    with grpc.insecure_channel(server.address) as channel:
        _, chunks, last = stream(channel, source_request("fork-source"))
    assert last.finished.state == pb.SESSION_STATE_FINISHED and sorted(chunks) == list(range(6))
    return chunks


@pytest.fixture(scope="module")
def long_source(server) -> pb.SessionInfo:
    """A finished 12-chunk session, once its fork history (the last 8 chunks) is reported."""
    with grpc.insecure_channel(server.address) as channel:
        stream(channel, source_request("long-source", chunks=12))
        get = pb.GetSessionRequest(session_id="long-source")
        # the worker reports the history's deadline just after the end
        wait_for(
            lambda: stub(channel).GetSession(get).fork_history.held_until_unix_ms > 0,
            10,
            "the ended session's fork history",
        )
        return stub(channel).GetSession(get)


def test_a_fork_with_the_same_timeline_equals_its_source(server, source):
    with grpc.insecure_channel(server.address) as channel:
        started, chunks, last = stream(channel, fork_request("fork-same", "fork-source", 3))
    assert last.finished.state == pb.SESSION_STATE_FINISHED
    assert sorted(chunks) == [3, 4, 5]  # it streams from the fork chunk on
    for c in chunks:
        assert chunks[c] == source[c], c
    params = started.params  # the source's settings, and where it came from
    assert (params.width_px, params.height_px, params.seed, params.num_chunks) == (32, 32, 77, 6)
    assert params.fork.session_id == "fork-source" and params.fork.at_chunk == 3
    assert [(e.from_chunk, e.text) for e in params.timeline] == [(0, PROMPT)]


def test_a_fork_with_another_prompt_differs_from_that_chunk_on(server, source):
    timeline = [(4, "a blue box slides")]
    with grpc.insecure_channel(server.address) as channel:
        started, chunks, _ = stream(channel, fork_request("fork-other", "fork-source", 3, timeline))
        info = stub(channel).GetSession(pb.GetSessionRequest(session_id="fork-other"))
    assert chunks[3] == source[3]
    assert chunks[4] != source[4] and chunks[5] != source[5]
    want = [(0, PROMPT, 1), (4, "a blue box slides", 2)]
    assert [(e.from_chunk, e.text, e.version) for e in started.params.timeline] == want
    assert [(e.from_chunk, e.text, e.version) for e in info.timeline] == want


def test_rewind_a_running_session_and_fork_the_fork(server):
    """Fork a running session at a chunk it has not streamed yet, cancel it (rewind), then
    fork the fork; both equal an uninterrupted run."""
    with grpc.insecure_channel(server.address) as channel:
        _, want, _ = stream(channel, source_request("rewind-ref"))
        calls = stub(channel)
        running = calls.StreamGenerate(source_request("rewind-src"), timeout=120)
        for e in running:
            if e.HasField("chunk"):  # chunk 0 is out: chunks 1..3 are in flight, 3 marked
                break
        held = calls.GetSession(pb.GetSessionRequest(session_id="rewind-src")).fork_history
        _, first, _ = stream(channel, fork_request("rewind-1", "rewind-src", 2))
        calls.CancelSession(pb.CancelSessionRequest(session_id="rewind-src"))
        _, second, _ = stream(channel, fork_request("rewind-2", "rewind-1", 4))
    # running: from chunk 0 to the newest to start (3 or later), with no deadline yet
    assert held.first_chunk == 0 and held.last_chunk >= 3 and held.held_until_unix_ms == 0
    assert sorted(first) == [2, 3, 4, 5] and sorted(second) == [4, 5]
    for c in first:
        assert first[c] == want[c], c
    for c in second:
        assert second[c] == want[c], c


def test_get_session_shows_the_fork_history_and_a_fork_at_its_first_chunk_works(
    server, long_source, capsys
):
    held = long_source.fork_history
    assert (held.first_chunk, held.last_chunk) == (4, 11)  # the last 8 chunks to start
    left_s = held.held_until_unix_ms / 1000 - time.time()
    assert 0 < left_s <= 120  # the server's --fork-ttl-s (default 120) from the end
    assert main(["status", "long-source", "--server", server.address]) == 0
    assert re.search(r"\n  forkable at chunks 4\.\.11 for \d+ s more\n", capsys.readouterr().out)
    with grpc.insecure_channel(server.address) as channel:
        _, chunks, last = stream(channel, fork_request("fork-first", "long-source", 4))
        with pytest.raises(grpc.RpcError) as before:
            stream(channel, fork_request("fork-before", "long-source", 3))
    assert last.finished.state == pb.SESSION_STATE_FINISHED and sorted(chunks) == list(range(4, 12))
    assert before.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot be forked at chunk 3: its fork history holds chunks 4..11" in (
        before.value.details()
    )


def test_an_ended_sessions_history_past_its_time_is_not_shown():
    """The worker drops an expired history at its next step; GetSession stops showing it at
    once."""
    held = ipc.ForkHistory("a/b", 4, 11, held_until_unix_ms=1_000_000)
    assert convert.fork_history(held, now_unix_s=999.0).first_chunk == 4
    assert convert.fork_history(held, now_unix_s=1000.0) is None
    assert convert.fork_history(ipc.ForkHistory("a/b", None, None), now_unix_s=0.0) is None
    running = ipc.ForkHistory("a/b", 0, 3)  # no deadline while it runs
    assert convert.fork_history(running, now_unix_s=1e12).last_chunk == 3


def test_a_fork_outside_the_history_is_failed_precondition(server, long_source):
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            stream(channel, fork_request("too-far", "long-source", 1))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == (
        "session 'long-source' cannot be forked at chunk 1: its fork history holds chunks "
        "4..11 (the last 8 chunks to start)"
    )


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (dict(width_px=64), "width_px", "leave width_px unset"),
        (dict(seed=3), "seed", "leave seed unset"),
        (dict(image=b"x"), "image", "leave image unset"),
        (dict(num_chunks=2), "num_chunks", "takes its source's size, seed, mode, sampling"),
        (
            dict(timeline=[pb.TimelineEntry(from_chunk=1, text="early")]),
            "timeline[0].from_chunk",
            "1 is before the fork's at_chunk 3",
        ),
        (
            dict(fork=pb.ForkSource(session_id="fork-source", at_chunk=6)),
            "fork.at_chunk",
            "6 is past",
        ),
        (
            dict(fork=pb.ForkSource(session_id="", at_chunk=0)),
            "fork.session_id",
            "name the session",
        ),
    ],
)
def test_fork_requests_are_checked_at_the_edge(server, source, change, field, says):
    request = fork_request("bad-fork", "fork-source", 3)
    for name, value in change.items():
        if name in ("timeline",):
            request.timeline.extend(value)
        elif name == "fork":
            request.fork.CopyFrom(value)
        else:
            setattr(request, name, value)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as e:
        stream(channel, request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: ") and says in e.value.details()


def test_an_unknown_source_is_not_found(server):
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as e:
        stream(channel, fork_request("orphan", "no-such-session", 0))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_magi_client_fork_writes_the_fork(server, source, tmp_path):
    out = tmp_path / "fork.mp4"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "fork",
            "fork-source",
            "--at",
            "4",
            "--prompt",
            "a green cube",
            "--server",
            server.address,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert count_frames(out) == 2 * 24  # chunks 4 and 5
