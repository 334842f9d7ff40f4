"""A worker group: the DiT forward of rank 0's engine run by every rank of a torch.distributed
group (issue 6).

Rank 0 runs the scheduler and the engine; its runner calls a `GroupForward` where a single rank
calls `model.dit`. Each call sends the step to the other ranks as one message (the packed
`ChunkGroup`s with cache ids in place of `KVCache` objects, plus the cache operations rank 0 did
since the last message) and then runs `ulysses_forward` with them; the followers
(`serve_follower`) receive the same message, replay the cache operations on their own caches,
run the same `ulysses_forward` and drop its output. Text encoding, VAE encode and decode stay on
rank 0: followers only ever run DiT forwards.

Caches are mirrored: under Ulysses each rank's `KVCache` holds only that rank's KV heads, so every
session has one cache per rank, named by an id rank 0 hands out. A follower creates its cache on
first use; `drop_before`, `clear` and the release of a cache rank 0 no longer holds are replayed
in the order rank 0 did them, before the next forward. So a follower's caches are always what
rank 0's would be at the same point, with its own heads.

Protocol (on a gloo "control" group, CPU only, even when the forward runs on NCCL): rank 0
broadcasts the pickled message's length (one int64), then its bytes. While idle rank 0 sends an
empty message every heartbeat (`sync`), which flushes releases and keeps followers' waits short
of the collective timeout; `close` sends the stop message.
"""

from __future__ import annotations

import pickle
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from engine.launch import RankSpec
from model.dit import ChunkGroup, ChunkInput, VideoDiT
from model.folder import MagiModel
from model.kv_cache import KVCache
from model.parallel import split_tiled_decode, ulysses_forward
from model.sharding import ShardedDiT, load_dit_shard
from model.vae import ViTVAE, load_vae

# A cache operation to replay on followers: (kind, cache id, argument); kind is "drop_before"
# (argument: the first chunk kept), "clear" or "release" (argument None).
CacheOp = tuple[str, int, int | None]


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


def join_group(spec: RankSpec, device: torch.device | str = "cpu") -> RankGroup:
    """Initialise torch.distributed for this process and return its group handles. Blocks until
    every rank has joined (or the timeout passes)."""
    timeout = timedelta(seconds=spec.timeout_s)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(spec.local_rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timeout,
    )
    world = dist.group.WORLD
    control = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return RankGroup(spec.rank, spec.world_size, forward=world, control=control)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def load_rank_dit(
    folder: str | Path, rank: int, world_size: int, group: RankGroup
) -> VideoDiT | ShardedDiT:
    """The DiT this rank runs its share of the forward with; the one place a rank's weights are
    loaded. With N > 1 ranks each reads only its 1/N slice of every layer from the files (plus
    the small replicated parameters), and the layers are all-gathered one at a time in the
    forward (model/sharding.py). One rank: the plain `VideoDiT`."""
    from model.folder import read_config

    del group  # loading needs no collective: every rank reads its own byte ranges
    return load_dit_shard(folder, read_config(folder), rank, world_size)


def load_rank0(folder: str | Path, group: RankGroup) -> tuple[MagiModel, GroupForward]:
    """Rank 0's model (VAE, text, and for the runner's null caption the DiT's replicated part)
    and the group forward its engine runs in place of `model.dit`."""
    from model.folder import load_model

    share = load_rank_dit(folder, group.rank, group.world_size, group)
    dit = share.dit if isinstance(share, ShardedDiT) else share
    model = load_model(folder, dit=dit)
    num_layers = model.config.model_config.num_layers
    return model, GroupForward(share, group, num_layers, vae=model.vae)


def load_rank_vae(folder: str | Path) -> ViTVAE:
    """A follower's VAE, for its tiles of the split decodes."""
    from model.folder import folder_paths, read_config

    config = read_config(folder)
    return load_vae(folder_paths(folder, config).vae, dtype=config.model_config.dtype)


# ---- messages ---------------------------------------------------------------------------


@dataclass
class _WireGroup:
    """A `ChunkGroup` as sent: the cache by id, everything else as is."""

    chunks: list[ChunkInput]
    cache_id: int | None
    cached_chunks: list[int]


@dataclass
class _Message:
    ops: list[CacheOp] = field(default_factory=list)  # cache operations, before the forward
    groups: list[_WireGroup] | None = None  # the forward to run; None: no forward
    decode: Tensor | None = None  # latents (already / scale factor) to decode, split by tiles
    tile_frames: int = 12  # the decode's temporal tile
    stop: bool = False  # the group is shutting down


def _send(data: bytes, group: RankGroup) -> None:
    """Broadcast a pickled message from rank 0: length, then bytes."""
    dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), 0, group=group.control)
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=group.control)


def _receive(group: RankGroup) -> _Message:
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=group.control)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, 0, group=group.control)
    return pickle.loads(data.numpy().tobytes())


# ---- rank 0 -----------------------------------------------------------------------------


class MirroredKVCache(KVCache):
    """Rank 0's cache of one session: every operation that changes which chunks it holds is
    also logged for the followers' copies (writes happen inside the forward on every rank)."""

    def __init__(self, num_layers: int, cache_id: int, log: list[CacheOp]) -> None:
        super().__init__(num_layers)
        self.cache_id = cache_id
        self._log = log

    def drop_before(self, chunk_index: int) -> None:
        super().drop_before(chunk_index)
        self._log.append(("drop_before", self.cache_id, chunk_index))

    def clear(self) -> None:
        super().clear()
        self._log.append(("clear", self.cache_id, None))


@dataclass
class GroupStats:
    """What the messages cost (rank 0), to check they are not the bottleneck."""

    forwards: int = 0
    message_bytes: int = 0
    send_s: float = 0.0  # pickling + broadcasting the messages
    forward_s: float = 0.0  # ulysses_forward itself


class GroupForward:
    """Rank 0's stand-in for `model.dit`: calling it with `groups` runs the packed forward on
    every rank of the group and returns the velocities; `new_cache()` makes caches the followers
    mirror."""

    def __init__(
        self,
        dit: VideoDiT | ShardedDiT,
        group: RankGroup,
        num_layers: int,
        vae: ViTVAE | None = None,
    ) -> None:
        if group.rank != 0:
            raise ValueError("GroupForward runs on rank 0; other ranks call serve_follower")
        # `dit`: whatever `ulysses_forward` takes (what `load_rank_dit` returns on this rank)
        self.dit, self.group, self.num_layers = dit, group, num_layers
        self.vae = vae  # with a VAE, decodes are split over the ranks by tiles
        self.stats = GroupStats()
        self._ops: list[CacheOp] = []
        self._next_id = 0
        self._closed = False

    def new_cache(self) -> KVCache:
        cache = MirroredKVCache(self.num_layers, self._next_id, self._ops)
        # A session dropped without a clear (a refused open, a forgotten session) still frees
        # its followers' copies: the release goes out with the next message.
        weakref.finalize(cache, self._ops.append, ("release", self._next_id, None))
        self._next_id += 1
        return cache

    def __call__(self, groups: list[ChunkGroup]) -> list[list[Tensor]]:
        wire = [_wire(g) for g in groups]
        t0 = time.perf_counter()
        self._broadcast(_Message(ops=self._take_ops(), groups=wire))
        t1 = time.perf_counter()
        try:
            velocities = ulysses_forward(self.dit, groups, self.group.forward)
        except Exception as e:
            # A failed collective raises a plain RuntimeError, like a failed computation; either
            # way the ranks may be out of step now, so the group is not used again.
            raise GroupLost(f"the parallel forward failed: {type(e).__name__}: {e}") from e
        self.stats.forwards += 1
        self.stats.send_s += t1 - t0
        self.stats.forward_s += time.perf_counter() - t1
        return velocities

    def decode(self, z: Tensor, tile_frames: int) -> Tensor:
        """`vae.tiled_decode(z)` with the tiles spread over the ranks (split_tiled_decode:
        bit-identical; measured 0.65x the time of rank 0 alone at 2 ranks, docs/parallel.md)."""
        if self.vae is None:
            raise ValueError("this GroupForward was made without a VAE")
        self._broadcast(_Message(ops=self._take_ops(), decode=z, tile_frames=tile_frames))
        try:
            video = split_tiled_decode(self.vae, z, self.group.forward, 0, tile_frames=tile_frames)
        except Exception as e:
            raise GroupLost(f"the split decode failed: {type(e).__name__}: {e}") from e
        assert video is not None  # rank 0 is the root
        return video

    def sync(self) -> None:
        """Flush cache operations and show the followers rank 0 is alive (call when idle)."""
        self._broadcast(_Message(ops=self._take_ops()))

    def close(self) -> None:
        """Tell the followers to return; rank 0 stays in the group until `leave_group`."""
        if not self._closed:
            self._closed = True
            self._broadcast(_Message(ops=self._take_ops(), stop=True))

    def _take_ops(self) -> list[CacheOp]:
        # In place: the caches (and their finalizers) append to this very list, and one may
        # append while we copy (a garbage collection), so only what was copied is removed.
        n = len(self._ops)
        ops = self._ops[:n]
        del self._ops[:n]
        return ops

    def _broadcast(self, message: _Message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            _send(data, self.group)
        except Exception as e:  # gloo reports a dead peer as a plain RuntimeError
            raise GroupLost(f"sending the step to the other ranks failed: {e}") from e
        self.stats.message_bytes += len(data)


def _wire(group: ChunkGroup) -> _WireGroup:
    cache = group.cache
    if cache is not None and not isinstance(cache, MirroredKVCache):
        raise TypeError("a group forward needs caches made by GroupForward.new_cache")
    return _WireGroup(group.chunks, None if cache is None else cache.cache_id, group.cached_chunks)


# ---- ranks 1..N-1 -----------------------------------------------------------------------


@dataclass
class FollowerStats:
    forwards: int = 0
    decodes: int = 0
    caches_left: int = 0  # caches still held when the stop came (0 once all sessions ended)


def serve_follower(
    dit: VideoDiT | ShardedDiT, group: RankGroup, num_layers: int, vae: ViTVAE | None = None
) -> FollowerStats:
    """Run rank 0's forwards (and this rank's tiles of its split decodes) until it sends stop.
    A failed collective (rank 0 or another rank died) or forward raises out of here: the
    process then exits and the group is restarted."""
    caches: dict[int, KVCache] = {}
    stats = FollowerStats()
    while True:
        message = _receive(group)
        for kind, cache_id, argument in message.ops:
            if kind == "drop_before" and cache_id in caches:
                caches[cache_id].drop_before(argument)
            elif kind in ("clear", "release"):
                caches.pop(cache_id, None)  # a cleared cache is an empty one: made on next use
        if message.stop:
            stats.caches_left = len(caches)
            return stats
        if message.decode is not None:
            if vae is None:
                raise ValueError("rank 0 split a decode but this rank has no VAE")
            split_tiled_decode(
                vae, message.decode, group.forward, 0, tile_frames=message.tile_frames
            )
            stats.decodes += 1
        if message.groups is None:
            continue
        groups = [
            ChunkGroup(
                w.chunks,
                None if w.cache_id is None else caches.setdefault(w.cache_id, KVCache(num_layers)),
                w.cached_chunks,
            )
            for w in message.groups
        ]
        # Any failure raises out of here, like rank 0's GroupLost: after a failed forward the
        # ranks may be out of step, so the whole group is restarted.
        ulysses_forward(dit, groups, group.forward)
        stats.forwards += 1
