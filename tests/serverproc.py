"""One real `magi-server` (`python -m server`) subprocess, for tests and benches alike.

The server listens on loopback (port 0 unless told otherwise), writes embedded models under
its own folder (never $HOME), and sends stdout and stderr to one log file: a file, not a pipe
nobody would drain. Its `listening on` and `metrics on` lines give the addresses.

    with ServerProcess(tmp, "--max-sessions", "1", model="tiny") as server:
        server.wait_serving()
        ...  # server.address, server.metric("magistream_sessions_active"), server.logs()
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0  # writing the tiny model and starting a worker, on 2 busy cores
STOP_TIMEOUT_S = 30.0  # after SIGTERM, before SIGKILL
SERVING = health_pb2.HealthCheckResponse.SERVING
# One thread each and the fastest encode: tests share 2 cores with the worker processes.
# Flags given to ServerProcess come after these, so they win.
QUIET_FLAGS = ("--torch-threads", "1", "--encode-threads", "1", "--x264-preset", "ultrafast")
_ADDRESS = re.compile(r"^(listening|metrics|http) on (\S+)$", re.M)


class ServerProcess:
    """A started `python -m server`: its addresses, its log, and how to stop it.

    `tmp` holds `server.log` and the model cache (`cache/`). The constructor only starts the
    process; `wait_listening()` (or `with`) waits for its addresses, `wait_serving()` for its
    worker. `model=None` leaves --model out (the server's default model)."""

    def __init__(
        self,
        tmp: Path,
        *flags: str,
        model: str | Path | None = "tiny",
        port: int = 0,
        metrics_port: int = 0,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        ca: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
        token: str | None = None,
    ) -> None:
        """`ca` (and `client_cert`, a (cert, key) pair, for mutual TLS): the server speaks TLS
        and these are what the helpers here (health, metrics) connect with; `token` is sent to
        the metrics port."""
        self.ca, self.client_cert, self.token = ca, client_cert, token
        self.log_path = tmp / "server.log"
        self.cache = tmp / "cache"
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.address = self.metrics_address = ""
        # HOST:PORT of the playground and realtime API, when --http-port is among the flags
        self.http_address = ""
        self.http = "--http-port" in flags
        self.command = [
            sys.executable,
            "-m",
            "server",
            *(("--model", str(model)) if model else ()),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port)),
            *("--cache", str(self.cache)),
            *QUIET_FLAGS,
            *flags,
        ]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
        tmp.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as sink:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen(
                self.command, cwd=REPO, env=full_env, stdout=sink, stderr=sink
            )

    # ---- starting ----------------------------------------------------------------------

    def wait_listening(self, timeout_s: float | None = None) -> str:
        """Wait for the `listening on` and `metrics on` lines; return HOST:PORT of gRPC. On
        failure the process is stopped and the error holds the log's tail."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            found = dict(_ADDRESS.findall(self.logs()))
            wanted = {"listening", "metrics"} | ({"http"} if self.http else set())
            if wanted <= found.keys():
                self.address, self.metrics_address = found["listening"], found["metrics"]
                self.http_address = found.get("http", "")
                return self.address
            if self.proc.poll() is not None:
                self._fail(f"the server exited ({self.proc.returncode}) before listening")
            if time.monotonic() > deadline:
                self._fail(f"the server did not print 'listening on' in {timeout_s:.0f} s")
            time.sleep(0.1)

    def wait_serving(self, timeout_s: float | None = None) -> None:
        """Wait until gRPC health says SERVING (the worker is up)."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        if not self.address:
            self.wait_listening(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if health_status(self.address, credentials=self.channel_credentials()) == SERVING:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"server not SERVING within {timeout_s} s:\n{self.log_tail()}")

    def _fail(self, why: str) -> None:
        self.stop()
        raise RuntimeError(f"{why}: {' '.join(self.command)}\n{self.log_tail()}")

    # ---- what it is and says -----------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_address.rsplit(":", 1)[1])

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.logs()[-chars:]

    def worker_pids(self) -> list[int]:
        """The current worker group's pids in rank order (from the last worker.ready line)."""
        found = re.findall(r"event=worker.ready pid=\d+ pids=([\d,]+)", self.logs())
        return [int(p) for p in found[-1].split(",")]

    def worker_pid(self) -> int:
        """The current rank-0 worker's pid."""
        return int(re.findall(r"event=worker.ready pid=(\d+)", self.logs())[-1])

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """For a channel to this server: None = plaintext."""
        if self.ca is None:
            return None
        cert, key = self.client_cert or (None, None)
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(),
            key.read_bytes() if key else None,
            cert.read_bytes() if cert else None,
        )

    def channel(self, **options) -> grpc.Channel:
        """A blocking channel to the server, TLS when the server speaks it."""
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.insecure_channel(self.address, **options)
        return grpc.secure_channel(self.address, credentials, **options)

    def metrics_text(self) -> str:
        scheme, context = "http", None
        if self.ca is not None:
            scheme, context = "https", ssl.create_default_context(cafile=str(self.ca))
            if self.client_cert is not None:
                context.load_cert_chain(*map(str, self.client_cert))
        request = urllib.request.Request(f"{scheme}://{self.metrics_address}/metrics")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=5, context=context) as r:
            return r.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample's value, 0 if absent: metric("magistream_sessions_active"), or with
        labels in either argument: metric('magistream_prompt_updates_total{result="accepted"}')."""
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)"
        m = re.search(r"^" + pattern + r"$", self.metrics_text(), re.M)
        return float(m.group(1)) if m else 0.0

    # ---- stopping ----------------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM without waiting: the server drains, then exits."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM, wait up to timeout_s (default stop_timeout_s), then SIGKILL."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        """Waits for the addresses (not for the worker: see wait_serving)."""
        try:
            self.wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def health_status(
    address: str, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> int:
    """The gRPC health status of a server (or of one of its services); -1 if it does not
    answer."""
    channel = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return -1
