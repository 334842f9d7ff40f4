"""The SDK and magi-client against the real server (`python -m server --model tiny`) on
loopback: 64x64, a few chunks, 4-8 steps. The CLI runs as `python -m client`, as a user runs
it; ffprobe, not our own reader, judges the files."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from client import Ack, AsyncClient, ChunkEvent, Client, GenerateOptions, MagiError
from proto import video_generation_pb2 as pb
from tests.client.conftest import REPO
from tests.client.test_cli import count_frames

SMALL = ["--width", "64", "--height", "64", "--steps", "4"]
CHUNK_LINE = re.compile(r"^chunk (\d+) done \(\d+/\S+\): .* prompt v(\d+) '(.*)'$", re.M)
ACK_LINE = re.compile(r"^prompt v(\d+) steers from chunk (\d+): '(.*)'$", re.M)
SESSION_LINE = re.compile(r"^session (\S+):", re.M)


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=180,
        **kw,
    )


def chunk_prompts(stderr: str) -> dict[int, str]:
    """chunk index -> the prompt text that steered it, from the plain progress lines."""
    return {int(m[1]): m[3] for m in CHUNK_LINE.finditer(stderr)}


def test_generate_writes_a_file_ffprobe_decodes_to_the_expected_frames(server_target, tmp_path):
    out = tmp_path / "out.mp4"
    done = cli(
        "generate",
        "--server",
        server_target,
        "--prompt",
        "a red ball rolls",
        "--chunks",
        "2",
        "--seed",
        "5",
        *SMALL,
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert count_frames(out) == 48
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height,codec_name",
            "-of",
            "csv=p=0",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "h264,64,64"
    assert "first chunk" in done.stderr and f"wrote {out}" in done.stdout


def test_prompt_at_steers_the_chunks_from_its_index(server_target, tmp_path):
    done = cli(
        "generate",
        "--server",
        server_target,
        "--prompt",
        "a red ball",
        "--prompt-at",
        "2:a blue ball",
        "--chunks",
        "3",
        *SMALL,
        "--out",
        str(tmp_path / "out.mp4"),
    )
    assert done.returncode == 0, done.stderr
    assert chunk_prompts(done.stderr) == {0: "a red ball", 1: "a red ball", 2: "a blue ball"}


def test_live_through_a_pipe_steers_the_chunks_its_acks_name(server_target, tmp_path):
    out = tmp_path / "live.mp4"
    # stdin is written before the session starts; the CLI pushes each line once it has,
    # which is long before chunk 6 enters the denoising window
    lines = "the ball turns blue\n@6 the ball stops\n"
    done = cli(
        "live",
        "--server",
        server_target,
        "--prompt",
        "a red ball",
        "--chunks",
        "8",
        *SMALL,
        "--out",
        str(out),
        input=lines,
    )
    assert done.returncode == 0, done.stderr
    acks = [(int(m[2]), m[3]) for m in ACK_LINE.finditer(done.stdout)]
    assert [text for _, text in acks] == ["the ball turns blue", "the ball stops"]
    assert acks[1][0] == 6
    timeline = sorted([(0, "a red ball"), *acks])
    expected = {k: max(e for e in timeline if e[0] <= k)[1] for k in range(8)}
    assert chunk_prompts(done.stderr) == expected
    assert count_frames(out) == 8 * 24


def test_ctrl_c_leaves_a_playable_partial_file_and_the_session_is_gone(server_target, tmp_path):
    out, log_out, log_err = tmp_path / "out.mp4", tmp_path / "stdout", tmp_path / "stderr"
    with log_out.open("w") as so, log_err.open("w") as se:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "client",
                "generate",
                "--server",
                server_target,
                "--prompt",
                "a red ball",
                "--chunks",
                "200",  # far more than arrive before the Ctrl-C, within the default cap (256)
                *SMALL,
                "--out",
                str(out),
            ],
            cwd=REPO,
            stdout=so,
            stderr=se,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait(lambda: "chunk 1 done" in log_err.read_text(), "two chunks to arrive")
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130, log_err.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    chunks = len(CHUNK_LINE.findall(log_err.read_text()))
    assert 2 <= chunks < 200
    assert count_frames(out) == 24 * chunks  # every chunk that arrived, and all of it
    session = SESSION_LINE.search(log_out.read_text())[1]
    with Client(server_target) as client:
        try:
            state = client.get_session(session).state
        except MagiError as e:  # forgotten already counts as gone
            assert e.code.name == "NOT_FOUND"
        else:
            assert state == pb.SESSION_STATE_CANCELLED


def test_refused_request_exits_3_with_the_servers_message(server_target, tmp_path):
    done = cli(
        "generate",
        "--server",
        server_target,
        "--prompt",
        "x",
        "--chunks",
        "1",
        "--width",
        "72",
        "--height",
        "64",
        "--out",
        str(tmp_path / "out.mp4"),
    )
    assert done.returncode == 3
    assert "magi-client: INVALID_ARGUMENT: width_px: 72 is not allowed" in done.stderr


def test_models_and_status_commands_show_the_server_and_a_session(server_target, tmp_path):
    models = cli("models", "--server", server_target)
    assert models.returncode == 0 and models.stdout.startswith("tiny (default)")
    done = cli(
        "generate",
        "--server",
        server_target,
        "--prompt",
        "x",
        "--chunks",
        "1",
        *SMALL,
        "--session-id",
        "e2e-status",
        "--out",
        str(tmp_path / "out.mp4"),
    )
    assert done.returncode == 0, done.stderr
    status = cli("status", "--server", server_target, "e2e-status")
    assert status.returncode == 0
    assert "session e2e-status: FINISHED" in status.stdout and "chunks 1/1" in status.stdout


def test_sync_sdk_streams_raw_frames_and_steers_with_update_prompt(server_target):
    # 6 chunks of 8 steps: the last chunk enters the window ~10 forwards in, so the prompt
    # pushed right after `started` always finds a chunk left to steer
    options = GenerateOptions.of(
        "a red ball", chunks=6, width=64, height=64, steps=8, raw=True, seed=1
    )
    with Client(server_target) as client, client.generate(options) as stream:
        assert stream.start().params.output_encoding == pb.OUTPUT_ENCODING_RAW_RGB24
        ack = stream.push_prompt("a blue ball")
        chunks = list(stream)
    assert ack.accepted and 0 <= ack.from_chunk < 6
    assert [c.index for c in chunks] == [0, 1, 2, 3, 4, 5]
    assert all(len(c.frames) == 24 and {len(f) for f in c.frames} == {64 * 64 * 3} for c in chunks)
    assert [c.prompt_text for c in chunks] == [
        "a blue ball" if k >= ack.from_chunk else "a red ball" for k in range(6)
    ]
    assert stream.finished.state == "FINISHED" and stream.finished.stats.chunks_done == 6


async def test_async_interact_cancel_ends_the_session_on_the_server(server_target):
    async with AsyncClient(server_target) as client:
        stream = client.interact("a red ball", chunks=200, width=64, height=64, steps=4)
        async for item in stream:
            if isinstance(item, ChunkEvent) and item.index == 0:
                await stream.push_prompt("a blue ball")
                await stream.cancel()
        info = await client.get_session(stream.session_id)
    assert stream.finished.state == "CANCELLED"
    assert info.state == pb.SESSION_STATE_CANCELLED and info.stats.chunks_done < 200


def test_sync_interact_takes_prompts_from_another_thread_and_acks_them_in_order(server_target):
    options = GenerateOptions.of("a red ball", chunks=6, width=64, height=64, steps=8)
    with Client(server_target) as client, client.interact(options) as stream:
        stream.start()

        def push() -> None:
            stream.push_prompt("a blue ball")
            stream.push_prompt("a green ball", from_chunk=5)
            stream.done_writing()

        pusher = threading.Thread(target=push)
        pusher.start()
        items = list(stream)
        pusher.join()
    acks = [item for item in items if isinstance(item, Ack)]
    assert [(a.text, a.accepted) for a in acks] == [("a blue ball", True), ("a green ball", True)]
    assert acks[1].from_chunk == 5
    chunks = [item for item in items if isinstance(item, ChunkEvent)]
    assert [c.prompt_text for c in chunks][5] == "a green ball"
    assert stream.finished.state == "FINISHED"


def _wait(predicate, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
