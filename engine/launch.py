"""How the engine process is started: its configuration and the spawn entry points.

Torch-free, so the server process can spawn the engine without loading torch or the model: the
entry points import the engine only inside the child process.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path


@dataclass(frozen=True)
class RankSpec:
    """How one rank joins its group (torch.distributed's env:// variables, as a value)."""

    rank: int
    world_size: int
    local_rank: int  # rank within its host: which GPU it would own
    master_addr: str  # host of rank 0, where the rendezvous store listens
    master_port: int
    timeout_s: float = 60.0  # collective timeout: how long a lost or hung rank can stall the rest


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # the --device values
CPU_MEMORY_BUDGET_BYTES = 8 << 30  # admission's budget on CPU when none is given
# --batch-invariant and --overlap-decode -> ModelRunner (None: chosen by the device)
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}
COMPILE_MODES = ("off", "on")  # --compile: model/compile.py's modes (this module is torch-free)


@dataclass(frozen=True)
class GroupConfig:
    """The worker group: `world_size` ranks over `nnodes` hosts, the same number on each. Node 0
    runs ranks 0..k-1 (rank 0 runs the engine); node n runs ranks n*k..(n+1)*k-1, followers
    only. Ranks meet at master_addr:master_port (rank 0's host)."""

    world_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = a free port on each group start (single host only)
    timeout_s: float = 60.0  # collective timeout: how long a lost or hung rank can stall the rest
    # Meeting and loading: nodes may be started minutes apart, and a large model loads for
    # minutes, so the rendezvous and the barrier after loading wait this long instead.
    join_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.nnodes < 1 or self.world_size % self.nnodes:
            raise ValueError(
                f"--world-size {self.world_size} must be a positive multiple of "
                f"--nnodes {self.nnodes} (the same number of ranks on every node)"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError("a group over several nodes needs --master-port (MASTER_PORT)")
        if self.timeout_s <= 0 or self.join_timeout_s <= 0:
            raise ValueError("--group-timeout-s and --group-join-timeout-s must be > 0")

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        """The global ranks this node runs."""
        k = self.ranks_per_node
        return range(self.node_rank * k, (self.node_rank + 1) * k)

    @property
    def leads(self) -> bool:
        """Whether this node runs rank 0 (the engine, the sessions)."""
        return self.node_rank == 0


@dataclass(frozen=True)
class WorkerConfig:
    """What the engine process is started with (passed to it when it is spawned)."""

    model_folder: Path  # a model folder (config.json + weights)
    write_preset: str | None = None  # write this random-weight preset there first if missing
    # KV cache + latents of all running sessions. None: on CPU CPU_MEMORY_BUDGET_BYTES; on CUDA
    # the device's free memory after loading less memory_reserve_bytes (engine.process)
    memory_budget_bytes: int | None = None
    # CUDA only: memory kept back from admission for activations, the VAE decode, fragmentation
    memory_reserve_bytes: int = 2 << 30
    max_sessions: int = 8  # sessions generating at once; more wait in the queue
    queue_size: int = 16  # sessions waiting for a slot or memory; one more is refused
    max_chunk_slots: int = 512  # chunk slots per forward (each CFG branch counts)
    torch_threads: int = 1  # intra-op threads of the worker; 0 = torch's default
    neg_prompt: bool = False  # negative-prompt special tokens before the null caption (NEG_PROMPT)
    device: str = "auto"  # auto (cuda:<local rank> when CUDA is there, else cpu), cpu, cuda[:N]
    batch_invariant: str = "auto"  # on: a session's frames never depend on the batch; auto: on CPU
    overlap_decode: str = "auto"  # on: decode beside the next step (side stream); auto: on CUDA
    compile: str = "off"  # on: torch.compile the DiT layers' token-wise parts (model/compile.py)
    fork_history: int = 8  # chunks back a session can be forked at
    fork_ttl_s: float = 120.0  # how long an ended session can still be forked
    heartbeat_interval_s: float = 0.5  # how often an idle worker says it is alive
    log_level: str = "info"  # the worker logs like the server, to the same stderr
    group: GroupConfig = field(default_factory=GroupConfig)  # ranks (one process each)

    def __post_init__(self) -> None:
        budget = self.memory_budget_bytes
        if (budget is not None and budget <= 0) or self.max_sessions < 1 or self.queue_size < 0:
            raise ValueError("memory budget and max_sessions must be > 0, queue_size >= 0")
        if self.memory_reserve_bytes < 0:
            raise ValueError("--memory-reserve-mb must be >= 0")
        if self.batch_invariant not in AUTO_ON_OFF:
            raise ValueError(f"--batch-invariant {self.batch_invariant!r}: use auto, on or off")
        if self.overlap_decode not in AUTO_ON_OFF:
            raise ValueError(f"--overlap-decode {self.overlap_decode!r}: use auto, on or off")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile {self.compile!r}: use off or on")
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.torch_threads < 0 or self.heartbeat_interval_s <= 0:
            raise ValueError("torch_threads must be >= 0 and heartbeat_interval_s > 0")


def free_port() -> int:
    """A free TCP port on loopback (for the group's rendezvous on one host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(conn: Connection, config: WorkerConfig, rank: RankSpec | None = None) -> None:
    """Spawn target of the engine process (the only one, or rank 0 of a group)."""
    from engine.process import worker_main

    worker_main(conn, config, rank)


def run_follower(conn: Connection, config: WorkerConfig, rank: RankSpec) -> None:
    """Spawn target of ranks 1..N-1 of a worker group."""
    from engine.process import follower_main

    follower_main(conn, config, rank)
