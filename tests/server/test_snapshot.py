"""Snapshot and resume through real servers (issue 19): SnapshotSession on server A writes the
session's newest chunk boundary to the store A and B share; GenerateRequest.resume on B
continues it bit for bit. The token names one file's contents (a changed file is refused), the
file names its owner and model (another's is refused). (A server without a store:
tests/server/test_sessions.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time

import grpc
import pytest

from client import Client, GenerateOptions
from proto import video_generation_pb2 as pb
from tests.client.test_cli import count_frames
from tests.server.helpers import stub


def request(sid: str, **fields) -> pb.GenerateRequest:
    settings = dict(num_chunks=6, width_px=32, height_px=32, seed=5)
    return pb.GenerateRequest(
        session_id=sid,
        timeline=[
            pb.TimelineEntry(text="a red ball rolls"),
            pb.TimelineEntry(from_chunk=3, text="x"),
        ],
        output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24,
        **{**settings, **fields},
    )


def resume_request(token: str, sid: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        session_id=sid, resume=token, output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24
    )


def frames_by_chunk(events) -> dict[int, list[bytes]]:
    chunks: dict[int, list[bytes]] = {}
    current = None
    for e in events:
        if e.HasField("chunk"):
            current = chunks.setdefault(e.chunk.chunk_index, [])
        elif e.HasField("frame"):
            current.append(e.frame.rgb24)
    return chunks


@pytest.fixture(scope="module")
def store(server):
    return server.snapshot_dir


# one worker runs the module in file order: its second replica is SIGTERMed by the last test
pytestmark = pytest.mark.xdist_group("snapshots")


@pytest.fixture(scope="module")
def pair(server, start_server):
    """Two replicas of one model sharing one snapshot store: the shared server and another,
    which writes every session to the store every 2 chunks (the last test kills its worker,
    then drains it)."""
    other = start_server(
        *("--snapshot-dir", str(server.snapshot_dir), "--snapshot-every", "2"),
        *("--grace-period-s", "30"),
    )
    return server, other


def test_a_snapshot_taken_on_one_server_resumes_bit_for_bit_on_another(pair):
    a, b = pair
    with grpc.insecure_channel(b.address) as channel:
        want = frames_by_chunk(stub(channel).StreamGenerate(request("ref"), timeout=120))
    with grpc.insecure_channel(a.address) as channel:
        calls = stub(channel)
        events = calls.StreamGenerate(request("moving"), timeout=120)
        seen = []
        for e in events:
            seen.append(e)
            if e.HasField("chunk") and e.chunk.chunk_index == 1:
                break
        taken = calls.SnapshotSession(pb.SnapshotRequest(session_id="moving"))
        calls.CancelSession(pb.CancelSessionRequest(session_id="moving"))  # replica A is gone
    assert taken.token and taken.size_bytes > 0 and taken.from_chunk <= 2
    with grpc.insecure_channel(b.address) as channel:
        events = list(
            stub(channel).StreamGenerate(resume_request(taken.token, "resumed"), timeout=120)
        )
    started, last = events[0].started, events[-1]
    assert last.finished.state == pb.SESSION_STATE_FINISHED
    assert started.params.seed == 5 and started.params.num_chunks == 6
    assert [(e.from_chunk, e.text) for e in started.params.timeline] == [
        (0, "a red ball rolls"),
        (3, "x"),
    ]
    got = frames_by_chunk(events)
    assert sorted(got) == list(range(taken.from_chunk, 6))
    for c in got:
        assert got[c] == want[c], c


def _rewrite(store, token: str, change) -> str:
    """Change a stored snapshot's header as someone with access to the store could; a token
    for the changed file (as if its writer had made it so)."""
    snapshot_id, _ = token.split(".")
    path = store / f"{snapshot_id}.snapshot"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["magistream"])
    change(meta)
    header["__metadata__"]["magistream"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = struct.pack("<Q", len(raw)) + raw + data[8 + length :]
    path.write_bytes(data)
    return f"{snapshot_id}.{hashlib.sha256(data).hexdigest()}"


@pytest.fixture(scope="module")
def token(pair):
    a, _ = pair
    with grpc.insecure_channel(a.address) as channel:
        calls = stub(channel)
        for e in calls.StreamGenerate(request("kept"), timeout=120):
            if e.HasField("chunk"):
                break
        token = calls.SnapshotSession(pb.SnapshotRequest(session_id="kept")).token
        calls.CancelSession(pb.CancelSessionRequest(session_id="kept"))
    return token


def resume_error(server, token: str) -> grpc.RpcError:
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as e:
        list(stub(channel).StreamGenerate(resume_request(token), timeout=60))
    return e.value


def test_a_changed_unknown_or_foreign_snapshot_is_refused(pair, store, token):
    _, b = pair
    snapshot_id, digest = token.split(".")
    damaged = f"{snapshot_id}.{'0' * 64}"
    e = resume_error(b, damaged)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "checksum" in e.details()
    e = resume_error(b, f"{'1' * 32}.{digest}")
    assert e.code() == grpc.StatusCode.NOT_FOUND
    e = resume_error(b, "not-a-token")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("resume: ")
    other_model = _rewrite(store, token, lambda m: m.update(model="0" * 64))
    e = resume_error(b, other_model)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "made with another model" in e.details()
    # (rewritten last: the file now names another owner, so nobody else here may resume it)
    someone_else = _rewrite(store, other_model, lambda m: m.update(owner="mallory"))
    assert resume_error(b, someone_else).code() == grpc.StatusCode.NOT_FOUND


def test_resume_requests_are_checked_at_the_edge(pair, token):
    _, b = pair
    bad = resume_request(token)
    bad.width_px = 64
    e = resume_error_request(b, bad)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("width_px: ")
    bad = resume_request(token)
    bad.fork.session_id = "x"
    e = resume_error_request(b, bad)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


def resume_error_request(server, request) -> grpc.RpcError:
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as e:
        list(stub(channel).StreamGenerate(request, timeout=60))
    return e.value


def test_the_sdk_snapshots_and_resumes(pair):
    a, b = pair
    options = GenerateOptions(
        prompts=((0, "a red ball rolls"),),
        chunks=5,
        width=32,
        height=32,
        seed=9,
        raw=True,
        session_id="sdk-source",
    )
    with Client(a.address) as client:
        want = {c.index: c.frames for c in client.generate(options)}
        taken = client.snapshot("sdk-source")  # ended: still in its fork history
    with Client(b.address) as client:
        got = {
            c.index: c.frames
            for c in client.generate(GenerateOptions.resume(taken.token, raw=True))
        }
    assert sorted(got) == list(range(taken.from_chunk, 5)) and got
    assert all(got[c] == want[c] for c in got)


def test_magi_client_snapshot_and_resume(pair, tmp_path):
    a, b = pair
    with grpc.insecure_channel(a.address) as channel:
        list(stub(channel).StreamGenerate(request("cli-source"), timeout=120))
    cli = [sys.executable, "-m", "client"]
    taken = subprocess.run(
        [*cli, "snapshot", "cli-source", "--server", a.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert taken.returncode == 0, taken.stderr
    token = taken.stdout.split()[1]
    out = tmp_path / "resumed.mp4"
    resumed = subprocess.run(
        [*cli, "resume", token, "--server", b.address, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    first = int(taken.stdout.rsplit("chunk ", 1)[1])
    assert count_frames(out) == 24 * (6 - first)


def test_sessions_outlive_a_killed_worker_and_a_drain_through_the_store(pair):
    """The second replica (--snapshot-every 2). Its worker is killed (-9) mid-stream: the call
    ends UNAVAILABLE with the newest periodic snapshot's token. Then SIGTERM: an unbounded
    session cannot finish in the grace period, so it is written to the store at once and its
    call ends UNAVAILABLE with the token in the trailers. The other replica continues each
    bit for bit from the token's chunk. (Last in the module: it stops that replica.)"""
    a, leaving = pair
    unbounded = dict(num_chunks=0, unbounded=True)
    with grpc.insecure_channel(a.address) as channel:
        want = read_chunks(stub(channel).StreamGenerate(request("unbounded-ref", **unbounded)), 7)

    def ended_with_token(sid: str, at_chunk: int, act) -> tuple[str, int]:
        with grpc.insecure_channel(leaving.address) as channel:
            call = stub(channel).StreamGenerate(request(sid, **unbounded), timeout=120)
            events = []
            with pytest.raises(grpc.RpcError) as ended:
                for e in call:
                    events.append(e)
                    if e.HasField("chunk") and e.chunk.chunk_index == at_chunk:
                        act()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert events[-1].finished.state == pb.SESSION_STATE_FAILED
        trailers = dict(ended.value.trailing_metadata())
        return trailers["x-resume-token"], int(trailers["x-resume-from-chunk"])

    def kill_the_worker() -> None:  # once the snapshot after 4 streamed chunks is written
        wait_for_log(leaving, "session.snapshot", 2)
        os.kill(leaving.worker_pid(), signal.SIGKILL)

    killed = ended_with_token("killed", 4, kill_the_worker)
    leaving.wait_serving()  # its new worker
    drained = ended_with_token("drained", 0, lambda: leaving.proc.send_signal(signal.SIGTERM))
    assert leaving.proc.wait(30) == 0  # it did not wait out its 30 s grace for the session
    assert 0 < killed[1] <= 4
    for sid, (token, first) in (("killed", killed), ("drained", drained)):
        with grpc.insecure_channel(a.address) as channel:
            got = read_chunks(stub(channel).StreamGenerate(resume_request(token, sid)), 7)
        assert sorted(got) == list(range(first, 7)), sid
        for c in got:
            assert got[c] == want[c], (sid, c)


def read_chunks(call, until: int) -> dict[int, list[bytes]]:
    """Raw frames by chunk of a streaming call, read until chunk `until - 1` is whole."""
    got: dict[int, list[bytes]] = {}
    for e in call:
        if e.HasField("chunk"):
            got[e.chunk.chunk_index] = []
        elif e.HasField("frame"):
            got[e.frame.chunk_index].append(e.frame.rgb24)
            if e.frame.chunk_index == until - 1 and e.frame.last_in_chunk:
                break
    call.cancel()
    return got


def wait_for_log(server, text: str, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while server.logs().count(text) < count:
        assert time.monotonic() < deadline, f"no {count} x {text!r} in the log"
        time.sleep(0.05)
