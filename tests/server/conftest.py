"""Real `python -m server` processes on loopback (port 0), each with its real worker process.

One shared server serves most tests; tests that stop, kill or fill a server start their own.
Everything a server writes goes under pytest's tmp dirs (its --cache), never to $HOME.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import uvloop

from tests.serverproc import REPO, ServerProcess, health_status

# REPO, ServerProcess and health_status: for the tests that import them from here
__all__ = ["REPO", "ServerProcess", "health_status", "wait_for"]

START_TIMEOUT_S = 60.0


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def start_server(tiny_folder, tmp_path_factory):
    """Start a dedicated server: start_server("--max-sessions", "1", ...). Stopped at the end
    of the session if the test did not stop it."""
    started: list[ServerProcess] = []

    def start(
        *args: str,
        model: str | Path | None = tiny_folder,
        env: dict | None = None,
        wait: bool = True,
    ) -> ServerProcess:
        server = ServerProcess(
            tmp_path_factory.mktemp("server"),
            "--allow-unbounded",
            "1",
            *args,
            model=model,
            env=env,
            start_timeout_s=START_TIMEOUT_S,
        )
        started.append(server)
        server.wait_listening()
        if wait:
            server.wait_serving()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, tmp_path_factory) -> ServerProcess:
    """The shared server: small limits so validation tests can reach them; the HTTP port on
    (tests/server/test_realtime.py); a snapshot store (`server.snapshot_dir`,
    tests/server/test_snapshot.py starts a second replica on it)."""
    snapshots = tmp_path_factory.mktemp("snapshots")
    server = start_server(
        "--snapshot-dir",
        str(snapshots),
        "--http-port",
        "0",
        "--max-sessions",
        "4",
        "--queue-size",
        "4",
        "--max-width",
        "256",
        "--max-height",
        "256",
        "--max-prompt-chars",
        "200",
        "--max-image-bytes",
        "200000",
        "--max-pixels",
        "1000000",
    )
    server.snapshot_dir = snapshots
    return server
