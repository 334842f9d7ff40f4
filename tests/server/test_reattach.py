"""Reattach after a disconnect through a real server (issue 19): a request with
`detach_grace_s` whose call breaks leaves its session paused, not cancelled; Attach by its owner
streams it again from a kept chunk, equal to an uninterrupted run; after the grace it is
cancelled and NOT_FOUND; bad graces, chunks no longer kept and a second reader are refused."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import grpc
import pytest

from client.cli import main
from client.exits import EXIT_REFUSED
from client.options import GenerateOptions
from client.sync import Client
from proto import video_generation_pb2 as pb
from server.config import Limits
from server.errors import InvalidRequest
from server.validation import parse_detach_grace
from tests.client.test_cli import count_frames
from tests.server.conftest import wait_for
from tests.server.helpers import decode_mp4, request, stub

PROMPT = "a red ball rolls"
CHUNKS = 8  # more than the 2 streamed + 2 paused a broken call can leave, so it cannot finish


def grace_request(sid: str, grace: float, chunks: int = CHUNKS) -> pb.GenerateRequest:
    raw = pb.OUTPUT_ENCODING_RAW_RGB24
    fields = {"session_id": sid, "seed": 19, "output_encoding": raw, "detach_grace_s": grace}
    return request(PROMPT, chunks, 32, **fields)


def frames_by_chunk(events) -> dict[int, list[bytes]]:
    chunks: dict[int, list[bytes]] = {}
    for e in events:
        if e.HasField("chunk"):
            current = chunks.setdefault(e.chunk.chunk_index, [])
        elif e.HasField("frame"):
            current.append(e.frame.rgb24)
    return chunks


def read_chunks_then_break(calls, request, n: int) -> None:
    """Stream `request` until `n` whole chunks arrived, then cancel the call (the stream breaks)."""
    call = calls.StreamGenerate(request, timeout=60)
    for e in call:
        if e.HasField("frame") and e.frame.last_in_chunk and e.frame.chunk_index == n - 1:
            break
    call.cancel()


def test_attach_after_a_broken_call_streams_the_rest_equal_to_an_uninterrupted_run(server):
    # the chunk counter is the server's: no other session may run beside this one
    wait_for(lambda: server.metric("magistream_sessions_active") == 0, 10, "an idle server")
    with server.channel() as channel:
        calls = stub(channel)
        produced_before = server.metric("magistream_chunks_generated_total")
        read_chunks_then_break(calls, grace_request("re-1", grace=30), 1)
        get = pb.GetSessionRequest(session_id="re-1")
        wait_for(lambda: server.metric("magistream_sessions_detached") == 1, 10, "detach")
        time.sleep(1.0)  # several chunk times: a session that was not paused would run on
        info = calls.GetSession(get)
        assert info.state == pb.SESSION_STATE_RUNNING, info.status_message
        produced = server.metric("magistream_chunks_generated_total") - produced_before
        # the engine stops after two chunks nobody took
        assert produced <= info.stats.chunks_done + 2 < CHUNKS, (produced, info.stats)

        events = list(calls.Attach(pb.AttachRequest(session_id="re-1", from_chunk=1), timeout=60))
        assert server.metric("magistream_sessions_detached") == 0
        reference = list(calls.StreamGenerate(grace_request("re-ref", grace=0), timeout=60))
    assert events[0].started.session_id == "re-1" and events[0].started.params.seed == 19
    assert events[-1].finished.state == pb.SESSION_STATE_FINISHED
    assert events[-1].finished.stats.chunks_done == CHUNKS  # every chunk acknowledged once
    got, want = frames_by_chunk(events), frames_by_chunk(reference)
    assert sorted(got) == list(range(1, CHUNKS))
    for c in got:
        assert got[c] == want[c], c


def test_a_session_detached_past_its_grace_is_cancelled_and_not_found(server):
    with server.channel() as channel:
        calls = stub(channel)
        read_chunks_then_break(calls, grace_request("re-expire", grace=1), 1)
        get = pb.GetSessionRequest(session_id="re-expire")
        wait_for(lambda: calls.GetSession(get).state == pb.SESSION_STATE_CANCELLED, 10, "the grace")
        info = calls.GetSession(get)
        with pytest.raises(grpc.RpcError) as e:
            list(calls.Attach(pb.AttachRequest(session_id="re-expire", from_chunk=1), timeout=10))
    assert info.status_code == grpc.StatusCode.CANCELLED.value[0]
    assert info.status_message == "detached longer than its grace (1 s)"
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == (
        "session 're-expire' has ended (cancelled (detached longer than its grace (1 s))); "
        "there is nothing to attach to"
    )


def test_attach_refuses_old_chunks_a_second_reader_and_unknown_ids(server):
    with server.channel() as channel:
        calls = stub(channel)
        read_chunks_then_break(calls, grace_request("re-old", grace=30, chunks=12), 6)
        wait_for(lambda: server.metric("magistream_sessions_detached") == 1, 10, "detach")
        with pytest.raises(grpc.RpcError) as old:
            next(calls.Attach(pb.AttachRequest(session_id="re-old", from_chunk=0), timeout=10))
        reader = calls.Attach(pb.AttachRequest(session_id="re-old", from_chunk=5), timeout=30)
        first = next(reader)
        with pytest.raises(grpc.RpcError) as second:
            next(calls.Attach(pb.AttachRequest(session_id="re-old", from_chunk=5), timeout=10))
        reader.cancel()  # breaks again: detached again, until the test cancels it
        wait_for(lambda: server.metric("magistream_sessions_detached") == 1, 10, "detach")
        calls.CancelSession(pb.CancelSessionRequest(session_id="re-old"))  # no grace left to wait
        assert server.metric("magistream_sessions_detached") == 0
        with pytest.raises(grpc.RpcError) as unknown:
            next(calls.Attach(pb.AttachRequest(session_id="re-never", from_chunk=0), timeout=10))
        with pytest.raises(grpc.RpcError) as too_long:
            next(calls.StreamGenerate(grace_request("re-long", grace=301), timeout=10))
    assert old.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # 6 chunks read, and the 4 newest of those the server sent (2..5, or later ones) are kept
    assert "chunk 0 is no longer kept; the oldest kept is chunk " in old.value.details()
    assert first.started.session_id == "re-old"
    assert second.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is streaming to another call; one reader at a time" in second.value.details()
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert too_long.value.details() == (
        "detach_grace_s: 301 is not allowed; use 0 (no reattach) or up to 300 s"
    )


@pytest.mark.parametrize(
    ("grace", "most", "error"),
    [
        (5.0, 0.0, "5 s asked, but reattach is disabled on this server (--max-detach-grace-s 0)"),
        (-1.0, 300.0, "-1 is not allowed"),
        (float("nan"), 300.0, "nan is not allowed"),
    ],
)
def test_a_grace_the_server_does_not_allow_is_invalid(grace, most, error):
    with pytest.raises(InvalidRequest, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_detach_grace(
            pb.GenerateRequest(detach_grace_s=grace), Limits(max_detach_grace_s=most)
        )
    assert parse_detach_grace(pb.GenerateRequest(), Limits(max_detach_grace_s=most)) == 0.0


def test_the_sdk_attaches_and_the_first_fmp4_chunk_again_carries_the_init_segment(server):
    options = GenerateOptions(
        prompts=((0, PROMPT),), chunks=CHUNKS, width=32, height=32, seed=19, detach_grace_s=30
    )
    with Client(server.address) as client:
        with client.generate(options) as stream:
            chunk_iter = iter(stream)
            next(chunk_iter), next(chunk_iter)  # chunks 0 and 1, then the call breaks
        wait_for(lambda: server.metric("magistream_sessions_detached") == 1, 10, "detach")
        # GetSession says it waits and what an Attach can get: chunks 0 and 1 went out
        info = client.get_session(stream.session_id)
        assert info.HasField("detached") and info.detached.from_chunk == 0
        assert info.detached.next_chunk >= 2
        assert 0 < info.detached.attach_by_unix_ms / 1000 - time.time() <= 30
        with client.attach(stream.session_id, from_chunk=1) as again:
            chunks = list(again)
        assert not client.get_session(stream.session_id).HasField("detached")
    assert [c.index for c in chunks] == list(range(1, CHUNKS))
    assert again.finished.state == "FINISHED"
    # chunks 1.. alone make a playable MP4: the replayed first one brings the init segment
    assert len(decode_mp4(b"".join(c.payload for c in chunks))) == 24 * (CHUNKS - 1)


def test_a_generate_whose_call_breaks_says_how_to_attach(server, tmp_path, capsys):
    """--deadline breaks the call mid-session: with a grace the CLI names the attach command
    (from the chunk after the last it wrote); without one it says nothing of attach."""
    out = tmp_path / "cut.mp4"
    common = [*("--server", server.address, "--prompt", PROMPT, "--chunks", "30"), "--out"]
    common += [str(out), *("--width", "32", "--height", "32", "--deadline", "0.8")]
    code = main(["generate", *common, "--session-id", "cli-hint", "--detach-grace-s", "30"])
    printed = capsys.readouterr()
    assert code == 4, printed.err  # the stream failed (DEADLINE_EXCEEDED)
    hint = re.search(r"magi-client attach cli-hint(?: --from (\d+))? --out REST.mp4", printed.err)
    assert hint, printed.err
    if hint.group(1) is not None:  # the chunk after the last one in the file
        assert int(hint.group(1)) == count_frames(out) // 24
    assert main(["cancel", "cli-hint", "--server", server.address]) == 0
    code = main(["generate", *common, "--session-id", "cli-nohint"])
    assert code == 4 and "magi-client attach" not in capsys.readouterr().err


def test_magi_client_attach_writes_the_rest_of_a_generate_whose_call_broke(
    server, tmp_path, capsys
):
    """The user's story: `generate --detach-grace-s` dies mid-stream (kill -9), `attach --from
    N` (N: the chunks its file holds) writes the rest; ffprobe is the judge."""
    part, rest = tmp_path / "part.mp4", tmp_path / "rest.mp4"
    generate = subprocess.Popen(
        [
            *(sys.executable, "-m", "client", "generate", "--server", server.address),
            *("--prompt", PROMPT, "--chunks", str(CHUNKS), "--width", "32", "--height", "32"),
            *("--seed", "19", "--session-id", "cli-re", "--detach-grace-s", "30"),
            *("--out", str(part)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in generate.stderr:  # one progress line per chunk (stderr is no terminal)
            if "chunk 0 done" in line:
                break
    finally:
        generate.kill()  # the connection breaks: the session waits, paused, for attach
        generate.communicate(timeout=30)
    wait_for(lambda: server.metric("magistream_sessions_detached") == 1, 10, "detach")
    have = count_frames(part) // 24  # whole chunks; the session paused before its end
    assert 1 <= have < CHUNKS

    # status tells the user what to run
    assert main(["status", "cli-re", "--server", server.address]) == 0
    assert "(magi-client attach cli-re --from 0)" in capsys.readouterr().out

    attach = ["attach", "cli-re", "--server", server.address]
    assert main([*attach, "--from", str(have)]) == 2  # --out is required, as for generate
    assert main([*attach, "--from", "-1", "--out", str(rest)]) == 2  # found before any call
    code = main([*attach, "--from", str(have), "--out", str(rest)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.startswith("session cli-re: tiny 32x32")
    assert count_frames(rest) == 24 * (CHUNKS - have)

    # ended now, and never known: NOT_FOUND in the server's words, exit 3, no file left
    for sid, says in [
        ("cli-re", "session 'cli-re' has ended (finished); there is nothing to attach to"),
        ("re-nobody", "session 're-nobody' is unknown"),
    ]:
        again = tmp_path / f"{sid}.mp4"
        code = main(["attach", sid, "--server", server.address, "--out", str(again)])
        printed = capsys.readouterr()
        assert code == EXIT_REFUSED and not again.exists()
        assert printed.err.startswith(f"magi-client: NOT_FOUND: {says}"), printed.err
