"""What the server and the worker process say to each other over their Pipe.

Commands go down, events come up; both are small frozen dataclasses pickled by the Pipe.
Chunk indices here are OUTPUT indices (a v2v prefix is not counted): the worker translates, so
the server never sees the engine's global indices. Frames travel as raw uint8 bytes, not as
torch tensors, whose pickling would route through shared-memory file descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.session import SessionParams, SessionState

# ---- commands: server -> worker -------------------------------------------------------------


@dataclass(frozen=True)
class OpenSession:
    request: SessionParams  # the validated request record, as the engine opens it


@dataclass(frozen=True)
class UpdatePrompt:
    request_id: int  # echoed in the reply so the server can match it
    session_id: str
    text: str
    from_chunk: int | None  # output index; None = the first chunk not yet in the window
    replace_later: bool


@dataclass(frozen=True)
class CancelSession:
    session_id: str


@dataclass(frozen=True)
class Consumed:
    """The stream has sent one more chunk of this session: the engine may make another."""

    session_id: str


@dataclass(frozen=True)
class TakeSnapshot:
    """Write the session's newest chunk boundary as a snapshot file (engine/snapshot.py)."""

    request_id: int
    session_id: str
    owner: str  # recorded in the file: only this principal may resume it


@dataclass(frozen=True)
class Shutdown:
    pass


Command = OpenSession | UpdatePrompt | CancelSession | Consumed | TakeSnapshot | Shutdown

# ---- events: worker -> server ---------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    pid: int


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not start (for example the model folder does not load)."""

    error: str


@dataclass(frozen=True)
class SnapshotTaken:
    request_id: int
    data: bytes | None  # the snapshot file; None with `error`
    from_chunk: int  # output index a resume streams from (every chunk after it comes again)
    error: str | None = None


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    queue_position: int  # 1-based place among waiting sessions; 0 = generating at once


@dataclass(frozen=True)
class OpenRefused:
    session_id: str
    reason: str  # "full": no room now, retry later; "invalid": can never be served;
    #              "internal": the engine failed while opening it; "fork": the fork point
    #              is not in the source's fork history; "snapshot": a resume this
    #              engine cannot read (another model's, a newer format)
    message: str


@dataclass(frozen=True)
class SessionProgress:
    """Sent when a session's state, queue place or next steerable chunk changes."""

    session_id: str
    state: SessionState  # QUEUED / RUNNING
    queue_position: int  # 1-based while queued, else 0
    next_steerable_chunk: int | None  # output index a prompt pushed now would first steer


@dataclass(frozen=True)
class ForkHistory:
    """Sent when the chunks a session can be forked at change; also after its end, since its
    history outlives it by fork_ttl_s, and once more (`first_chunk` None) when it is dropped."""

    session_id: str
    first_chunk: int | None  # output index; None: no fork point held
    last_chunk: int | None  # output index, inclusive
    held_until_unix_ms: int = 0  # an ended session's: when it is dropped at the latest; else 0


@dataclass(frozen=True)
class ChunkReady:
    session_id: str
    chunk_index: int  # output index
    first_frame: int  # output frame index of its first frame
    frame_count: int
    height: int
    width: int
    frames: bytes  # frame_count x height x width x 3, uint8 RGB
    prompt_text: str
    prompt_version: int
    queue_s: float  # waiting before its first forward (admission, pauses)
    denoise_s: float
    decode_s: float


@dataclass(frozen=True)
class SessionEnded:
    session_id: str
    state: SessionState  # FINISHED / CANCELLED / FAILED
    error: str | None = None


@dataclass(frozen=True)
class PromptApplied:
    request_id: int
    session_id: str
    from_chunk: int  # output index it landed on
    version: int
    # (from_chunk, text, version), output indices. None: a later answer sent with this one (the
    # same batch of commands) carries the session's timeline, which is newer
    timeline: tuple[tuple[int, str, int], ...] | None


@dataclass(frozen=True)
class PromptRejected:
    request_id: int
    session_id: str
    message: str
    unknown_session: bool = False  # the worker has no such session (it already ended)


@dataclass(frozen=True)
class StepDone:
    """One engine step's statistics (engine.engine.StepStats plus the wall time)."""

    sessions: int
    chunk_slots: int
    step_s: float
    dit_s: float
    decode_s: float


@dataclass(frozen=True)
class Heartbeat:
    running: int  # sessions generating
    waiting: int  # sessions queued (for a slot or for memory)
    reserved_bytes: int  # memory admission has reserved
    kv_cache_bytes: int  # KV cache held now
    chunks_in_flight: int  # chunks inside denoising windows
    fork_history_bytes: int = 0  # reserved for fork points (ended sessions' included)
    fork_history_held_bytes: int = 0  # tensors the fork points hold now


@dataclass(frozen=True)
class DeviceMemory:
    """The worker's device memory, sent with every heartbeat (rank 0's device in a group)."""

    device: str  # "cuda:0", "cpu"
    total_bytes: int  # the GPU's memory; on CPU the host's (MemTotal)
    free_bytes: int  # free now, every process counted (cudaMemGetInfo); on CPU MemAvailable
    allocated_bytes: int | None  # held by live tensors; None on CPU, where torch counts nothing
    reserved_bytes: int | None  # held by torch's caching allocator (>= allocated); None on CPU
    worker_resident_bytes: int  # this process's resident set (VmRSS); 0 where /proc is missing
    budget_bytes: int  # admission's budget: KV cache + latents of all sessions


Event = (
    WorkerReady
    | WorkerFailed
    | SessionOpened
    | OpenRefused
    | SessionProgress
    | ForkHistory
    | ChunkReady
    | SessionEnded
    | PromptApplied
    | PromptRejected
    | SnapshotTaken
    | StepDone
    | Heartbeat
    | DeviceMemory
)
