"""A worker group: every rank of a torch.distributed group runs the same engine steps, each on
its own tensors and its own share of the DiT (issue 17: the plan is what travels).

Rank 0 runs the scheduler. Each engine step it broadcasts one small message: the `StepPlan`
itself (frozen, tensor-free) and the requests of the sessions opened since the last message
(`SessionParams`, their image/video as uint8 arrays, sent once). Every rank, rank 0 included,
then runs the same `ModelRunner.execute(plan)` on the tensors it owns: it opens the sessions
(encodes their prefixes with its VAE), draws the entering chunks' noise from their keys, builds
the captions of the prompts the plan binds, and frees what the plan frees. Only rank 0 loads
T5 (reference §6: one rank of the group encodes and broadcasts): the message also carries the
T5 output of every prompt the plan uses that the followers do not hold yet, and the prompts they
may drop (`CaptionLedger` on rank 0, `ReceivedCaptions` on the others, which mirror it).
Inside the step the ranks meet in the collectives of one `GroupForward`: the Ulysses forward
(each rank holds its own KV heads of every session's cache) and the split VAE decode (tiles
round-robin, stitched on rank 0, which alone keeps frames). Nothing but the plan and the new
prompts' T5 output is replicated by message: each rank derives its inputs.

Protocol (on a gloo "control" group, CPU only, even when the forward runs on NCCL): rank 0
broadcasts the pickled message's length (one int64), then its bytes. While idle rank 0 sends an
empty message every heartbeat (`sync`), which keeps followers' waits short of the collective
timeout; `close` sends the stop message.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from engine.launch import RankSpec, free_port
from engine.runner import Captions, ModelRunner
from model.dit import ChunkGroup, VideoDiT
from model.folder import MagiModel
from model.kv_cache import KVCache
from model.parallel import local_kv_heads, split_tiled_decode, ulysses_forward
from model.sharding import ShardedDiT, load_dit_shard
from model.text import PromptEmbedding, TextConditioning
from model.vae import ViTVAE
from scheduler.plan import StepPlan
from scheduler.session import SessionParams


class GroupLost(RuntimeError):
    """A collective or a group forward failed (another rank died, or the forward raised). The
    ranks may be out of step, so the worker exits and the supervisor restarts the whole group."""


@dataclass
class RankGroup:
    """This rank's handles on the group."""

    rank: int
    world_size: int
    forward: dist.ProcessGroup  # the Ulysses collectives (gloo on CPU; NCCL on GPUs)
    control: dist.ProcessGroup  # step messages: always gloo, messages are CPU bytes
    join_timeout: timedelta = timedelta(minutes=10)  # the barrier after loading (wait_loaded)


# NCCL's watchdog aborts the communicator and ends the process once a collective passes the
# group's timeout (1 = TearDown: abort, then exit), so a lost rank fails the group fast instead
# of leaving the others spinning on the GPU. Blocking wait (TORCH_NCCL_BLOCKING_WAIT=1) would
# take precedence and cost a host sync per collective: it stays off unless the operator sets it.
NCCL_ENVIRONMENT = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


@dataclass(frozen=True)
class GroupSettings:
    """How a rank makes its group (group_settings decides; join_group applies)."""

    backend: str  # nccl on CUDA, gloo on CPU
    timeout: timedelta  # every collective, both backends: how long a lost rank stalls the rest
    join_timeout: timedelta  # the rendezvous and the barrier after loading
    environment: dict[str, str]  # set before the group is made: what the operator has not set


def group_settings(
    device_type: str, timeout_s: float, join_timeout_s: float, env: Mapping[str, str]
) -> GroupSettings:
    """The backend, timeouts and NCCL variables of a rank on `device_type` ("cuda", "cpu").
    A variable already in `env` is the operator's choice and is kept."""
    if timeout_s <= 0 or join_timeout_s <= 0:
        raise ValueError("the group's timeouts must be > 0")
    nccl = device_type == "cuda"
    environment = {k: v for k, v in NCCL_ENVIRONMENT.items() if k not in env} if nccl else {}
    return GroupSettings(
        backend="nccl" if nccl else "gloo",
        timeout=timedelta(seconds=timeout_s),
        join_timeout=timedelta(seconds=max(join_timeout_s, timeout_s)),
        environment=environment,
    )


def join_group(
    spec: RankSpec, device: torch.device | str = "cpu", join_timeout_s: float = 600.0
) -> RankGroup:
    """Initialise torch.distributed for this process and return its group handles. Blocks until
    every rank has joined (or join_timeout_s passes); collectives then time out after
    spec.timeout_s."""
    settings = group_settings(torch.device(device).type, spec.timeout_s, join_timeout_s, os.environ)
    os.environ.update(settings.environment)  # read when the NCCL group is made
    if settings.backend == "nccl":
        torch.cuda.set_device(spec.local_rank)
    # Our own store, so the rendezvous waits join_timeout (ranks on other nodes may start
    # minutes later) while the group's collectives use the shorter timeout.
    store = dist.TCPStore(
        spec.master_addr,
        spec.master_port,
        spec.world_size,
        is_master=spec.rank == 0,
        timeout=settings.join_timeout,
    )
    dist.init_process_group(
        settings.backend,
        store=store,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=settings.timeout,
    )
    world = dist.group.WORLD
    control = (
        world
        if settings.backend == "gloo"
        else dist.new_group(backend="gloo", timeout=settings.timeout)
    )
    return RankGroup(
        spec.rank,
        spec.world_size,
        forward=world,
        control=control,
        join_timeout=settings.join_timeout,
    )


def wait_loaded(group: RankGroup) -> None:
    """The barrier after loading: every rank has its weights. It waits the join timeout, not
    the collective one (loading takes minutes on a large model), and names a rank that did not
    arrive."""
    dist.monitored_barrier(group=group.control, timeout=group.join_timeout, wait_all_ranks=True)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def load_rank_dit(
    folder: str | Path,
    rank: int,
    world_size: int,
    group: RankGroup,
    device: str | torch.device = "cpu",
) -> VideoDiT | ShardedDiT:
    """The DiT this rank runs its share of the forward with; the one place a rank's weights are
    loaded. With N > 1 ranks each reads only its 1/N slice of every layer from the files (plus
    the small replicated parameters), and the layers are all-gathered one at a time in the
    forward (model/sharding.py). One rank: the plain `VideoDiT`."""
    from model.folder import read_config

    del group  # loading needs no collective: every rank reads its own byte ranges
    return load_dit_shard(folder, read_config(folder), rank, world_size, device)


def load_rank(
    folder: str | Path, group: RankGroup, device: str | torch.device = "cpu"
) -> tuple[MagiModel, GroupForward]:
    """Any rank's model (VAE, special tokens, and for the null caption the DiT's replicated
    part; T5 on rank 0 only) and the group forward its runner calls in place of `model.dit`."""
    from model.folder import load_model

    share = load_rank_dit(folder, group.rank, group.world_size, group, device)
    dit = share.dit if isinstance(share, ShardedDiT) else share
    model = load_model(folder, device=device, dit=dit, text=group.rank == 0)
    num_layers = model.config.model_config.num_layers
    kv_groups = model.config.model_config.num_query_groups
    return model, GroupForward(share, group, num_layers, model.vae, kv_groups)


# ---- messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionRows:
    """One prompt's T5 output on its way to the followers: its rows up to the last visible one
    (the DiT never reads the padding after it, and `chunk_caption` builds the same visible rows
    from them), as host arrays. 16 KiB per token at C = 4096."""

    text: str  # the cleaned prompt (PromptEmbedding.text)
    embedding: np.ndarray  # (n, C) float32
    mask: np.ndarray  # (n,) as T5 gave it

    @classmethod
    def of(cls, caption: PromptEmbedding) -> CaptionRows:
        visible = caption.mask.nonzero()
        n = int(visible[-1, 0]) + 1 if len(visible) else 0
        return cls(
            caption.text,
            caption.embedding[:n].detach().cpu().numpy(),
            caption.mask[:n].detach().cpu().numpy(),
        )

    def on(self, device: torch.device) -> PromptEmbedding:
        return PromptEmbedding(
            embedding=torch.as_tensor(self.embedding, device=device),
            mask=torch.as_tensor(self.mask, device=device),
            text=self.text,
        )

    @property
    def nbytes(self) -> int:
        return self.embedding.nbytes + self.mask.nbytes


@dataclass
class _Message:
    opened: list[SessionParams] = field(default_factory=list)  # sessions to open, in order
    plan: StepPlan | None = None  # the step to run (its frees included); None: nothing to run
    stop: bool = False  # the group is shutting down
    # (session, global chunk): every rank hands its KV heads of that fork point to the others
    # (a snapshot on rank 0 needs all of them)
    gather_kv: tuple[str, int] | None = None
    # prompt text (as the plan names it) -> its T5 output: the plan's prompts the followers do
    # not hold yet; then the prompts they drop (none the plan uses)
    captions: dict[str, CaptionRows] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()


def _send(data: bytes, group: RankGroup) -> None:
    """Broadcast a pickled message from rank 0: length, then bytes."""
    # the control group is gloo: its messages are host bytes whatever device the forward uses
    size = torch.tensor([len(data)], dtype=torch.int64, device="cpu")
    dist.broadcast(size, 0, group=group.control)
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=group.control)


def _receive(group: RankGroup) -> _Message:
    size = torch.zeros(1, dtype=torch.int64, device="cpu")
    dist.broadcast(size, 0, group=group.control)
    data = torch.empty(int(size), dtype=torch.uint8, device="cpu")
    dist.broadcast(data, 0, group=group.control)
    return pickle.loads(data.numpy().tobytes())


# ---- every rank -------------------------------------------------------------------------


@dataclass
class ForwardStats:
    """What this rank's share of the steps cost."""

    forwards: int = 0
    decodes: int = 0
    forward_s: float = 0.0  # ulysses_forward itself


class GroupForward:
    """A rank's stand-in for `model.dit` in its runner: calling it runs the packed forward
    together with the other ranks (each computing its share) and returns all velocities;
    `decode` splits a VAE decode over the ranks (the frames come back on rank 0 only)."""

    def __init__(
        self,
        dit: VideoDiT | ShardedDiT,
        group: RankGroup,
        num_layers: int,
        vae: ViTVAE,
        kv_groups: int,
    ) -> None:
        # `dit`: whatever `ulysses_forward` takes (what `load_rank_dit` returns on this rank)
        self.dit, self.group, self.num_layers, self.vae = dit, group, num_layers, vae
        self.kv_groups = kv_groups  # the model's KV heads (a rank holds max(G, N) / N of them)
        self.stats = ForwardStats()

    def new_cache(self) -> KVCache:
        # under Ulysses a rank's cache holds its own KV heads, written inside the forward
        return KVCache(self.num_layers)

    def gather_kv(self, cache: KVCache) -> dict[int, list[Tensor]]:
        """Every cached chunk's per-layer K|V with all the model's KV heads (every rank calls
        it with the same chunks): the ranks' heads side by side, in rank order, and heads that
        `local_kv_heads` repeated for N > G taken once, so the result is what one rank holds."""
        world = self.group.world_size
        full: dict[int, list[Tensor]] = {}
        try:
            for c in cache.chunk_indices:
                layers = []
                for layer in range(self.num_layers):
                    own = cache.layers_of(c)[layer].contiguous()  # (tokens, G'/N, 2hd)
                    parts = [torch.empty_like(own) for _ in range(world)]
                    dist.all_gather(parts, own, group=self.group.forward)
                    heads = torch.cat(parts, dim=1)  # (tokens, max(G, N), 2hd)
                    layers.append(heads[:, :: heads.shape[1] // self.kv_groups])
                full[c] = layers
        except Exception as e:
            raise GroupLost(f"gathering the KV of a snapshot failed: {e}") from e
        return full

    def own_kv_heads(self, kv: Tensor) -> Tensor:
        """The inverse of `gather_kv` for one tensor: this rank's share of all KV heads."""
        heads = local_kv_heads(kv, self.group.world_size)
        per_rank = heads.shape[1] // self.group.world_size
        return heads[:, self.group.rank * per_rank : (self.group.rank + 1) * per_rank].clone()

    def __call__(self, groups: list[ChunkGroup]) -> list[list[Tensor]]:
        t0 = time.perf_counter()
        try:
            velocities = ulysses_forward(self.dit, groups, self.group.forward)
        except Exception as e:
            # A failed collective raises a plain RuntimeError, like a failed computation; either
            # way the ranks may be out of step now, so the group is not used again.
            raise GroupLost(f"the parallel forward failed: {type(e).__name__}: {e}") from e
        self.stats.forwards += 1
        self.stats.forward_s += time.perf_counter() - t0
        return velocities

    def decode(self, z: Tensor, tile_frames: int) -> Tensor | None:
        """`vae.tiled_decode(z)` with the tiles spread over the ranks (split_tiled_decode:
        bit-identical; measured 0.65x the time of rank 0 alone at 2 ranks, docs/parallel.md).
        The video on rank 0; None on the others."""
        try:
            video = split_tiled_decode(self.vae, z, self.group.forward, 0, tile_frames=tile_frames)
        except Exception as e:
            raise GroupLost(f"the split decode failed: {type(e).__name__}: {e}") from e
        self.stats.decodes += 1
        return video


# ---- rank 0 -----------------------------------------------------------------------------


def plan_prompts(plan: StepPlan | None) -> list[str]:
    """The prompt texts the plan's chunks are conditioned on (what `ModelRunner._prompt` reads),
    each once, in plan order."""
    if plan is None:
        return []
    texts = (entry.text for step in plan.forwards for _, entry in step.prompts)
    return list(dict.fromkeys(texts))


class CaptionLedger:
    """Rank 0's record of the prompts whose T5 output the followers hold: exactly the keys of
    their `ReceivedCaptions`, since every change to it travels in a message. Bounded like the
    text encoder's cache: past `capacity`, the prompts least recently used by a plan are
    dropped (never one the current plan uses); a prompt needed again is simply sent again."""

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError(f"the followers' caption capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._held: OrderedDict[str, None] = OrderedDict()

    def missing(self, texts: list[str]) -> list[str]:
        return [t for t in texts if t not in self._held]

    def use(self, texts: list[str]) -> tuple[str, ...]:
        """Record that a message carries `texts` (the missing ones with it); the prompts the
        followers drop with that message."""
        for text in texts:
            self._held[text] = None
            self._held.move_to_end(text)
        used, dropped = set(texts), []
        for text in list(self._held):
            if len(self._held) <= self.capacity:
                break
            if text not in used:
                del self._held[text]
                dropped.append(text)
        return tuple(dropped)

    @property
    def texts(self) -> frozenset[str]:
        return frozenset(self._held)


@dataclass
class LinkStats:
    """What the step messages cost (rank 0), to check they are not the bottleneck."""

    steps: int = 0  # messages that carried a plan
    message_bytes: int = 0
    send_s: float = 0.0  # pickling + broadcasting the messages (+ encoding new prompts)
    captions_sent: int = 0  # prompts' T5 outputs sent to the followers
    caption_bytes: int = 0  # their arrays' bytes
    captions_dropped: int = 0


class StepLink:
    """Rank 0's side of the protocol: the engine sends each plan (and the sessions opened
    since the last one) before it runs the plan itself."""

    def __init__(self, group: RankGroup, caption_capacity: int = 256) -> None:
        if group.rank != 0:
            raise ValueError("StepLink sends from rank 0; other ranks call serve_follower")
        self.group = group
        self.stats = LinkStats()
        self.ledger = CaptionLedger(caption_capacity)
        self._closed = False

    def send(self, plan: StepPlan | None, opened: list[SessionParams], captions: Captions) -> None:
        """Broadcast the plan, with the T5 output (from `captions`, rank 0's encoder) of each of
        its prompts the followers do not hold yet."""
        t0 = time.perf_counter()
        texts = plan_prompts(plan)
        # encoded before the ledger changes: a failed encode leaves it as the followers' is
        rows = {t: CaptionRows.of(captions.encode(t)) for t in self.ledger.missing(texts)}
        dropped = self.ledger.use(texts)
        self._broadcast(_Message(opened=opened, plan=plan, captions=rows, dropped=dropped))
        self.stats.send_s += time.perf_counter() - t0
        self.stats.steps += plan is not None
        self.stats.captions_sent += len(rows)
        self.stats.caption_bytes += sum(r.nbytes for r in rows.values())
        self.stats.captions_dropped += len(dropped)

    def gather_kv(self, session_id: str, chunk: int) -> None:
        """Ask the followers to hand in their KV heads of the session's fork point at `chunk`
        (rank 0 then calls `GroupForward.gather_kv` with them)."""
        self._broadcast(_Message(gather_kv=(session_id, chunk)))

    def sync(self) -> None:
        """Show the followers rank 0 is alive (call when idle)."""
        self._broadcast(_Message())

    def close(self) -> None:
        """Tell the followers to return; rank 0 stays in the group until `leave_group`."""
        if not self._closed:
            self._closed = True
            self._broadcast(_Message(stop=True))

    def _broadcast(self, message: _Message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            _send(data, self.group)
        except Exception as e:  # gloo reports a dead peer as a plain RuntimeError
            raise GroupLost(f"sending the step to the other ranks failed: {e}") from e
        self.stats.message_bytes += len(data)


# ---- ranks 1..N-1 -----------------------------------------------------------------------


class ReceivedCaptions:
    """A follower's caption source: the T5 outputs rank 0 sent, on this rank's device, keyed by
    the prompt text as the plans name it (rank 0's `CaptionLedger` says which it holds)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._held: dict[str, PromptEmbedding] = {}

    def receive(self, captions: dict[str, CaptionRows], dropped: tuple[str, ...]) -> None:
        for text in dropped:
            del self._held[text]  # a KeyError here: this rank missed a message
        for text, rows in captions.items():
            self._held[text] = rows.on(self.device)

    def encode(self, prompt: str) -> PromptEmbedding:
        try:
            return self._held[prompt]
        except KeyError:
            raise RuntimeError(
                f"rank 0 sent no T5 output for the prompt {prompt!r}: this rank's captions are "
                "out of step with rank 0's ledger (a message lost or run out of order)"
            ) from None

    @property
    def texts(self) -> frozenset[str]:
        return frozenset(self._held)


@dataclass
class FollowerStats:
    steps: int = 0  # plans run
    forwards: int = 0
    decodes: int = 0
    sessions_left: int = 0  # sessions still held when the stop came (0 once all ended)
    t5_loaded: bool = False  # whether this rank's model holds a T5 (it should not)
    captions: frozenset[str] = frozenset()  # prompts whose T5 output it held at the stop


def serve_follower(
    model: MagiModel,
    forward: GroupForward,
    text_conditioning: TextConditioning | None = None,
    batch_invariant: bool | None = None,
    overlap_decode: bool | None = None,
) -> FollowerStats:
    """Run rank 0's plans on this rank's own tensors until it sends stop. A failed collective
    (rank 0 or another rank died) or step raises out of here: the process then exits and the
    group is restarted. `text_conditioning` and `batch_invariant` must be rank 0's (the ranks
    make the same forward calls). Prompts are not encoded here: rank 0 sends their T5 output."""
    device = model.dit.y_embedder.null_caption_embedding.device
    captions = ReceivedCaptions(device)
    runner = ModelRunner(
        model,
        text_conditioning=text_conditioning,
        dit=forward,
        batch_invariant=batch_invariant,
        overlap_decode=overlap_decode,
        captions=captions,
    )
    stats = FollowerStats(t5_loaded=model.text is not None)
    while True:
        message = _receive(forward.group)
        if message.stop:
            stats.sessions_left = len(runner.sessions)
            stats.forwards, stats.decodes = forward.stats.forwards, forward.stats.decodes
            stats.captions = captions.texts
            return stats
        captions.receive(message.captions, message.dropped)
        if message.gather_kv is not None:
            runner.marked_kv(*message.gather_kv)
        for params in message.opened:
            runner.open(params)
        if message.plan is not None:
            runner.execute(message.plan)
            stats.steps += 1


# ---- local groups for tests and benches ----------------------------------------------------


def _rank_main(
    rank: int, world: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple
) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, dist.group.WORLD, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, process_group, *args)` on `world_size` local CPU ranks (gloo,
    spawned processes, one thread each) and return every rank's result. `fn` must be picklable
    (a module-level function)."""
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(
            _rank_main,
            args=(world_size, free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=True,
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
