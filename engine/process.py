"""The engine process: owns the model and the chunk scheduler, speaks only over its Pipe.

Its loop: apply every pending command, step the engine if it has work, report what changed;
when nothing can run (no sessions, or all paused by backpressure) block on the Pipe instead of
spinning. It never decides policy the server could decide: it only refuses what the engine
refuses (memory, queue bound) and reports.

With a worker group (`--world-size N`) this is rank 0, and ranks 1..N-1 run `follower_main`:
they join the same torch.distributed group, load their DiT and run rank 0's forwards
(engine.ranks). Their Pipe only says ready (or failed) and, by closing, that they died.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from engine import ipc, logs, snapshot
from engine.engine import ChunkDone, Engine
from engine.launch import AUTO_ON_OFF, CPU_MEMORY_BUDGET_BYTES, WorkerConfig
from engine.logs import event
from engine.ranks import (
    GroupLost,
    RankGroup,
    RankSpec,
    StepLink,
    join_group,
    leave_group,
    load_rank,
    serve_follower,
    wait_loaded,
)
from engine.snapshot import SnapshotError
from model.compile import compile_dit
from model.text import TextConditioning
from scheduler.scheduler import (
    AdmissionRefused,
    ForkRange,
    ForkUnavailable,
    RequestTooLarge,
    SchedulerConfig,
)
from scheduler.session import SessionState

logger = logging.getLogger(__name__)


def worker_main(conn: Connection, config: WorkerConfig, rank: RankSpec | None = None) -> None:
    """Entry point of the spawned worker process: the only one, or rank 0 of a group."""
    _setup_process(config)
    started = time.perf_counter()
    group: RankGroup | None = None
    try:
        device = engine_device(config.device, 0 if rank is None else rank.local_rank)
        if rank is not None:
            group = join_group(rank, device, config.group.join_timeout_s)
        engine = _load_engine(config, group, device)
        if group is not None:
            wait_loaded(group)  # every rank has its weights
    except Exception as e:  # any load failure is reported, not raised into the void
        conn.send(ipc.WorkerFailed(f"{type(e).__name__}: {e}"))
        return
    event(
        logger,
        "worker.loaded",
        folder=config.model_folder,
        load_s=time.perf_counter() - started,
        torch_threads=torch.get_num_threads(),
        device=engine.runner.device,
        world_size=1 if group is None else group.world_size,
    )
    conn.send(ipc.WorkerReady(os.getpid()))
    link = engine.link if isinstance(engine.link, StepLink) else None
    try:
        WorkerLoop(conn, engine, config).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server went away: nothing left to serve
    except GroupLost as e:
        _group_lost(e)
    if link is not None:
        try:
            link.close()  # the followers return and exit
        except GroupLost as e:
            _group_lost(e)
        leave_group()


def follower_main(conn: Connection, config: WorkerConfig, rank: RankSpec) -> None:
    """Entry point of ranks 1..N-1: join the group, load this rank's model and DiT share, run
    rank 0's plans until it stops. Any rank failing ends the process (the supervisor restarts
    the group)."""
    _setup_process(config)
    try:
        device = engine_device(config.device, rank.local_rank)
        group = join_group(rank, device, config.group.join_timeout_s)
        _ensure_folder(config)
        model, forward = load_rank(config.model_folder, group, device)
        compile_dit(forward.dit, config.compile)  # every rank alike: each runs its share
        wait_loaded(group)
    except Exception as e:
        conn.send(ipc.WorkerFailed(f"rank {rank.rank}: {type(e).__name__}: {e}"))
        return
    conn.send(ipc.WorkerReady(os.getpid()))
    try:
        serve_follower(
            model,
            forward,
            _text_conditioning(config),
            AUTO_ON_OFF[config.batch_invariant],
            AUTO_ON_OFF[config.overlap_decode],
        )
    except Exception as e:  # rank 0 or another rank died, or this rank's forward failed
        _group_lost(e)
    leave_group()


def _setup_process(config: WorkerConfig) -> None:
    # The server decides when the worker stops (Shutdown, or the Pipe closing): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not kill sessions behind its back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(config.log_level)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)


def _group_lost(error: Exception) -> None:
    """Another rank died, or a forward failed: this rank's group is over. Exit at once: tearing
    the group down could block on (or abort over) the dead rank; the supervisor restarts every
    rank."""
    event(logger, "worker.group_lost", level=logging.ERROR, error=str(error))
    sys.stderr.flush()
    os._exit(3)


def engine_device(setting: str, local_rank: int = 0) -> torch.device:
    """The device `--device` names for this rank: `auto` is cuda:<local rank> when CUDA is
    there, else the CPU; `cuda` is cuda:<local rank>. A CUDA device this machine does not
    have fails here, at start, saying so."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none: a CPU build of torch"
        raise RuntimeError(
            f"--device {setting}: no CUDA device here (torch {torch.__version__}, CUDA "
            f"{build}); use --device cpu, or install the CUDA build (make install TORCH_INDEX=...)"
        )
    index = local_rank if setting == "cuda" else int(setting.split(":")[1])
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"--device {setting}: cuda:{index} does not exist ({torch.cuda.device_count()} "
            "CUDA devices)"
        )
    exact_fp32()
    return torch.device("cuda", index)


def exact_fp32() -> None:
    """fp32 stays fp32 on CUDA: cuDNN's convolutions run in TF32 by default, which would take
    the fp32 parts (patch embedding, fp32 models, the reference's fp32 islands) off the 1e-5
    the project matches MAGI-1 to. bf16 GEMMs are not affected. (matmul TF32 is off by
    default; it is set here too so that no import can have turned it on.)"""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _load_engine(
    config: WorkerConfig, group: RankGroup | None = None, device: torch.device | None = None
) -> Engine:
    from model.folder import load_model

    _ensure_folder(config)
    device = device or engine_device(config.device)
    if group is None:
        model, forward, link = load_model(config.model_folder, device=device), None, None
    else:  # rank 0 of a group: its own DiT share, and the plans go to every rank
        (model, forward), link = load_rank(config.model_folder, group, device), StepLink(group)
    compile_dit(model.dit if forward is None else forward.dit, config.compile)
    budget = admission_budget(config, device)  # after loading: what the weights left free
    event(
        logger,
        "worker.memory_budget",
        level=logging.WARNING if budget.capped else logging.INFO,
        device=device,
        budget_mib=budget.bytes >> 20,
        source=budget.source,
    )
    sched_config = SchedulerConfig(
        memory_budget_bytes=budget.bytes,
        max_queued=config.queue_size,
        max_chunk_slots=config.max_chunk_slots,
        output_queue_chunks=2,
        max_running=config.max_sessions,
        fork_history=config.fork_history,
        fork_ttl_s=config.fork_ttl_s,
    )
    return Engine(
        model,
        sched_config,
        dit=forward,
        link=link,
        text_conditioning=_text_conditioning(config),
        batch_invariant=AUTO_ON_OFF[config.batch_invariant],
        overlap_decode=AUTO_ON_OFF[config.overlap_decode],
    )


class MemoryBudgetError(RuntimeError):
    """The device has no memory left for sessions after loading the model."""


@dataclass(frozen=True)
class MemoryBudget:
    bytes: int  # admission's budget: KV cache + latents of all running sessions
    source: str  # where it came from, for the start-up log
    capped: bool = False  # an explicit --memory-budget-mb was more than the device has


def device_budget(
    device: str, free_bytes: int, total_bytes: int, reserve_bytes: int, explicit: int | None
) -> MemoryBudget:
    """Admission's budget on a GPU: its free memory after loading, less the reserve (for
    activations, the VAE decode and fragmentation), capped by an explicit budget if one was
    given. Raises MemoryBudgetError, saying what to lower, when nothing is left."""
    mib = 1 << 20
    available = free_bytes - reserve_bytes
    found = (
        f"{device} has {free_bytes // mib} MiB free of {total_bytes // mib} MiB after loading the "
        f"model, less the {reserve_bytes // mib} MiB reserve"
    )
    if available <= 0:
        raise MemoryBudgetError(
            f"{found}: no memory is left for sessions. Lower --memory-reserve-mb (now "
            f"{reserve_bytes // mib}), free the GPU of other processes, or spread the model over "
            "more GPUs (--world-size)"
        )
    if explicit is None:
        return MemoryBudget(available, found)
    if explicit <= available:
        return MemoryBudget(explicit, f"--memory-budget-mb ({found}: {available // mib} MiB)")
    return MemoryBudget(
        available,
        f"{found}; --memory-budget-mb {explicit // mib} is more, lowered to {available // mib}",
        capped=True,
    )


def admission_budget(config: WorkerConfig, device: torch.device) -> MemoryBudget:
    """The budget admission checks sessions against, once the model is on `device`. The CPU
    keeps the configured one (default CPU_MEMORY_BUDGET_BYTES): its memory is the host's,
    shared with everything else, so no free figure of it is the engine's to spend."""
    explicit = config.memory_budget_bytes
    if device.type != "cuda":
        if explicit is None:
            return MemoryBudget(CPU_MEMORY_BUDGET_BYTES, "the CPU default (--memory-budget-mb 0)")
        return MemoryBudget(explicit, "--memory-budget-mb")
    torch.cuda.empty_cache()  # blocks torch cached while loading count as used to the driver
    free, total = torch.cuda.mem_get_info(device)
    return device_budget(str(device), free, total, config.memory_reserve_bytes, explicit)


def device_memory(device: torch.device, budget_bytes: int) -> ipc.DeviceMemory:
    """What the worker reports of its device's memory (with every heartbeat)."""
    resident = _resident_bytes()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return ipc.DeviceMemory(
            device=str(device),
            total_bytes=total,
            free_bytes=free,
            allocated_bytes=torch.cuda.memory_allocated(device),
            reserved_bytes=torch.cuda.memory_reserved(device),
            worker_resident_bytes=resident,
            budget_bytes=budget_bytes,
        )
    total, available = _host_memory()
    return ipc.DeviceMemory(
        device=str(device),
        total_bytes=total,
        free_bytes=available,
        allocated_bytes=None,  # torch keeps no count of CPU tensors
        reserved_bytes=None,
        worker_resident_bytes=resident,
        budget_bytes=budget_bytes,
    )


def _resident_bytes() -> int:
    """This process's resident set (VmRSS); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError, AttributeError):
        return 0


def _host_memory() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of the host in bytes; (0, 0) where /proc is missing."""
    fields = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024  # the file counts kB
    except (OSError, IndexError, ValueError):
        return 0, 0
    return fields.get("MemTotal", 0), fields.get("MemAvailable", 0)


def _text_conditioning(config: WorkerConfig) -> TextConditioning:
    # every rank of a group conditions alike, or their latents would part
    return TextConditioning(neg_prompt=config.neg_prompt)


def _ensure_folder(config: WorkerConfig) -> None:
    """Write the embedded preset's folder if it is missing (every rank may race here)."""
    from model.folder import write_random

    folder = config.model_folder
    if config.write_preset is not None and not (folder / "config.json").is_file():
        # Written next to its final place, then renamed: a concurrent or killed writer never
        # leaves a half-written folder behind under the real name.
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        write_random(config.write_preset, tmp, seed=0)
        try:
            tmp.rename(folder)
        except OSError:  # someone else finished first
            shutil.rmtree(tmp, ignore_errors=True)


class WorkerLoop:
    def __init__(
        self,
        conn: Connection,
        engine: Engine,
        config: WorkerConfig,
    ) -> None:
        self.conn = conn
        self.engine = engine
        self.sched = engine.scheduler
        self.config = config
        self.reported: dict[str, ipc.SessionProgress] = {}  # the last progress sent
        self.forks_reported: dict[str, ForkRange] = {}  # the last fork range sent, per session
        self.stalled = False  # the last step planned nothing: wait for a command
        self.last_heartbeat = 0.0
        self.answers: list[ipc.PromptApplied | ipc.PromptRejected] = []  # this batch's, in order
        # overlap_decode: the last step's chunks, sent once the next step is enqueued
        self.pending: list[ChunkDone] = []

    def run(self) -> None:
        while True:
            idle = self.stalled or not self.sched.has_work()
            for command in self._receive(block=idle):
                if isinstance(command, ipc.Shutdown):
                    return
                self.stalled = False
                self._apply(command)
            self._send_prompt_answers()
            if not self.stalled and self.sched.has_work():
                self._step()
            self.sched.account_waits()
            self._report()
            self._heartbeat()

    def _receive(self, block: bool) -> list[ipc.Command]:
        if block:  # no chunk waits behind the block (its session may be paused on it)
            self._send_pending()
        timeout = self.config.heartbeat_interval_s if block else 0.0
        commands = []
        if self.conn.poll(timeout):
            commands.append(self.conn.recv())
            while self.conn.poll(0):
                commands.append(self.conn.recv())
        if any(not isinstance(c, ipc.Consumed) for c in commands):
            # a cancel, open, prompt, snapshot or shutdown acts after every chunk is out (a
            # snapshot resumes from the first chunk not handed up)
            self._send_pending()
        return commands

    # ---- commands -------------------------------------------------------------------------

    def _apply(self, command: ipc.Command) -> None:
        if isinstance(command, ipc.OpenSession):
            self._open(command)
        elif isinstance(command, ipc.UpdatePrompt):
            self._update_prompt(command)
        elif isinstance(command, ipc.CancelSession):
            if command.session_id in self.sched.sessions:
                self.engine.cancel(command.session_id)
        elif isinstance(command, ipc.Consumed):
            if command.session_id in self.sched.sessions:
                self.engine.consumed(command.session_id)
        elif isinstance(command, ipc.TakeSnapshot):
            self._snapshot(command)

    def _open(self, cmd: ipc.OpenSession) -> None:
        sid = cmd.request.session_id
        try:
            self.engine.open(cmd.request)
        except RequestTooLarge as e:  # can never fit the budget: retrying will not help
            self.conn.send(ipc.OpenRefused(sid, "invalid", str(e)))
            return
        except AdmissionRefused as e:
            self.conn.send(ipc.OpenRefused(sid, "full", str(e)))
            return
        except ForkUnavailable as e:  # the source's history does not hold that chunk
            self.conn.send(ipc.OpenRefused(sid, "fork", str(e)))
            return
        except SnapshotError as e:  # not a snapshot, another model's, a newer format
            self.conn.send(ipc.OpenRefused(sid, "snapshot", str(e)))
            return
        except ValueError as e:
            self.conn.send(ipc.OpenRefused(sid, "invalid", str(e)))
            return
        except Exception as e:  # e.g. out of memory encoding a prefix: refuse this one only
            logger.exception("opening session %s failed", sid)
            self.conn.send(ipc.OpenRefused(sid, "internal", f"{type(e).__name__}: {e}"))
            return
        position = self.sched.queue_position(sid)
        self.conn.send(ipc.SessionOpened(sid, 0 if position is None else position + 1))

    def _snapshot(self, cmd: ipc.TakeSnapshot) -> None:
        try:
            taken = self.engine.snapshot(cmd.session_id)
            data = snapshot.encode(taken, owner=cmd.owner)
        except (SnapshotError, ForkUnavailable) as e:
            self.conn.send(ipc.SnapshotTaken(cmd.request_id, None, 0, str(e)))
            return
        first = taken.spec.output_from - taken.spec.prefix_chunks
        self.conn.send(ipc.SnapshotTaken(cmd.request_id, data, first))

    def _update_prompt(self, cmd: ipc.UpdatePrompt) -> None:
        """Apply it now; its answer goes with the batch's others (_send_prompt_answers)."""
        session = self.sched.sessions.get(cmd.session_id)
        if session is None:
            self.answers.append(
                ipc.PromptRejected(
                    cmd.request_id, cmd.session_id, "the session has ended", unknown_session=True
                )
            )
            return
        start = None if cmd.from_chunk is None else session.to_global(cmd.from_chunk)
        try:
            entry = self.sched.update_prompt(cmd.session_id, cmd.text, start, cmd.replace_later)
        except ValueError as e:
            self.answers.append(ipc.PromptRejected(cmd.request_id, cmd.session_id, str(e)))
            return
        timeline = tuple(
            (session.to_output(e.from_chunk), e.text, e.version) for e in session.timeline.entries
        )
        applied = session.to_output(entry.from_chunk)
        self.answers.append(
            ipc.PromptApplied(cmd.request_id, cmd.session_id, applied, entry.version, timeline)
        )

    def _send_prompt_answers(self) -> None:
        """Answer the batch's prompts in order. Only each session's last applied prompt carries
        the timeline: the others' are older, and a burst of prompts (Interact) must not ship a
        timeline of up to max_chunks entries once per prompt."""
        last = {a.session_id: a for a in self.answers if isinstance(a, ipc.PromptApplied)}
        for answer in self.answers:
            if isinstance(answer, ipc.PromptApplied) and answer is not last[answer.session_id]:
                answer = dataclasses.replace(answer, timeline=None)
            self.conn.send(answer)
        self.answers.clear()

    # ---- one engine step ------------------------------------------------------------------

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            done = self.engine.step()
        except GroupLost:
            raise  # the whole group restarts: its sessions end UNAVAILABLE, not FAILED here
        except Exception as e:  # a failed forward fails its sessions, not the worker
            logger.exception("engine step failed")
            self._send_pending()  # decoded by the step before: sent before the sessions end
            for sid, session in list(self.sched.sessions.items()):
                if session.state is SessionState.RUNNING:
                    self.engine.cancel(sid, SessionState.FAILED, f"engine step failed: {e}")
            return
        # The step before's chunks: with overlap_decode the device decoded them while this step
        # was being enqueued (engine.runner), so their copies have landed or soon will.
        self._send_pending()
        stats = self.engine.last_step
        if stats is None:  # everyone is paused or waiting: block until a command arrives
            self.stalled = True
            return
        self.conn.send(
            ipc.StepDone(
                sessions=stats.sessions,
                chunk_slots=stats.chunk_slots,
                step_s=time.perf_counter() - t0,
                dit_s=stats.dit_s,
                decode_s=stats.decode_s,  # with overlap_decode: enqueueing the decodes
            )
        )
        for chunk in done:
            if self._defers(chunk):
                self.pending.append(chunk)
            else:
                self._send_chunk(chunk)

    def _defers(self, chunk: ChunkDone) -> bool:
        """Whether the chunk waits for the next step to be enqueued (overlap_decode). A chunk
        whose session ended in this step goes now: _report sends the end right after, and a
        session's chunks always come before its end."""
        session = self.sched.sessions.get(chunk.session_id)
        return self.engine.runner.overlap_decode and session is not None and not session.finished

    def _send_pending(self) -> None:
        """Send the deferred chunks, in the order they finished (each waits for its frames'
        copy to the host). Every path that could end a session, block, or answer for its
        chunks (a snapshot) calls this first, so nothing deferred is lost or reordered: a
        cancelled session's deferred chunk is sent, before its end."""
        pending, self.pending = self.pending, []
        for chunk in pending:
            self._send_chunk(chunk)

    def _send_chunk(self, chunk: ChunkDone) -> None:
        frames = chunk.frames.contiguous().numpy()
        self.conn.send(
            ipc.ChunkReady(
                session_id=chunk.session_id,
                chunk_index=chunk.output_index,
                first_frame=chunk.first_frame,
                frame_count=frames.shape[0],
                height=frames.shape[1],
                width=frames.shape[2],
                frames=frames.tobytes(),
                prompt_text=chunk.prompt.text,
                prompt_version=chunk.prompt.version,
                queue_s=chunk.queue_s,
                denoise_s=chunk.denoise_s,
                decode_s=chunk.decode_s,
            )
        )

    # ---- reports --------------------------------------------------------------------------

    def _report(self) -> None:
        """Send what changed: progress of live sessions, the end of finished ones."""
        for sid, session in list(self.sched.sessions.items()):
            if session.finished:
                self.conn.send(ipc.SessionEnded(sid, session.state, session.error))
                self.sched.forget(sid)
                self.reported.pop(sid, None)
                self.last_heartbeat = 0.0  # memory was freed: say so now
                continue
            position = self.sched.queue_position(sid)
            nxt = session.window.next_entering_chunk()
            progress = ipc.SessionProgress(
                sid,
                session.state,
                0 if position is None else position + 1,
                None if nxt is None else session.to_output(nxt),
            )
            if progress != self.reported.get(sid):
                self.conn.send(progress)
                self.reported[sid] = progress
        self._report_forks()

    def _report_forks(self) -> None:
        """Send each change of where a session can be forked, ended sessions' too (their
        history outlives them by fork_ttl_s), and the drop of a history."""
        ttl_s = self.sched.config.fork_ttl_s
        known = {*self.sched.sessions, *self.sched.histories, *self.forks_reported}
        for sid in known:
            held = self.sched.fork_range(sid)
            if held == self.forks_reported.get(sid):
                continue
            if held is None:
                del self.forks_reported[sid]
                self.conn.send(ipc.ForkHistory(sid, None, None))
                continue
            self.forks_reported[sid] = held
            until_ms = 0
            if held.ended_at is not None:  # monotonic here; the server wants wall-clock time
                left_s = held.ended_at + ttl_s - time.monotonic()
                until_ms = int((time.time() + left_s) * 1000)
            self.conn.send(ipc.ForkHistory(sid, held.first_chunk, held.last_chunk, until_ms))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_heartbeat < self.config.heartbeat_interval_s:
            return
        self.last_heartbeat = now
        # Followers wait in a collective between steps: this keeps their wait shorter than its
        # timeout while idle, and frees what ended on every rank.
        self.engine.sync()
        running = [s for s in self.sched.sessions.values() if s.state is SessionState.RUNNING]
        self.conn.send(
            ipc.Heartbeat(
                running=len(running),
                waiting=self.sched.queued_count(),
                reserved_bytes=self.sched.reserved_bytes(),
                kv_cache_bytes=self.engine.kv_cache_bytes(),
                chunks_in_flight=self.sched.chunks_in_flight(),
                fork_history_bytes=self.sched.history_bytes(),
                fork_history_held_bytes=self.engine.runner.marks_bytes(),
            )
        )
        budget = self.sched.config.memory_budget_bytes
        self.conn.send(device_memory(self.engine.runner.device, budget))
