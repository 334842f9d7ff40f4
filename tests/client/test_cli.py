"""magi-client's argument handling and exit codes, in-process; the calls go to a scripted fake
(tests/client/fakes.py). The real server's end-to-end runs are in test_e2e.py."""

from __future__ import annotations

import json
import socket
import subprocess

import grpc
import pytest

from client.cli import UsageError, collect_prompts, main
from client.commands import parse_live_line
from tests.client.fakes import SESSION, FakeServer, Script


@pytest.fixture
def listener():
    """A listening socket that must never be connected to: proof no call was made."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(BlockingIOError):
        sock.accept()  # nothing connected
    sock.close()


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--prompt", "x", "--out", "{tmp}/o.mp4"],  # --chunks missing
        ["generate", "--prompt", "x", "--chunks", "0", "--out", "{tmp}/o.mp4"],
        ["generate", "--prompt", "x", "--chunks", "two", "--out", "{tmp}/o.mp4"],
        ["generate", "--chunks", "2", "--out", "{tmp}/o.mp4"],  # no prompt at all
        ["generate", "--prompt-at", "1:late", "--chunks", "2", "--out", "{tmp}/o.mp4"],
        [
            "generate",
            "--prompt",
            "x",
            "--prompt-at",
            "2:past",
            "--chunks",
            "2",
            "--out",
            "{tmp}/o.mp4",
        ],
        [
            "generate",
            "--prompt",
            "x",
            "--prompt-at",
            "0:again",
            "--chunks",
            "2",
            "--out",
            "{tmp}/o.mp4",
        ],
        [
            "generate",
            "--prompt",
            "x",
            "--prompt-at",
            "one:x",
            "--chunks",
            "2",
            "--out",
            "{tmp}/o.mp4",
        ],
        ["generate", "--prompt", "x", "--chunks", "1", "--out", "{tmp}/missing/o.mp4"],
        ["generate", "--prompt", "x", "--chunks", "1", "--out", "{tmp}"],
        [
            "generate",
            "--prompt",
            "x",
            "--chunks",
            "1",
            "--image",
            "{tmp}/none.png",
            "--out",
            "{tmp}/o.mp4",
        ],
        [
            "generate",
            "--prompt",
            "x",
            "--chunks",
            "1",
            "--image",
            "{tmp}/a.png",
            "--video",
            "{tmp}/a.png",
            "--out",
            "{tmp}/o.mp4",
        ],
        [
            "generate",
            "--prompt",
            "x",
            "--chunks",
            "1",
            "--prompts",
            "{tmp}/bad.json",
            "--out",
            "{tmp}/o.mp4",
        ],
        ["generate", "--prompt", "x", "--chunks", "1", "--width", "-16", "--out", "{tmp}/o.mp4"],
        [
            "generate",
            "--prompt",
            "x",
            "--chunks",
            "1",
            "--session-id",
            "no spaces",
            "--out",
            "{tmp}/o.mp4",
        ],
        [
            "generate",
            "--prompt",
            "x",
            "--chunks",
            "1",
            "--ca",
            "{tmp}/none.pem",
            "--out",
            "{tmp}/o.mp4",
        ],
        ["live", "--chunks", "-1", "--out", "{tmp}/o.mp4"],
        ["live", "--prompt", "x", "--out", "{tmp}/o.mp4"],  # neither --chunks nor --unbounded
        ["generate", "--prompt", "x", "--chunks", "2", "--unbounded", "--out", "{tmp}/o.mp4"],
        ["status"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2_without_contacting_the_server(args, listener, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "bad.json").write_text("{not json")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--server", listener]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_prompts_merge_from_flags_and_file_sorted_by_chunk(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"chunk": 4, "text": "d"}, {"from_chunk": 2, "text": "c"}]))
    assert collect_prompts("a", ["1:b: with a colon"], path) == (
        (0, "a"),
        (1, "b: with a colon"),
        (2, "c"),
        (4, "d"),
    )
    path.write_text(json.dumps({"0": "a", "3": "b"}))
    assert collect_prompts(None, [], path) == ((0, "a"), (3, "b"))
    with pytest.raises(UsageError, match="two prompts for chunk 3"):
        collect_prompts(None, ["3:x"], path)


def test_live_lines_are_asap_prompts_or_at_chunk_prompts():
    assert parse_live_line("the ball turns blue\n") == (None, "the ball turns blue")
    assert parse_live_line("@5 the ball stops") == (5, "the ball stops")
    assert parse_live_line("@x not a chunk") == (None, "@x not a chunk")
    assert parse_live_line("   ") is None


def test_refused_request_exits_3_with_the_servers_message(tmp_path, capsys):
    message = "width_px: 72 is not allowed; use a multiple of 16 in 16..1280"
    script = Script(refuse=(grpc.StatusCode.INVALID_ARGUMENT, message))
    with FakeServer(script) as target:
        code = main(
            [
                "generate",
                "--server",
                target,
                "--prompt",
                "x",
                "--chunks",
                "1",
                "--width",
                "72",
                "--out",
                str(tmp_path / "o.mp4"),
            ]
        )
    assert code == 3
    assert f"INVALID_ARGUMENT: {message}" in capsys.readouterr().err
    assert script.calls["StreamGenerate"] == 1


def test_unbounded_is_asked_for_and_a_server_that_refuses_it_is_reported(tmp_path, capsys):
    message = "unbounded: unbounded sessions are disabled on this server; set num_chunks 1..256"
    script = Script(refuse=(grpc.StatusCode.INVALID_ARGUMENT, message))
    with FakeServer(script) as target:
        code = main(
            [
                "generate",
                "--server",
                target,
                "--prompt",
                "x",
                "--unbounded",
                "--out",
                str(tmp_path / "o.mp4"),
            ]
        )
    assert code == 3
    assert f"INVALID_ARGUMENT: {message}" in capsys.readouterr().err
    sent = script.requests[0]
    assert (sent.num_chunks, sent.unbounded) == (0, True)


def test_unreachable_server_exits_4_after_its_retries(tmp_path, capsys):
    with FakeServer() as target:
        pass  # closed again: nothing listens there
    code = main(["models", "--server", target, "--retries", "1"])
    assert code == 4
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_stream_broken_after_start_exits_4_and_is_not_retried(tmp_path, capsys):
    script = Script(break_after_started=True)
    with FakeServer(script) as target:
        code = main(
            [
                "generate",
                "--server",
                target,
                "--prompt",
                "x",
                "--chunks",
                "2",
                "--out",
                str(tmp_path / "o.mp4"),
            ]
        )
    assert code == 4 and script.calls["StreamGenerate"] == 1
    assert "UNAVAILABLE: worker died" in capsys.readouterr().err


def test_generate_writes_the_fmp4_stream_and_prints_plain_progress(tmp_path, capsys):
    script = Script()
    out = tmp_path / "o.mp4"
    with FakeServer(script) as target:
        code = main(
            [
                "generate",
                "--server",
                target,
                "--prompt",
                "a",
                "--prompt-at",
                "1:b",
                "--chunks",
                "2",
                "--width",
                "64",
                "--height",
                "48",
                "--out",
                str(out),
            ]
        )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"session {SESSION}:" in captured.out and f"wrote {out}" in captured.out
    assert "chunk 0 done (1/2)" in captured.err and "prompt v2 'b'" in captured.err
    assert count_frames(out) == 48
    timeline = script.requests[0].timeline
    assert [(e.from_chunk, e.text) for e in timeline] == [(0, "a"), (1, "b")]


def test_generate_raw_writes_mp4_and_npy_frames(tmp_path):
    out, raw = tmp_path / "o.mp4", tmp_path / "frames"
    with FakeServer() as target:
        code = main(
            [
                "generate",
                "--server",
                target,
                "--prompt",
                "a",
                "--chunks",
                "2",
                "--out",
                str(out),
                "--raw",
                str(raw),
                "--raw-format",
                "npy",
            ]
        )
    assert code == 0
    assert count_frames(out) == 48
    assert sorted(p.name for p in raw.iterdir()) == ["chunk_0000.npy", "chunk_0001.npy"]


def test_cancel_and_status_map_server_answers_to_exit_codes(capsys):
    script = Script()
    with FakeServer(script) as target:
        assert main(["cancel", "--server", target, "abc"]) == 0
        assert main(["status", "--server", target, "abc"]) == 3
        assert main(["models", "--server", target, "--json"]) == 0
    captured = capsys.readouterr()
    assert "session abc: CANCELLED" in captured.out and script.cancelled == ["abc"]
    assert "NOT_FOUND: session 'abc' is unknown" in captured.err
    assert json.loads(captured.out[captured.out.index("{") :])["defaultModel"] == "fake"


def count_frames(path) -> int:
    """Frames ffprobe decodes in the file (ffprobe, not our own reader, is the judge)."""
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(result.stdout.strip())
