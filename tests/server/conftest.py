"""Real `python -m server` processes on loopback (port 0), each with its real worker process.

One shared server serves most tests; tests that stop, kill or fill a server start their own.
Everything a server writes goes under pytest's tmp dirs (MAGISTREAM_CACHE), never to $HOME.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


class ServerProcess:
    """A `python -m server` subprocess: its address, its logs, and how to stop it."""

    def __init__(self, tmp: Path, model: str | Path, *args: str, env: dict | None = None) -> None:
        self.log_path = tmp / "server.log"
        cache = tmp / "cache"
        full_env = {
            **os.environ,
            "MAGISTREAM_CACHE": str(cache),
            "MAGISTREAM_TORCH_THREADS": "1",
            "MAGISTREAM_HOST": "127.0.0.1",
            "MAGISTREAM_METRICS_HOST": "127.0.0.1",
            "MAGISTREAM_PORT": "0",
            "MAGISTREAM_METRICS_PORT": "0",
            "MAGISTREAM_ENCODE_THREADS": "1",
            "MAGISTREAM_X264_PRESET": "ultrafast",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        command = [sys.executable, "-m", "server", *args]
        if model:
            command += ["--model", str(model)]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.address, self.metrics_address = self._read_addresses()

    def _read_addresses(self) -> tuple[str, str]:
        found: dict[str, str] = {}

        def read() -> None:
            for line in self.proc.stdout:
                m = re.match(r"(listening|metrics) on (\S+)", line)
                if m:
                    found[m.group(1)] = m.group(2)
                if len(found) == 2:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if len(found) != 2:
            self.proc.kill()
            raise RuntimeError(f"server did not start:\n{self.logs()}")
        return found["listening"], found["metrics"]

    def logs(self) -> str:
        return self.log_path.read_text()

    def worker_pid(self) -> int:
        pids = re.findall(r"event=worker.ready pid=(\d+)", self.logs())
        return int(pids[-1])

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample, e.g. metric("magistream_sessions_active")."""
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)"
        m = re.search(r"^" + pattern + r"$", self.metrics_text(), re.M)
        return float(m.group(1)) if m else 0.0

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"server not SERVING within {timeout_s} s:\n{self.logs()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return -1


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
        server = ServerProcess(tmp_path_factory.mktemp("server"), model or "", *args, env=env)
        started.append(server)
        if wait:
            server.wait_serving()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared server: small limits so validation tests can reach them."""
    return start_server(
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
