"""The worker process seen from the server: start, talk, watch, restart.

A reader thread blocks on the Pipe and hands each event to the event loop with
call_soon_threadsafe, so the loop never blocks on (possibly large) chunk messages; a writer
thread sends commands, so a busy worker can never stall the loop either. A worker that dies
(EOF on the Pipe) or falls silent past the heartbeat timeout is replaced, with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from server import ipc
from server.config import WorkerConfig
from server.errors import Unavailable
from server.logs import event
from server.metrics import Metrics
from server.worker import worker_main

logger = logging.getLogger(__name__)

MAX_RESTART_BACKOFF_S = 30.0


class WorkerStartError(RuntimeError):
    """The worker could not load the model."""


class WorkerProcess:
    """One spawned worker and the two threads around its Pipe."""

    def __init__(
        self,
        config: WorkerConfig,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[WorkerProcess, ipc.Event], None],
        on_exit: Callable[[WorkerProcess], None],
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=worker_main, args=(child, config), name="magistream-worker", daemon=True
        )
        self.process.start()
        child.close()  # only the worker holds its end now, so its death reads as EOF here
        self._outbox: queue.SimpleQueue[ipc.Command | None] = queue.SimpleQueue()
        self._loop, self._on_event, self._on_exit = loop, on_event, on_exit
        threading.Thread(target=self._read, name="worker-reader", daemon=True).start()
        threading.Thread(target=self._write, name="worker-writer", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def send(self, command: ipc.Command) -> None:
        self._outbox.put(command)

    def _read(self) -> None:
        conn: Connection = self.conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self.process.join(2)  # here, not on the loop: exitcode is set once it is reaped
                self._call(self._on_exit, self)
                return
            self._call(self._on_event, self, message)

    def _write(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self.conn.send(command)
            except OSError:
                return  # the reader sees the EOF and reports the exit

    def _call(self, fn: Callable, *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the server is gone

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    async def stop(self, timeout_s: float) -> None:
        """Ask it to finish, then kill it if it does not within timeout_s."""
        self.send(ipc.Shutdown())
        self._outbox.put(None)
        await asyncio.to_thread(self.process.join, timeout_s)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 5)


class Supervisor:
    """Keeps one worker running and tells the session manager what it says."""

    def __init__(
        self,
        config: WorkerConfig,
        metrics: Metrics,
        heartbeat_timeout_s: float,
        on_event: Callable[[ipc.Event], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._on_event, self._on_lost = on_event, on_lost
        self.worker: WorkerProcess | None = None
        self.ready = asyncio.Event()
        self.last_seen = 0.0  # monotonic time of the worker's last message
        self.stopping = False
        self.restarts = 0
        self._started: asyncio.Future[None] | None = None
        self._backoff_s = 0.5

    async def start(self) -> None:
        """Start the first worker; raise WorkerStartError if it cannot load the model."""
        self._started = asyncio.get_running_loop().create_future()
        self._spawn()
        await self._started

    def _spawn(self) -> None:
        self.worker = WorkerProcess(
            self.config, asyncio.get_running_loop(), self._handle, self._exited
        )
        event(logger, "worker.spawned", pid=self.worker.pid)

    def healthy(self) -> bool:
        return self.ready.is_set() and time.monotonic() - self.last_seen < self.heartbeat_timeout_s

    def send(self, command: ipc.Command) -> None:
        if not self.ready.is_set() or self.worker is None:
            raise Unavailable("the worker is restarting; retry shortly")
        self.worker.send(command)

    async def wait_ready(self, timeout_s: float | None) -> None:
        if self.stopping:
            raise Unavailable("the server is shutting down")
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except TimeoutError:
            raise Unavailable(
                "the worker is not ready (still loading or restarting); retry shortly"
            ) from None

    def _handle(self, worker: WorkerProcess, message: ipc.Event) -> None:
        if worker is not self.worker:
            return  # a late message from a replaced worker
        self.last_seen = time.monotonic()
        if isinstance(message, ipc.WorkerReady):
            self._backoff_s = 0.5
            self.ready.set()
            self.metrics.worker_up.set(1)
            event(logger, "worker.ready", pid=message.pid)
            if self._started is not None and not self._started.done():
                self._started.set_result(None)
        elif isinstance(message, ipc.WorkerFailed):
            event(logger, "worker.failed", level=logging.ERROR, error=message.error)
            if self._started is not None and not self._started.done():
                self._started.set_exception(WorkerStartError(message.error))
        elif isinstance(message, ipc.Heartbeat):
            self._observe_heartbeat(message)
        elif isinstance(message, ipc.StepDone):
            self._observe_step(message)
        else:
            self._on_event(message)

    def _observe_heartbeat(self, beat: ipc.Heartbeat) -> None:
        self.metrics.kv_cache.set(beat.kv_cache_bytes)
        self.metrics.memory_reserved.set(beat.reserved_bytes)
        self.metrics.chunks_in_flight.set(beat.chunks_in_flight)

    def _observe_step(self, step: ipc.StepDone) -> None:
        self.metrics.engine_step.observe(step.step_s)
        self.metrics.engine_batch_chunks.observe(step.chunk_slots)
        self.metrics.engine_batch_sessions.observe(step.sessions)

    def _exited(self, worker: WorkerProcess) -> None:
        if worker is not self.worker:
            return
        code = worker.process.exitcode
        self.ready.clear()
        self.metrics.worker_up.set(0)
        for gauge in (
            self.metrics.kv_cache,
            self.metrics.memory_reserved,
            self.metrics.chunks_in_flight,
        ):
            gauge.set(0)
        if self.stopping:
            return
        event(logger, "worker.died", level=logging.ERROR, pid=worker.pid, exit_code=code)
        self._on_lost(f"the worker process died (exit code {code}); retry the request")
        if self._started is not None and not self._started.done():
            self._started.set_exception(WorkerStartError(f"worker exited with code {code}"))
            return
        asyncio.get_running_loop().call_later(self._backoff_s, self._restart)
        self._backoff_s = min(self._backoff_s * 2, MAX_RESTART_BACKOFF_S)

    def _restart(self) -> None:
        if self.stopping:
            return
        self.restarts += 1
        self.metrics.worker_restarts.inc()
        self._spawn()

    def check(self) -> None:
        """Called periodically: a worker silent past the timeout is hung; replace it."""
        if self.ready.is_set() and not self.healthy() and self.worker is not None:
            event(
                logger,
                "worker.hung",
                level=logging.ERROR,
                pid=self.worker.pid,
                silent_s=time.monotonic() - self.last_seen,
            )
            self.worker.kill()  # the reader then sees EOF and the normal restart follows

    async def stop(self, timeout_s: float = 10.0) -> None:
        self.stopping = True
        self.ready.clear()
        if self.worker is not None:
            await self.worker.stop(timeout_s)
