"""A window forward that reads the clean chunk from the KV cache equals the same forward over
the full sequence without a cache, computed with the equivalent dense attention mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.checkpoint import init_random_
from model.config import get_preset
from model.dit import ChunkGroup, ChunkInput, VideoDiT
from model.kv_cache import KVCache

CHUNK_FRAMES = 6


class DenseMaskBackend:
    """One SDPA call over the whole sequence with a boolean mask built from the ranges."""

    def ranged(self, q, k, v, q_ranges, k_ranges):
        mask = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
        for (q0, q1), (k0, k1) in zip(q_ranges, k_ranges, strict=True):
            mask[q0:q1, k0:k1] = True
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
        ).transpose(0, 1)
        return torch.where(mask.any(1)[:, None, None], out, torch.zeros_like(out))


def tiny_model(backend=None) -> VideoDiT:
    model = VideoDiT(get_preset("tiny"), backend=backend)
    init_random_(model, seed=0, std=0.05)
    return model.eval()


def window_chunks(gen: torch.Generator, np_: int, offset_chunks: int) -> list[ChunkInput]:
    """Chunks 1..4 in flight at stage levels 3, 2, 1, 0 (look-back 2, 3, 4, 5 chunks), behind
    clean chunk 0. k ranges are in a key sequence that starts at chunk `1 - offset_chunks`."""
    chunks = []
    for g, lookback in zip(range(1, 5), (2, 3, 4, 5), strict=True):
        first = max(0, g + 1 - lookback)
        chunks.append(
            ChunkInput(
                latent=torch.randn(16, CHUNK_FRAMES, 8, 8, generator=gen),
                t=0.1 * g,
                caption=torch.randn(7, 64, generator=gen),
                caption_dropped=False,
                rope_frame=CHUNK_FRAMES * g,
                rope_frames_total=CHUNK_FRAMES * 5,
                k_range=((first - 1 + offset_chunks) * np_, (g + offset_chunks) * np_),
            )
        )
    return chunks


def clean_chunk(gen: torch.Generator, np_: int, cache_index: int | None) -> ChunkInput:
    return ChunkInput(
        latent=torch.randn(16, CHUNK_FRAMES, 8, 8, generator=gen),
        t=0.9999,
        caption=torch.randn(50, 64, generator=gen),
        caption_dropped=True,
        rope_frame=0,
        rope_frames_total=CHUNK_FRAMES * 5,
        k_range=(0, np_),
        cache_index=cache_index,
    )


def test_window_forward_with_cache_equals_full_sequence_with_mask():
    np_ = CHUNK_FRAMES * 4 * 4  # 64x64 video: 8x8 latent, 4x4 patches
    # without a cache: clean chunk 0 and chunks 1..4 in one sequence, dense mask
    gen = torch.Generator().manual_seed(1)
    full = [clean_chunk(gen, np_, None)] + window_chunks(gen, np_, offset_chunks=1)
    want = tiny_model(DenseMaskBackend())([ChunkGroup(full)])[0][1:]
    # with a cache: chunk 0's K|V written by its own forward, then read in front of chunks 1..4
    gen = torch.Generator().manual_seed(1)
    model, cache = tiny_model(), KVCache(num_layers=3)
    model([ChunkGroup([clean_chunk(gen, np_, cache_index=0)], cache=cache)])
    windowed = window_chunks(gen, np_, offset_chunks=1)
    got = model([ChunkGroup(windowed, cache=cache, cached_chunks=[0])])[0]
    for g, w in zip(got, want, strict=True):
        assert float((g - w).norm() / w.norm()) < 1e-5


def test_cache_holds_post_norm_post_rope_keys_per_layer_and_frees_on_drop():
    np_ = CHUNK_FRAMES * 16
    model, cache = tiny_model(), KVCache(num_layers=3)
    gen = torch.Generator().manual_seed(2)
    model([ChunkGroup([clean_chunk(gen, np_, cache_index=3)], cache=cache)])
    assert cache.chunk_indices == [3] and cache.has(3)
    kv = cache.read(0, [3])
    assert kv.shape == (np_, 4, 2 * 16)  # (tokens, G, [K | V])
    assert cache.nbytes == 3 * kv.numel() * kv.element_size()
    cache.drop_before(4)
    assert cache.nbytes == 0 and cache.chunk_indices == []


def test_batched_groups_equal_separate_forwards():
    """Two sessions in one forward give the same velocities as two forwards."""
    np_ = CHUNK_FRAMES * 16
    model = tiny_model()
    gen = torch.Generator().manual_seed(4)
    a = [clean_chunk(gen, np_, None)] + window_chunks(gen, np_, offset_chunks=1)[:2]
    b = window_chunks(gen, np_, offset_chunks=1)[:1]
    b[0].k_range = (0, np_)
    together = model([ChunkGroup(a), ChunkGroup(b)])
    alone = [model([ChunkGroup(a)])[0], model([ChunkGroup(b)])[0]]
    for group_t, group_a in zip(together, alone, strict=True):
        for x, y in zip(group_t, group_a, strict=True):
            assert (x - y).abs().max() < 1e-5
