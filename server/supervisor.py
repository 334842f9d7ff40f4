"""The worker processes seen from the server: start, talk, watch, restart.

A reader thread blocks on the Pipe and hands each event to the event loop with
call_soon_threadsafe, so the loop never blocks on (possibly large) chunk messages; a writer
thread sends commands, so a busy worker can never stall the loop either. A worker that dies
(EOF on the Pipe) or falls silent past the heartbeat timeout is replaced, with backoff.

With `--world-size N` the worker is a group of N rank processes (this node's share of them with
`--nnodes`), started and restarted together: any rank dying kills the others (followers may be
blocked in a collective on the dead rank), fails the sessions with UNAVAILABLE and starts a new
group. Only rank 0 speaks the command protocol; the other ranks' Pipes say ready, or by closing
that the rank is gone.
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

from engine import ipc
from engine.launch import RankSpec, free_port, run_follower, run_worker
from engine.logs import event
from server.config import WorkerConfig
from server.errors import Unavailable
from server.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_RESTART_BACKOFF_S = 30.0


class WorkerStartError(RuntimeError):
    """The worker could not load the model."""


class WorkerProcess:
    """One spawned worker (or rank of a group) and the two threads around its Pipe."""

    def __init__(
        self,
        config: WorkerConfig,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[WorkerProcess, ipc.Event], None],
        on_exit: Callable[[WorkerProcess], None],
        rank: RankSpec | None = None,  # None: the single worker, no group
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe(duplex=True)
        self.rank = 0 if rank is None else rank.rank
        target = run_worker if self.rank == 0 else run_follower
        self.process = context.Process(
            target=target,
            args=(child, config, rank) if rank is not None else (child, config),
            name=f"magistream-worker-{self.rank}",
            daemon=True,
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
        """Ask it to finish, then kill it if it does not within timeout_s. (A follower rank
        ignores commands: rank 0's shutdown stops it.)"""
        self.send(ipc.Shutdown())
        self._outbox.put(None)
        await asyncio.to_thread(self.process.join, timeout_s)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 5)


class Supervisor:
    """Keeps the worker (group) running and tells the session manager what rank 0 says."""

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
        self.ranks: list[WorkerProcess] = []  # this node's ranks of the current group
        self._ready_ranks: set[int] = set()
        self.ready = asyncio.Event()  # every local rank has loaded its weights
        self.last_seen = 0.0  # monotonic time of rank 0's last message
        self.stopping = False
        self.restarts = 0
        self._started: asyncio.Future[None] | None = None
        self._backoff_s = 0.5

    @property
    def worker(self) -> WorkerProcess | None:
        """Rank 0, which runs the engine; None on a node of followers only."""
        return next((w for w in self.ranks if w.rank == 0), None)

    async def start(self) -> None:
        """Start the first worker (group); raise WorkerStartError if it cannot load the model."""
        self._started = asyncio.get_running_loop().create_future()
        self._spawn()
        await self._started

    def _spawn(self) -> None:
        """The one place a worker group starts (first start and every restart)."""
        group = self.config.group
        loop = asyncio.get_running_loop()
        if group.world_size == 1:
            specs: list[RankSpec | None] = [None]
        else:
            # A fresh port per group on one host: the last group's rendezvous may linger.
            port = group.master_port or free_port()
            specs = [
                RankSpec(
                    rank=r,
                    world_size=group.world_size,
                    local_rank=r - group.local_ranks.start,
                    master_addr=group.master_addr,
                    master_port=port,
                    timeout_s=group.timeout_s,
                )
                for r in group.local_ranks
            ]
        self._ready_ranks = set()
        self.ranks = [
            WorkerProcess(self.config, loop, self._handle, self._exited, spec) for spec in specs
        ]
        event(
            logger,
            "worker.spawned",
            pid=self.ranks[0].pid,
            ranks=",".join(str(w.rank) for w in self.ranks),
            pids=",".join(str(w.pid) for w in self.ranks),
        )

    def healthy(self) -> bool:
        if not self.ready.is_set():
            return False
        if self.worker is None:  # followers only: their health is being alive
            return True
        return time.monotonic() - self.last_seen < self.heartbeat_timeout_s

    def send(self, command: ipc.Command) -> None:
        if not self.config.group.leads:
            raise Unavailable("this node runs follower ranks only; send requests to node 0")
        worker = self.worker
        if not self.ready.is_set() or worker is None:
            raise Unavailable("the worker is restarting; retry shortly")
        worker.send(command)

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
        if worker not in self.ranks:
            return  # a late message from a replaced worker
        if worker.rank == 0:
            self.last_seen = time.monotonic()
        if isinstance(message, ipc.WorkerReady):
            self._ready_ranks.add(worker.rank)
            if len(self._ready_ranks) < len(self.ranks):
                return
            self._backoff_s = 0.5
            self.last_seen = time.monotonic()
            self.ready.set()
            self.metrics.worker_up.set(1)
            leader = self.worker
            event(
                logger,
                "worker.ready",
                pid=message.pid if leader is None else leader.pid,
                pids=",".join(str(w.pid) for w in self.ranks),  # in rank order
            )
            if self._started is not None and not self._started.done():
                self._started.set_result(None)
        elif isinstance(message, ipc.WorkerFailed):
            event(logger, "worker.failed", level=logging.ERROR, error=message.error)
            if self._started is not None and not self._started.done():
                self._started.set_exception(WorkerStartError(message.error))
        elif worker.rank != 0:
            return  # followers say nothing else
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
        self.metrics.fork_history.set(beat.fork_history_bytes)
        self.metrics.fork_history_held.set(beat.fork_history_held_bytes)

    def _observe_step(self, step: ipc.StepDone) -> None:
        self.metrics.engine_step.observe(step.step_s)
        self.metrics.engine_batch_chunks.observe(step.chunk_slots)
        self.metrics.engine_batch_sessions.observe(step.sessions)

    def _exited(self, worker: WorkerProcess) -> None:
        if worker not in self.ranks:
            return  # a rank of a group already torn down
        code = worker.process.exitcode
        group, self.ranks = self.ranks, []
        self.ready.clear()
        self.metrics.worker_up.set(0)
        for gauge in (
            self.metrics.kv_cache,
            self.metrics.memory_reserved,
            self.metrics.chunks_in_flight,
        ):
            gauge.set(0)
        if self.stopping:
            return  # stop() winds the other ranks down
        for other in group:  # the rest may be blocked in a collective on the dead rank
            other.kill()
        world = self.config.group.world_size
        which = "" if world == 1 else f"rank {worker.rank} of {world}, "
        event(
            logger,
            "worker.died",
            level=logging.ERROR,
            pid=worker.pid,
            rank=worker.rank,
            exit_code=code,
        )
        self._on_lost(f"the worker process died ({which}exit code {code}); retry the request")
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
        """Called periodically: a rank 0 silent past the timeout is hung (or blocked on a hung
        rank); kill it, and the normal group restart follows."""
        worker = self.worker
        if self.ready.is_set() and not self.healthy() and worker is not None:
            event(
                logger,
                "worker.hung",
                level=logging.ERROR,
                pid=worker.pid,
                silent_s=time.monotonic() - self.last_seen,
            )
            worker.kill()  # the reader then sees EOF and the normal restart follows

    async def stop(self, timeout_s: float = 10.0) -> None:
        self.stopping = True
        self.ready.clear()
        ranks = self.ranks
        worker = self.worker
        if worker is not None:
            await worker.stop(timeout_s)  # rank 0 tells its followers to stop
        for rank in ranks:
            if rank is not worker:
                await rank.stop(timeout_s if worker is not None else 0.0)
