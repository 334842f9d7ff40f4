"""Serve and stop: wire the parts together, start the worker, drain on SIGTERM.

Start order: the gRPC port opens first with health NOT_SERVING (so probes get an answer while
the model loads), then the worker starts; health turns SERVING once it is ready and answering.
On SIGTERM or SIGINT: health NOT_SERVING, new sessions refused with UNAVAILABLE, running ones
get `grace_period_s` to finish, the rest fail with UNAVAILABLE, then everything stops (exit 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from engine.logs import event
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from scheduler.session import SessionState
from server.auth import AuthInterceptor, Credentials
from server.config import MAX_SEND_BYTES, ServerConfig
from server.encode import VideoEncoding
from server.errors import ServiceError
from server.interceptors import StatusInterceptor
from server.memory import Reclaimer
from server.metrics import Metrics
from server.metrics_http import MetricsServer
from server.pools import BoundedPool
from server.realtime import Realtime
from server.service import VideoGenerationService
from server.sessions import SessionManager
from server.snapshots import SnapshotStore
from server.supervisor import Supervisor
from server.validation import ServedModel
from server.web import WebServer, page_address

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VideoGeneration"].full_name
WATCH_INTERVAL_S = 0.25
CREDENTIALS_CHECK_S = 2.0  # how often the tokens and certificate files are checked for changes


class App:
    """Everything one server process runs."""

    def __init__(
        self,
        config: ServerConfig,
        model: ServedModel,
        encoding: VideoEncoding,
        credentials: Credentials | None = None,
    ) -> None:
        self.config = config
        # made (and its files checked) by the entry point before anything starts
        self.credentials = credentials or Credentials(config.security)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.supervisor = Supervisor(
            config.worker,
            self.metrics,
            config.heartbeat_timeout_s,
            on_event=lambda message: self.sessions.on_event(message),
            on_lost=self._worker_lost,
        )
        self.sessions = SessionManager(
            self.supervisor,
            self.metrics,
            config.session_ttl_s,
            config.startup_timeout_s,
            config.security,
            SnapshotStore(config.snapshot_dir) if config.snapshot_dir else None,
            config.snapshot_every,
        )
        self.decode_pool = BoundedPool("decode", config.decode_threads, config.decode_queue)
        # encoding is bounded by the sessions themselves (one chunk each at a time)
        self.encode_pool = BoundedPool("encode", config.encode_threads, 1 << 30)
        self.model, self.encoding = model, encoding
        self.serving: bool | None = None  # what health says now; None before the first set
        self.reclaimer = Reclaimer()  # hands freed memory (request bytes) back to the OS
        self.web: WebServer | None = None  # the HTTP port, when --http-port is set

    def _build_server(self) -> None:
        """gRPC objects bind to the running loop, so they are made inside it."""
        self.health = health.aio.HealthServicer()
        open_reflection = self.config.security.reflection == "open"
        self.server = grpc.aio.server(
            # authentication first: a refused call never reaches the handler or its parsing
            interceptors=[
                AuthInterceptor(self.credentials, self.metrics, open_reflection),
                StatusInterceptor(self.metrics),
            ],
            options=[
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.max_receive_message_length", _max_request_bytes(self.config)),
            ],
        )
        self.service = service = VideoGenerationService(
            self.sessions,
            self.model,
            self.config.limits,
            self.encoding,
            self.decode_pool,
            self.encode_pool,
            self.metrics,
        )
        pb_grpc.add_VideoGenerationServicer_to_server(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.security.reflection != "off":
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )

    async def run(self, out: TextIO) -> int:
        c = self.config
        self._build_server()
        await self._set_health(False)
        tls = self.credentials.server_credentials()
        address = f"{c.host}:{c.port}"
        port = (
            self.server.add_secure_port(address, tls)
            if tls
            else self.server.add_insecure_port(address)
        )
        await self.server.start()
        metrics_http = MetricsServer(
            c.metrics_host, c.metrics_port, self.registry, self.metrics, self.credentials
        )
        print(f"listening on {c.host}:{port}", file=out, flush=True)
        print(f"metrics on {c.metrics_host}:{metrics_http.port}", file=out, flush=True)
        self.web = await self._start_web()
        if self.web is not None:
            host = c.http_host or c.host
            print(f"http on {host}:{self.web.port}", file=out, flush=True)
            page = page_address(self.web.scheme, host, self.web.port)
            print(f"playground: {page}", file=out, flush=True)
        print(_security_line(c), file=out, flush=True)
        event(
            logger,
            "server.started",
            port=port,
            metrics_port=metrics_http.port,
            http_port=self.web.port if self.web is not None else None,
            tls=tls is not None,
            mutual_tls=c.security.tls_client_ca is not None,
            tokens=c.security.auth_tokens is not None,
            protected_mode=self.credentials.protected,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self.credentials.reload_if_changed(force=True)
        )
        if not await self._start_worker(stop):
            await self._shutdown(metrics_http)
            return 0 if stop.is_set() else 1
        watchdog = asyncio.create_task(self._watch())
        await stop.wait()
        event(
            logger,
            "server.draining",
            grace_period_s=c.grace_period_s,
            live_sessions=len(self.sessions.live()),
        )
        await self._drain()
        watchdog.cancel()
        await self._shutdown(metrics_http)
        event(logger, "server.stopped")
        return 0

    async def _start_web(self) -> WebServer | None:
        """The playground page and the WebSocket realtime API, when --http-port is set."""
        c = self.config
        if c.http_port is None:
            return None
        # a start message carries its media as base64: 4/3 of the bytes, and room for the rest
        max_message = _max_request_bytes(c) * 4 // 3 + (64 << 10)
        realtime = Realtime(self.service, self.credentials, self.metrics, max_message)
        web = WebServer(realtime, self.credentials, self.metrics, c.http_origins)
        await web.start(c.http_host or c.host, c.http_port)
        return web

    async def _start_worker(self, stop: asyncio.Event) -> bool:
        """Whether the worker is up; False if it failed to load or a SIGTERM came first (a
        large model may take minutes to load, and a stop should not wait for it)."""
        starting = asyncio.create_task(self.supervisor.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            return False
        if starting.exception() is not None:
            error = str(starting.exception())
            event(logger, "server.worker_start_failed", level=logging.ERROR, error=error)
            return False
        return True

    async def _watch(self) -> None:
        """Health follows the worker; hung workers are replaced; old sessions forgotten;
        changed credential files reloaded."""
        last_check = time.monotonic()
        while True:
            if time.monotonic() - last_check >= CREDENTIALS_CHECK_S:
                last_check = time.monotonic()
                self.credentials.reload_if_changed()
            self.supervisor.check()
            self.sessions.sweep()
            self.reclaimer.poll()
            await self._set_health(self.supervisor.healthy() and not self.sessions.draining)
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _worker_lost(self, reason: str) -> None:
        # Health first: the task is queued before the failed streams' tasks run, so a client
        # that sees UNAVAILABLE and then probes health finds NOT_SERVING.
        self._health_update = asyncio.get_running_loop().create_task(self._set_health(False))
        self.sessions.on_worker_lost(reason)

    async def _set_health(self, serving: bool) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _drain(self) -> None:
        self.sessions.draining = True
        await self._set_health(False)
        deadline = time.monotonic() + self.config.grace_period_s
        await self._snapshot_the_unfinishable()
        while self.sessions.live() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in self.sessions.live():
            self.sessions.cancel(
                session,
                reason=f"the server is shutting down and the {self.config.grace_period_s:g}"
                " s grace period ran out; retry on another replica",
                state=SessionState.FAILED,
                code=grpc.StatusCode.UNAVAILABLE,
            )
        # Streams still open get to send their `finished` event before the port closes.
        await self.server.stop(grace=5.0)

    async def _snapshot_the_unfinishable(self) -> None:
        """With a snapshot store, the sessions that will not finish within the grace period
        (by the chunks they have left and the recent chunk interval) are written to it now and
        end UNAVAILABLE with the resume token in their trailing metadata: the client continues
        them on another replica (the SDK on its own), at the cost of a pause. Detached
        sessions, whose client could not get the token, are cancelled at once instead of
        holding the drain to its end."""
        grace = self.config.grace_period_s
        for session in self.sessions.live():
            if session.detached_at is not None:
                self.sessions.cancel(session, "the server is shutting down; it was detached")
                continue
            if self.sessions.store is None or session.ended:
                continue
            left = session.spec.num_chunks and session.spec.num_chunks - session.chunks_done
            if left and left * self.sessions.chunk_interval_s() <= grace:
                continue  # it will finish in time
            try:
                token, from_chunk, _ = await self.sessions.snapshot(session.id, session.owner)
            except ServiceError as e:  # no boundary yet, say: the grace period decides
                event(logger, "session.drain_snapshot_failed", session.key, error=str(e))
                continue
            self.sessions.cancel(
                session,
                reason="the server is shutting down; the session was saved: resume it with the "
                "x-resume-token of this call's trailing metadata (the SDK does so on its own)",
                state=SessionState.FAILED,
                code=grpc.StatusCode.UNAVAILABLE,
                resume=(token, from_chunk),
            )

    async def _shutdown(self, metrics_http) -> None:
        await self.server.stop(grace=None)
        if self.web is not None:
            await self.web.close()
        await self.supervisor.stop()
        metrics_http.shutdown()
        self.decode_pool.shutdown()
        self.encode_pool.shutdown()


async def serve(
    config: ServerConfig,
    model: ServedModel,
    encoding: VideoEncoding,
    credentials: Credentials,
    out: TextIO,
) -> int:
    """Run a server until SIGTERM/SIGINT; the process exit code."""
    return await App(config, model, encoding, credentials).run(out)


def _security_line(config: ServerConfig) -> str:
    """What the operator should know at start: who may call, and how."""
    s = config.security
    transport = "mutual TLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext"
    if s.credentials_configured:
        how = " and ".join(
            ([f"bearer tokens ({s.auth_tokens})"] if s.auth_tokens else [])
            + (["client certificates"] if s.tls_client_ca else [])
        )
        return f"security: {transport}; callers authenticate with {how}"
    if s.insecure:
        return (
            f"security: {transport}; NO credentials and --insecure: every address may open, "
            "watch and cancel any session"
        )
    return (
        f"security: {transport}; protected mode: no credentials are configured, so only "
        "loopback clients are served (set --auth-tokens or --tls-client-ca to serve others, "
        "or --insecure 1)"
    )


def _max_request_bytes(config: ServerConfig) -> int:
    """Room for the largest media a request may carry, plus its other fields."""
    limits = config.limits
    return max(limits.max_image_bytes, limits.max_video_bytes) + (1 << 20)
