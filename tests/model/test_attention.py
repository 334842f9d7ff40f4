"""The attention backend: planned ranges equal per-pair SDPA, the repeated-KV GQA route equals
enable_gqa, the varlen plan's index tensors describe the same pairs, and a forward plans its
ranges once rather than per layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.attention import (
    GQA_KEEP,
    SdpaBackend,
    _varlen_plan,
    flash_gqa_choice,
)
from model.checkpoint import init_random_
from model.config import get_preset
from model.dit import ChunkGroup, ChunkInput, VideoDiT
from model.kv_cache import KVCache

HQ, G, HD = 8, 4, 16
# query ranges tile 0..40; key ranges overlap, repeat shapes (one bucket of two) and one is empty
Q_RANGES = [(0, 8), (8, 16), (16, 28), (28, 40), (40, 40)]
K_RANGES = [(0, 10), (5, 15), (0, 0), (3, 30), (0, 4)]


def qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(44, HQ, HD, generator=gen)  # 4 rows past every range: they stay zero
    k = torch.randn(30, G, HD, generator=gen)
    v = torch.randn(30, G, HD, generator=gen)
    return q, k, v


def per_pair(q, k, v, q_ranges, k_ranges) -> torch.Tensor:
    """One SDPA call per pair, KV heads repeated by hand (head h reads group h // rep)."""
    out = torch.zeros_like(q)
    rep = q.shape[1] // k.shape[1]
    for (q0, q1), (k0, k1) in zip(q_ranges, k_ranges, strict=True):
        if q1 > q0 and k1 > k0:
            qs = q[q0:q1].transpose(0, 1)
            ks = k[k0:k1].repeat_interleave(rep, 1).transpose(0, 1)
            vs = v[k0:k1].repeat_interleave(rep, 1).transpose(0, 1)
            out[q0:q1] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
    return out


def test_planned_attention_equals_one_sdpa_call_per_pair():
    q, k, v = qkv()
    backend = SdpaBackend()
    plan = backend.plan(Q_RANGES, K_RANGES, q.device)
    assert [(b.count, b.q_len, b.k_len) for b in plan.buckets] == [(2, 8, 10), (1, 12, 27)]
    assert plan.varlen is None  # never on the CPU
    got = backend.attend(q, k, v, plan)
    torch.testing.assert_close(got, per_pair(q, k, v, Q_RANGES, K_RANGES), rtol=0, atol=1e-6)
    assert torch.equal(got[16:28], torch.zeros_like(got[16:28]))  # empty key range: zeros
    assert torch.equal(got, backend.ranged(q, k, v, Q_RANGES, K_RANGES))


def test_repeated_kv_route_equals_enable_gqa_route():
    q, k, v = qkv(1)
    kept = SdpaBackend(repeat_kv=False)
    repeated = SdpaBackend(repeat_kv=True)
    assert kept.path(q, k, v) == "sdpa per shape, enable_gqa"
    assert repeated.path(q, k, v) == "sdpa per shape, KV heads repeated"
    want = kept.ranged(q, k, v, Q_RANGES, K_RANGES)
    torch.testing.assert_close(
        repeated.ranged(q, k, v, Q_RANGES, K_RANGES), want, rtol=0, atol=1e-6
    )


def test_gqa_choice_keeps_enable_gqa_off_cuda():
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in qkv())  # (1, H, S, hd)
    assert flash_gqa_choice(q, k, v) == GQA_KEEP
    assert flash_gqa_choice(q.bfloat16(), k.bfloat16(), v.bfloat16()) == GQA_KEEP
    # the default backend on the CPU: enable_gqa, no varlen, whatever the dtype
    assert SdpaBackend().path(*(x.bfloat16() for x in qkv())) == "sdpa per shape, enable_gqa"


def test_varlen_plan_describes_the_same_pairs():
    """What the CUDA varlen kernel would compute from the plan (each sequence's queries over
    its keys, from the cumulative lengths), done with SDPA on the CPU: the bucketed output."""
    q, k, v = qkv(2)
    plan = _varlen_plan(Q_RANGES, K_RANGES, q.device)
    assert plan.cu_q.dtype == plan.cu_k.dtype == torch.int32
    assert plan.cu_q.tolist() == [0, 8, 16, 28]  # the pair with no keys is left out
    assert plan.cu_k.tolist() == [0, 10, 20, 47]
    assert (plan.max_q, plan.max_k, plan.in_order) == (12, 27, False)
    qs, ks, vs = q[plan.q_rows], k[plan.k_rows], v[plan.k_rows]
    o = torch.empty_like(qs)
    cu_q, cu_k = plan.cu_q.tolist(), plan.cu_k.tolist()
    for i in range(len(cu_q) - 1):
        o[cu_q[i] : cu_q[i + 1]] = per_pair(
            qs, ks, vs, [(cu_q[i], cu_q[i + 1])], [(cu_k[i], cu_k[i + 1])]
        )[cu_q[i] : cu_q[i + 1]]
    got = torch.zeros_like(q).index_copy_(0, plan.q_rows, o)
    want = SdpaBackend().ranged(q, k, v, Q_RANGES, K_RANGES)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # query ranges that tile the rows in order are used as they are, no gather
    assert _varlen_plan(Q_RANGES[:2], K_RANGES[:2], q.device).in_order


class CountingBackend(SdpaBackend):
    """The default backend, counting its plan and attend calls."""

    def __init__(self) -> None:
        super().__init__()
        self.plans = 0
        self.attends = 0

    def plan(self, q_ranges, k_ranges, device):
        self.plans += 1
        return super().plan(q_ranges, k_ranges, device)

    def attend(self, q, k, v, plan):
        self.attends += 1
        return super().attend(q, k, v, plan)


def chunk(gen: torch.Generator, k_range, cache_index=None, caption_len: int = 5) -> ChunkInput:
    return ChunkInput(
        latent=torch.randn(16, 2, 8, 8, generator=gen),
        t=0.5,
        caption=torch.randn(caption_len, 64, generator=gen),
        caption_dropped=False,
        rope_frame=0,
        rope_frames_total=4,
        k_range=k_range,
        cache_index=cache_index,
    )


def test_a_forward_plans_its_ranges_once_not_per_layer():
    backend = CountingBackend()
    model = VideoDiT(get_preset("tiny"), backend=backend)
    init_random_(model, seed=0, std=0.05)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    cfg = model.cfg
    np_ = (2 // cfg.t_patch_size) * (8 // cfg.patch_size) ** 2  # tokens per chunk
    cache = KVCache(model.cfg.num_layers)
    model([ChunkGroup([chunk(gen, (0, np_), cache_index=0)], cache=cache)])
    backend.plans = backend.attends = 0
    groups = [
        ChunkGroup(
            [chunk(gen, (0, 2 * np_)), chunk(gen, (np_, 3 * np_), caption_len=0)],
            cache=cache,
            cached_chunks=[0],
        ),
        ChunkGroup([chunk(gen, (0, np_))]),
    ]
    model(groups)
    assert (backend.plans, backend.attends) == (2, 2 * cfg.num_layers)  # self + cross, once each
