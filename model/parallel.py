"""Ulysses context parallelism for the packed DiT forward (reference §7.1, `cp_ulysses`).

The model stays single-device and has one forward: this module applies the parallelism from
outside, as a `UlyssesSeam` (a `model.dit.Seam`) passed into `VideoDiT.forward`, and is the plain
`model(groups)` when the world size is 1 (no process group needed).

With `N` ranks, every rank holds all weights (or a `ShardedDiT`, below) and runs the same
`ulysses_forward(model, groups, process_group)` on the same chunk groups. After embedding, the
packed token sequence (all groups, all chunks, length S) is split contiguously: rank r owns
tokens `shard_bounds(S, N)[r]`, the first `S mod N` ranks one extra. Per layer each rank runs
every per-token op (pre-LN, Q/K/V/Qx projections, QK-norm, RoPE, cross-attention, output
projection, gates, MLP) on its slice only.
Self-attention is the only place tokens meet: one all-to-all turns Q|K|V from
`(own tokens, all heads)` into `(all tokens, own heads)`, the rank runs the ranged attention of
every chunk over the full key sequences for its `Hq/N` query heads and `G/N` KV groups (KV heads
repeated first when `N > G`), and a second all-to-all brings the outputs back to the token split.
The KV cache is written and read after the first all-to-all, so each rank's cache holds its own
KV heads for the full sequence (`(Np, max(G, N)/N, 2hd)` per chunk and layer). After the final
linear the outputs are all-gathered along the sequence, so every rank returns all velocities.

Head split: rank r owns query heads `[r Hq/N, (r+1) Hq/N)`; with GQA (head h reads group
`h // (Hq/G)`) these read groups `[r G/N, (r+1) G/N)` when `N <= G`, or the single group
`r // (N/G)` when `N > G`, which is repeated head `r` of `repeat_interleave(N/G)`. Needs `Hq % N ==
0` and `G % N == 0` or `N % G == 0`.

Sharded weights: `ulysses_forward` also takes a `model.sharding.ShardedDiT` (each rank holding
1/N of the transformer layers' weights, loaded by `load_dit_shard`); then every layer's weights
are all-gathered just before it runs (the next layer's gather overlapping; `UlyssesSeam.layers`),
and nothing else changes. `split_tiled_decode` spreads the VAE's decode tiles over the ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.config import check_head_split
from model.dit import ChunkGroup, Seam, TransformerLayer, VideoDiT
from model.sharding import ShardedDiT
from model.vae import DEFAULT_FPS, ViTVAE, cut_tiles, stitch_tiles, tile_plan


@dataclass
class CommStats:
    """Bytes this rank sent to other ranks (its own share of an all-to-all is not counted)."""

    qkv_all_to_all: int = 0  # per forward, all layers: Q|K|V, token split -> head split
    out_all_to_all: int = 0  # per forward, all layers: attention output, head split -> token
    output_all_gather: int = 0  # per forward: the final-linear output of this rank's tokens
    weight_all_gather: int = 0  # sharded weights (ShardedDiT): this rank's slices, to N-1 ranks
    layers: int = 0
    per_layer: list[int] = field(default_factory=list)  # QKV + out bytes of each layer

    @property
    def total(self) -> int:
        return (
            self.qkv_all_to_all
            + self.out_all_to_all
            + self.output_all_gather
            + self.weight_all_gather
        )


def shard_bounds(length: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous split of `length` tokens; the first `length % world_size` ranks get one more."""
    base, extra = divmod(length, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        size = base + (1 if r < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def local_kv_heads(kv: Tensor, world_size: int) -> Tensor:
    """(s, G, hd) -> (s, max(G, N), hd): KV heads repeated (contiguously) when N > G, so that an
    even split over N ranks gives each rank the group(s) its query heads read."""
    groups = kv.shape[1]
    if world_size > groups:
        return kv.repeat_interleave(world_size // groups, dim=1)
    return kv


def seq_to_heads(x: Tensor, sizes: list[int], group: dist.ProcessGroup) -> Tensor:
    """All-to-all `(s_r, N*h, hd) -> (S, h, hd)`: from this rank's tokens with all heads to all
    tokens with this rank's heads. `sizes` are every rank's token counts."""
    n = len(sizes)
    s, heads, hd = x.shape
    send = x.reshape(s, n, heads // n, hd).transpose(0, 1).contiguous()  # (N, s_r, h, hd)
    recv = x.new_empty(sum(sizes), heads // n, hd)
    dist.all_to_all_single(recv, send.reshape(n * s, heads // n, hd), sizes, [s] * n, group=group)
    return recv


def heads_to_seq(x: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> Tensor:
    """The inverse of `seq_to_heads`: `(S, h, hd) -> (s_r, N*h, hd)`, heads in rank order."""
    n = len(sizes)
    _, h, hd = x.shape
    s = sizes[rank]
    recv = x.new_empty(n * s, h, hd)
    dist.all_to_all_single(recv, x.contiguous(), [s] * n, sizes, group=group)
    return recv.reshape(n, s, h, hd).transpose(0, 1).reshape(s, n * h, hd)


class UlyssesSeam(Seam):
    """The Ulysses split of one forward on this rank of `group` (build one per forward: it keeps
    the token split that `token_range` chose). `sharded`: this rank's `ShardedDiT`, whose layers
    it gathers; `stats` gets the bytes this rank sends."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        stats: CommStats | None = None,
        sharded: ShardedDiT | None = None,
    ) -> None:
        self.group, self.stats, self.sharded = group, stats, sharded
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sizes: list[int] = []  # every rank's token count, set by token_range

    def token_range(self, length: int) -> tuple[int, int]:
        bounds = shard_bounds(length, self.world)
        self.sizes = [b - a for a, b in bounds]
        return bounds[self.rank]

    def layers(self, layers: nn.ModuleList) -> Iterator[TransformerLayer]:
        # a ShardedDiT's gathered scratch layers (their adaLN is not layer i's; the model
        # takes the gates from its own layer i, whose adaLN every rank holds)
        if self.sharded is not None:
            layers = self.sharded.gathered_layers(self.group, self.stats)
        for layer in layers:
            if self.stats is not None:
                self.stats.layers += 1
            yield layer

    def to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, hd = self.world, q.shape[2]
        k, v = local_kv_heads(k, n), local_kv_heads(v, n)
        # one fused all-to-all: per destination rank, [its query heads | its K heads | its V heads]
        s, hq, gk = q.shape[0], q.shape[1], k.shape[1]
        qkv = torch.cat(
            [
                q.reshape(s, n, hq // n, hd),
                k.reshape(s, n, gk // n, hd),
                v.reshape(s, n, gk // n, hd),
            ],
            dim=2,
        ).reshape(s, -1, hd)
        full = seq_to_heads(qkv, self.sizes, self.group)  # (S, Hq/N + 2 G'/N, hd)
        self._count("qkv_all_to_all", qkv, s)
        q_full, k_full, v_full = full.split([hq // n, gk // n, gk // n], dim=1)
        return q_full.contiguous(), k_full, v_full

    def to_tokens(self, o: Tensor) -> Tensor:
        out = heads_to_seq(o, self.sizes, self.rank, self.group)  # (s_r, Hq, hd)
        self._count("out_all_to_all", o, o.shape[0] - self.sizes[self.rank], exclude_own=False)
        return out

    def gather_output(self, out: Tensor) -> Tensor:
        # all-gather along the sequence (uneven shards: pad to the largest)
        width, biggest = out.shape[1], max(self.sizes)
        padded = out.new_zeros(biggest, width)
        padded[: out.shape[0]] = out
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        if self.stats is not None:
            self.stats.output_all_gather += out.numel() * out.element_size() * (self.world - 1)
        return torch.cat([g[:size] for g, size in zip(gathered, self.sizes, strict=True)])

    def _count(self, kind: str, x: Tensor, rows: int, exclude_own: bool = True) -> None:
        """Add the bytes of `rows` rows of `x` sent to other ranks (`exclude_own`: `x` goes to
        all N ranks evenly, own share excluded; else `rows` are exactly the rows sent away)."""
        if self.stats is None:
            return
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        sent = rows * row * (self.world - 1) // self.world if exclude_own else rows * row
        setattr(self.stats, kind, getattr(self.stats, kind) + sent)
        if kind == "qkv_all_to_all":
            self.stats.per_layer.append(sent)
        else:
            self.stats.per_layer[-1] += sent


@torch.inference_mode()
def ulysses_forward(
    model: VideoDiT | ShardedDiT,
    groups: list[ChunkGroup],
    process_group: dist.ProcessGroup | None = None,
    stats: CommStats | None = None,
) -> list[list[Tensor]]:
    """`model(groups)` computed by all ranks of `process_group` together (every rank calls it
    with the same groups; each rank's caches receive only its KV heads). Returns the velocities
    on every rank. World size 1 (or no process group) is exactly `model(groups)`.

    `model` is a full `VideoDiT` (every rank holds all weights) or this rank's `ShardedDiT`
    (model/sharding.py): then each layer's weights are all-gathered just before it runs, the
    next layer's gather overlapping this one's compute."""
    world = 1 if process_group is None else dist.get_world_size(process_group)
    sharded = model if isinstance(model, ShardedDiT) else None
    if sharded is not None:
        if world != sharded.world_size:
            raise ValueError(
                f"weights sharded for {sharded.world_size} ranks, forward on {world} rank(s)"
            )
        model = sharded.dit
    if world == 1:
        return model(groups)
    check_head_split(model.cfg.num_attention_heads, model.cfg.num_query_groups, world)
    return model(groups, UlyssesSeam(process_group, stats, sharded))


def qkv_bytes_per_layer(
    tokens: int,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    world_size: int,
    element_size: int,
) -> int:
    """Bytes all ranks together send to other ranks in one layer: Q|K|V there, outputs back."""
    if world_size == 1:
        return 0
    kv_heads = max(num_groups, world_size)
    per_token = (num_heads + 2 * kv_heads + num_heads) * head_dim * element_size
    return tokens * per_token * (world_size - 1) // world_size


# --- VAE decode split over ranks by tiles ---------------------------------------------------


def split_tiled_decode(
    vae: ViTVAE,
    z: Tensor,
    process_group: dist.ProcessGroup | None = None,
    root: int = 0,
    tile_frames: int = DEFAULT_FPS // 2,
    tile_px: int = 256,
    spatial_overlap: float = 0.25,
    temporal_overlap: float = 0.0,
) -> Tensor | None:
    """`vae.tiled_decode(z, ...)` with the tiles decoded round-robin over the ranks (tile k on
    rank k mod N); the decoded tiles are sent to `root`, which blends and stitches them exactly
    as `tiled_decode` does (bit-identical). Returns the video on `root`, None elsewhere. Every
    rank calls it with the same latent."""
    world = 1 if process_group is None else dist.get_world_size(process_group)
    if world == 1:
        return vae.tiled_decode(z, tile_frames, tile_px, spatial_overlap, temporal_overlap)
    rank = dist.get_rank(process_group)
    plan = tile_plan(vae.config, tile_frames, tile_px, spatial_overlap, temporal_overlap, True)
    tiles = list(cut_tiles(z, plan).items())  # in `tiled_decode`'s order
    mine = {k: vae.decode(tile) for k, (_, tile) in enumerate(tiles) if k % world == rank}
    peer = dist.get_global_rank(process_group, root) if process_group is not None else root
    if rank != root:
        for out in mine.values():  # in tile order, as root receives them
            shape = torch.tensor(out.shape, dtype=torch.int64, device=out.device)
            dist.send(shape, peer, group=process_group)
            dist.send(out.contiguous(), peer, group=process_group)
        return None
    outs = {}
    for k, (key, _) in enumerate(tiles):
        owner = k % world
        if owner == rank:
            outs[key] = mine[k]
            continue
        src = dist.get_global_rank(process_group, owner)
        shape = torch.empty(5, dtype=torch.int64, device=z.device)
        dist.recv(shape, src, group=process_group)
        out = torch.empty(shape.tolist(), dtype=vae.dtype, device=z.device)
        dist.recv(out, src, group=process_group)
        outs[key] = out
    return stitch_tiles(outs, plan, chained=False)


# --- launching ranks -----------------------------------------------------------------------
