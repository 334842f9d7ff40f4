"""The real server for the client's end-to-end tests: `python -m server --model tiny` on
loopback port 0, with its embedded-model cache in a temp folder. Module-scoped: only
test_e2e.py uses it, so it starts once and is gone before the rest of the suite runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0  # writing the tiny model and starting the worker, on 2 busy cores
LISTENING = re.compile(r"listening on (\S+:\d+)")


@pytest.fixture(scope="module")
def server_target(tmp_path_factory) -> Iterator[str]:
    """HOST:PORT of a running tiny-model server."""
    tmp = tmp_path_factory.mktemp("magi-server")
    log = tmp / "server.log"
    env = {**os.environ, "MAGISTREAM_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "server",
        "--model",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
    ]
    with log.open("wb") as sink:
        # stdout and stderr to a file, not a pipe: a pipe nobody drains would stall the server
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
    try:
        yield _wait_listening(process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_listening(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if match := LISTENING.search(log.read_text(errors="replace")):
            return match.group(1)
        if process.poll() is not None:
            pytest.fail(
                f"the server exited ({process.returncode}) before listening:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.1)
    pytest.fail(f"the server did not print 'listening on' in {START_TIMEOUT_S:.0f} s")
