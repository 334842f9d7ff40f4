"""Attention backend: one interface for the per-chunk (query range, key range) pattern.

MAGI-1 expresses attention as a list of `(q_range, k_range)` pairs, one per chunk (reference
§3.13, §7.4). Every backend computes exactly that; the model never builds a dense mask.

A backend works in two steps: `plan` turns the ranges into whatever index tensors it needs,
once per forward (the ranges are the same in every layer), and `attend` runs one layer's
attention with that plan. `ranged` does both, for one-off calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.backends.cuda import SDPAParams, can_use_flash_attention

# How SDPA gets GQA keys on CUDA (`flash_gqa_choice`)
GQA_KEEP = "enable_gqa"  # pass the G KV heads with enable_gqa=True
GQA_REPEAT = "repeat_kv"  # repeat them to Hq heads: flash refuses enable_gqa but takes this

FLASH_MAX_HEAD_DIM = 256  # the flash kernels' largest head dim (and it must be a multiple of 8)
FLASH_MIN_CAPABILITY = (8, 0)  # flash attention needs sm80+


@dataclass(frozen=True)
class Bucket:
    """The range pairs of one (query length, key length): attended in one batched call."""

    count: int  # n, the pairs in it
    q_len: int
    k_len: int
    q_rows: Tensor  # (n * q_len,) the pairs' query rows, pair after pair
    k_rows: Tensor  # (n * k_len,) their key rows


@dataclass(frozen=True)
class VarlenPlan:
    """All pairs with keys as one variable-length batch (CUDA only)."""

    q_rows: Tensor  # the pairs' query rows, pair after pair
    in_order: bool  # q_rows is 0..q_total-1: when q has q_total rows, no gather is needed
    q_total: int
    k_rows: Tensor  # the pairs' key rows, pair after pair (key ranges may overlap)
    cu_q: Tensor  # (n + 1,) int32 cumulative query lengths
    cu_k: Tensor  # (n + 1,) int32 cumulative key lengths
    max_q: int
    max_k: int


@dataclass(frozen=True)
class RangePlan:
    """One forward's (query range, key range) pairs, prepared for a backend."""

    q_ranges: list[tuple[int, int]]
    k_ranges: list[tuple[int, int]]
    buckets: list[Bucket] = field(default_factory=list)  # SdpaBackend's per-shape calls
    varlen: VarlenPlan | None = None  # SdpaBackend on CUDA: the one-call form


class AttentionBackend(Protocol):
    def plan(
        self, q_ranges: list[tuple[int, int]], k_ranges: list[tuple[int, int]], device
    ) -> RangePlan:
        """Prepare the ranges once; the plan is reused by every layer of the forward."""
        ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: RangePlan) -> Tensor:
        """q (Sq, Hq, hd), k/v (Sk, G, hd) -> (Sq, Hq, hd). Query range i attends to key range i
        (bidirectional inside); an empty key range gives zeros (flash-attn varlen behaviour)."""
        ...


@dataclass
class SdpaBackend:
    """PyTorch scaled_dot_product_attention. Range pairs of equal (query, key) lengths are
    stacked into one batched call: many sessions' chunks share shapes (every uncond chunk, the
    null captions, chunks at the same window level), and one call per shape instead of one per
    chunk is what makes packing sessions pay off. On CUDA SDPA picks flash kernels itself; for
    GQA the keys are repeated where flash would refuse `enable_gqa`, and bf16 runs all ranges in
    one varlen flash call. The CPU path is the per-shape SDPA with `enable_gqa`."""

    repeat_kv: bool | None = None  # GQA: None repeats KV heads where flash needs it (CUDA only)
    use_varlen: bool = True  # CUDA bf16: one varlen flash call per layer for all ranges
    # per (device, dtype, Hq, G, hd): the GQA choice and whether varlen applies, probed once
    _probed: dict[tuple, tuple[str, bool]] = field(default_factory=dict, repr=False)

    def plan(
        self, q_ranges: list[tuple[int, int]], k_ranges: list[tuple[int, int]], device
    ) -> RangePlan:
        device = torch.device(device)
        members: dict[tuple[int, int], list[int]] = {}
        for i, ((q0, q1), (k0, k1)) in enumerate(zip(q_ranges, k_ranges, strict=True)):
            if q1 > q0 and k1 > k0:  # an empty key range gives zeros
                members.setdefault((q1 - q0, k1 - k0), []).append(i)
        buckets = [
            Bucket(
                len(which),
                q_len,
                k_len,
                _rows([q_ranges[i] for i in which], device),
                _rows([k_ranges[i] for i in which], device),
            )
            for (q_len, k_len), which in members.items()
        ]
        varlen = None
        if device.type == "cuda" and self.use_varlen and buckets:
            varlen = _varlen_plan(q_ranges, k_ranges, device)
        return RangePlan(list(q_ranges), list(k_ranges), buckets, varlen)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: RangePlan) -> Tensor:
        gqa_mode, varlen_ok = self._probe(q, k, v)
        if plan.varlen is not None and varlen_ok:
            return _attend_varlen(q, k, v, plan.varlen)
        out = torch.zeros_like(q)
        gqa = q.shape[1] != k.shape[1]
        repeat = q.shape[1] // k.shape[1] if gqa and gqa_mode == GQA_REPEAT else 1
        for b in plan.buckets:
            # (S, H, hd) rows -> (B, H, S, hd); GQA repeats KV heads contiguously (head h ->
            # group h // rep), the flash-attn convention MAGI-1 was trained with. One gather per
            # tensor rather than a slice per chunk: under autograd every slice's backward writes
            # a whole (S, H, hd) gradient, a gather's backward one scatter.
            n = b.count
            qs = q.index_select(0, b.q_rows).unflatten(0, (n, b.q_len)).transpose(1, 2)
            ks = k.index_select(0, b.k_rows).unflatten(0, (n, b.k_len)).transpose(1, 2)
            vs = v.index_select(0, b.k_rows).unflatten(0, (n, b.k_len)).transpose(1, 2)
            if repeat > 1:
                ks, vs = ks.repeat_interleave(repeat, dim=1), vs.repeat_interleave(repeat, dim=1)
            o = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa and repeat == 1)
            out.index_copy_(0, b.q_rows, o.transpose(1, 2).flatten(0, 1))  # in place, no copy
        return out

    def ranged(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_ranges: list[tuple[int, int]],
        k_ranges: list[tuple[int, int]],
    ) -> Tensor:
        """`plan` and `attend` in one call, for ranges used once."""
        return self.attend(q, k, v, self.plan(q_ranges, k_ranges, q.device))

    def path(self, q: Tensor, k: Tensor, v: Tensor) -> str:
        """The kernel route `attend` takes for tensors like these (S, H, hd): for reports."""
        gqa_mode, varlen_ok = self._probe(q, k, v)
        if q.device.type == "cuda" and self.use_varlen and varlen_ok:
            return "varlen flash (one call per layer)"
        if q.shape[1] == k.shape[1]:
            return "sdpa per shape"
        if gqa_mode == GQA_REPEAT:
            return "sdpa per shape, KV heads repeated"
        return "sdpa per shape, enable_gqa"

    def _probe(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[str, bool]:
        """The GQA choice and whether varlen applies, once per kind of call. Off CUDA nothing
        is probed: enable_gqa and no varlen (unless `repeat_kv` forces the repeat)."""
        if q.device.type != "cuda" or q.shape[0] == 0 or k.shape[0] == 0:
            return (GQA_REPEAT if self.repeat_kv else GQA_KEEP), False  # nothing to probe with
        key = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[2])
        if key not in self._probed:
            if self.repeat_kv is None:
                sample = [x[:1].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # (1, H, 1, hd)
                mode = flash_gqa_choice(*sample)
            else:
                mode = GQA_REPEAT if self.repeat_kv else GQA_KEEP
            self._probed[key] = (mode, _varlen_supported(q, k))
        return self._probed[key]


def flash_gqa_choice(q: Tensor, k: Tensor, v: Tensor) -> str:
    """How SDPA should get GQA keys for q (B, Hq, Sq, hd), k/v (B, G, Sk, hd): `GQA_REPEAT`
    where torch's own predicate says flash refuses `enable_gqa` but takes the same call with the
    KV heads repeated; else `GQA_KEEP` (always off CUDA, where there is no flash kernel)."""
    if not q.is_cuda or q.shape[1] == k.shape[1]:
        return GQA_KEEP
    if can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True)):
        return GQA_KEEP
    rep = q.shape[1] // k.shape[1]
    repeated = SDPAParams(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), None, 0.0, False, False
    )
    return GQA_REPEAT if can_use_flash_attention(repeated) else GQA_KEEP


def _varlen_supported(q: Tensor, k: Tensor) -> bool:
    """Whether torch's varlen flash kernel takes these: CUDA sm80+, bf16, a flash head dim."""
    hd = q.shape[2]
    return (
        q.is_cuda
        and q.dtype == torch.bfloat16 == k.dtype
        and hd % 8 == 0
        and hd <= FLASH_MAX_HEAD_DIM
        and q.shape[1] % k.shape[1] == 0
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(q.device) >= FLASH_MIN_CAPABILITY
    )


def _varlen_plan(
    q_ranges: list[tuple[int, int]], k_ranges: list[tuple[int, int]], device: torch.device
) -> VarlenPlan:
    pairs = [
        (q, k)
        for q, k in zip(q_ranges, k_ranges, strict=True)
        if q[1] > q[0] and k[1] > k[0]  # an empty key range gives zeros: left out
    ]
    q_lens = [q1 - q0 for (q0, q1), _ in pairs]
    k_lens = [k1 - k0 for _, (k0, k1) in pairs]
    q_total = sum(q_lens)
    return VarlenPlan(
        q_rows=_rows([q for q, _ in pairs], device),
        in_order=[q for q, _ in pairs] == _tiling(q_lens),
        q_total=q_total,
        k_rows=_rows([k for _, k in pairs], device),
        cu_q=_cumulative(q_lens, device),
        cu_k=_cumulative(k_lens, device),
        max_q=max(q_lens),
        max_k=max(k_lens),
    )


def _attend_varlen(q: Tensor, k: Tensor, v: Tensor, plan: VarlenPlan) -> Tensor:
    """One flash varlen call over all pairs; the keys of each pair gathered back to back."""
    whole = plan.in_order and q.shape[0] == plan.q_total
    qs = q.contiguous() if whole else q.index_select(0, plan.q_rows)
    ks, vs = k.index_select(0, plan.k_rows), v.index_select(0, plan.k_rows)
    # imported here: the module pulls in torch._dynamo (seconds per process) and only CUDA
    # bf16 takes this path
    from torch.nn.attention.varlen import varlen_attn

    # num_splits=1: no split-KV, so a chunk's output does not depend on the other ranges
    o = varlen_attn(
        qs,
        ks,
        vs,
        plan.cu_q,
        plan.cu_k,
        plan.max_q,
        plan.max_k,
        enable_gqa=q.shape[1] != k.shape[1],
        num_splits=1,
    )
    if whole:
        return o
    return torch.zeros_like(q).index_copy_(0, plan.q_rows, o)


def _tiling(lengths: list[int]) -> list[tuple[int, int]]:
    """Ranges of these lengths one after another from 0."""
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out


def _cumulative(lengths: list[int], device: torch.device) -> Tensor:
    ends = [0, *(r1 for _, r1 in _tiling(lengths))]
    return torch.tensor(ends, dtype=torch.int32, device=device)


def _rows(ranges: list[tuple[int, int]], device: torch.device) -> Tensor:
    """The row indices of the ranges, one after another."""
    return torch.cat([torch.arange(r0, r1, device=device) for r0, r1 in ranges])


class RangedAdapter:
    """A backend that defines only `ranged(q, k, v, q_ranges, k_ranges)` (a reference one in a
    test): its plan is the bare ranges."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def plan(
        self, q_ranges: list[tuple[int, int]], k_ranges: list[tuple[int, int]], device
    ) -> RangePlan:
        return RangePlan(list(q_ranges), list(k_ranges))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: RangePlan) -> Tensor:
        return self.inner.ranged(q, k, v, plan.q_ranges, plan.k_ranges)


def as_backend(backend: object | None) -> AttentionBackend:
    """The backend to plan and attend with: the default, or the one given (wrapped when it only
    defines `ranged`)."""
    if backend is None:
        return default_backend()
    if hasattr(backend, "plan") and hasattr(backend, "attend"):
        return backend
    return RangedAdapter(backend)


def default_backend() -> AttentionBackend:
    return SdpaBackend()
