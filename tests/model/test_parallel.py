"""Ulysses context parallelism: N gloo ranks on CPU give the single-rank velocities, with and
without reading a KV cache written by an earlier parallel forward; world size 1 is the plain
forward.

The multi-rank tests share one launch of 8 ranks (`eight_ranks`): a spawned rank costs ~2 s of
CPU to start, the forwards a fraction of that. Smaller worlds run in process groups of its
first ranks, which the parallel code sees as it sees any group: its size and its own rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine import ranks
from model import parallel
from model.checkpoint import random_dit
from model.config import get_preset
from model.dit import ChunkGroup, ChunkInput, Seam
from model.kv_cache import KVCache
from tests.model.test_kv_cache import CHUNK_FRAMES, clean_chunk, window_chunks

# one pytest-xdist worker runs the module, so the shared launch happens once per suite run
pytestmark = pytest.mark.xdist_group("model_parallel")

NP = CHUNK_FRAMES * 4 * 4  # tokens of one 64x64 chunk (8x8 latent, 2x2 patches)


def lone_chunk(gen: torch.Generator) -> ChunkInput:
    """An uncond-style chunk in a group of its own; 6x10 latent so that the packed sequence
    (5 * 96 + 90 = 570 tokens) splits unevenly over 4 ranks and chunks straddle rank borders."""
    return ChunkInput(
        latent=torch.randn(16, CHUNK_FRAMES, 6, 10, generator=gen),
        t=0.3,
        caption=torch.zeros(0, 64),
        caption_dropped=True,
        rope_frame=0,
        rope_frames_total=CHUNK_FRAMES,
        k_range=(0, CHUNK_FRAMES * 3 * 5),
    )


def two_forwards(rank: int, world: int, group) -> dict:
    """Forward 1: clean chunk 0 (writing the cache) + chunks 1..4 in flight, and a lone chunk;
    forward 2: new chunks 1..4 reading chunk 0 from the cache. Same inputs on every rank."""
    torch.manual_seed(0)
    model = random_dit(get_preset("tiny"), seed=0).eval()
    gen = torch.Generator().manual_seed(7)
    cache = KVCache(num_layers=3)
    first = [
        ChunkGroup(
            [clean_chunk(gen, NP, cache_index=0)] + window_chunks(gen, NP, offset_chunks=1),
            cache=cache,
        ),
        ChunkGroup([lone_chunk(gen)]),
    ]
    stats = parallel.CommStats()
    out1 = parallel.ulysses_forward(model, first, group, stats=stats)
    second = [ChunkGroup(window_chunks(gen, NP, offset_chunks=1), cache=cache, cached_chunks=[0])]
    out2 = parallel.ulysses_forward(model, second, group)
    return {
        "out1": out1,
        "out2": out2,
        "cache_shape": tuple(cache.read(0, [0]).shape),
        "stats": stats,
    }


def reference() -> dict:
    """The plain single-process forward."""
    return two_forwards(0, 1, None)


def assert_matches(got: dict, want: dict) -> None:
    for key in ("out1", "out2"):
        for g_group, w_group in zip(got[key], want[key], strict=True):
            for g, w in zip(g_group, w_group, strict=True):
                assert g.shape == w.shape
                assert float((g - w).abs().max()) < 1e-5


def test_world_size_one_is_the_plain_forward():
    model = random_dit(get_preset("tiny"), seed=0).eval()
    gen = torch.Generator().manual_seed(3)
    groups = [ChunkGroup([lone_chunk(gen)])]
    a = parallel.ulysses_forward(model, groups)[0][0]
    b = model(groups)[0][0]
    assert torch.equal(a, b)


class RecordingSeam(Seam):
    """The identity seam, noting which hook ran with which shapes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def token_range(self, length):
        self.calls.append(("token_range", length))
        return super().token_range(length)

    def layers(self, layers):
        self.calls.append(("layers", len(layers)))
        return super().layers(layers)

    def to_heads(self, q, k, v):
        self.calls.append(("to_heads", tuple(q.shape), tuple(k.shape)))
        return super().to_heads(q, k, v)

    def to_tokens(self, o):
        self.calls.append(("to_tokens", tuple(o.shape)))
        return super().to_tokens(o)

    def gather_output(self, out):
        self.calls.append(("gather_output", tuple(out.shape)))
        return super().gather_output(out)


def test_the_one_forward_calls_each_seam_hook_at_its_point():
    """The forward's split points: the token split once, the layer source once, the head split
    and its inverse around every layer's self-attention, the output gather once."""
    model = random_dit(get_preset("tiny"), seed=0).eval()
    tiny = get_preset("tiny").model_config
    gen = torch.Generator().manual_seed(3)
    groups = [ChunkGroup([lone_chunk(gen)])]
    seam = RecordingSeam()
    assert torch.equal(model(groups, seam)[0][0], model(groups)[0][0])
    s, hq, g, hd = 90, tiny.num_attention_heads, tiny.num_query_groups, tiny.kv_channels
    per_layer = [("to_heads", (s, hq, hd), (s, g, hd)), ("to_tokens", (s, hq, hd))]
    out = 4 * tiny.out_channels
    assert seam.calls == [
        ("token_range", s),
        ("layers", tiny.num_layers),
        *per_layer * tiny.num_layers,
        ("gather_output", (s, out)),
    ]


def test_shard_bounds_give_first_ranks_the_extra_tokens():
    assert parallel.shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert parallel.shard_bounds(8, 2) == [(0, 4), (4, 8)]


def split_decode(rank: int, world: int, group) -> torch.Tensor | None:
    from model.vae import VAEConfig, random_vae

    vae = random_vae(VAEConfig.tiny(), seed=1)
    z = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return parallel.split_tiled_decode(vae, z, group, tile_frames=8, tile_px=32)


FORWARD_WORLDS = (2, 4, 8)
DECODE_WORLDS = (2, 3)


def every_world(rank: int, world: int, group) -> dict:
    """One rank of the shared launch: `two_forwards` in groups of the first 2, 4 and 8 ranks,
    then `split_decode` in groups of the first 2 and 3; the results of the groups it is in."""
    # every rank takes part in creating every group, members or not (torch.distributed's rule)
    subgroups = {n: dist.new_group(list(range(n))) for n in (2, 3, 4)}
    subgroups[world] = group
    out: dict = {"forwards": {}, "decodes": {}}
    for n in FORWARD_WORLDS:
        if rank < n:
            out["forwards"][n] = two_forwards(rank, n, subgroups[n])
    for n in DECODE_WORLDS:
        if rank < n:
            out["decodes"][n] = split_decode(rank, n, subgroups[n])
    return out


@pytest.fixture(scope="module")
def eight_ranks() -> list[dict]:
    """Every rank's results of `every_world` on one 8-rank launch."""
    return ranks.launch(every_world, max(FORWARD_WORLDS))


def test_two_and_four_ranks_equal_one_rank(eight_ranks):
    """N = 2 (2 KV groups per rank) and N = 4 (G/N = 1): velocities of both forwards match,
    each rank caches G/N KV heads, and the bytes sent match the formula."""
    want = reference()
    tiny = get_preset("tiny").model_config
    for world in (2, 4):
        results = [r["forwards"][world] for r in eight_ranks[:world]]
        for rank, got in enumerate(results):
            assert_matches(got, want)
            assert got["cache_shape"] == (NP, 4 // world, 2 * 16), (world, rank)
        sent = sum(r["stats"].qkv_all_to_all + r["stats"].out_all_to_all for r in results)
        per_layer = parallel.qkv_bytes_per_layer(
            570, tiny.num_attention_heads, tiny.num_query_groups, tiny.kv_channels, world, 4
        )
        assert sent == tiny.num_layers * per_layer
        assert results[0]["stats"].per_layer == [results[0]["stats"].per_layer[0]] * 3


def test_eight_ranks_repeat_kv_heads(eight_ranks):
    """N = 8 > G = 4: every rank gets one query head and one repeated KV head."""
    want = reference()
    results = [r["forwards"][8] for r in eight_ranks]
    assert len(results) == 8
    for got in results:
        assert_matches(got, want)
        assert got["cache_shape"] == (NP, 1, 2 * 16)


def test_vae_decode_split_over_ranks_is_the_tiled_decode(eight_ranks):
    """18 tiles (2 x 3 x 3, edge tiles smaller) decoded round-robin on 2 and 3 ranks, blended on
    rank 0: bit-identical to `tiled_decode`; the other ranks return None."""
    from model.vae import VAEConfig, random_vae

    vae = random_vae(VAEConfig.tiny(), seed=1)
    z = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    want = vae.tiled_decode(z, tile_frames=8, tile_px=32)
    assert torch.equal(split_decode(0, 1, None), want)
    for world in (2, 3):
        results = [r["decodes"][world] for r in eight_ranks[:world]]
        assert torch.equal(results[0], want)
        assert all(r is None for r in results[1:])
