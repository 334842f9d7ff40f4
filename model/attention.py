"""Attention backend: one interface for the per-chunk (query range, key range) pattern.

MAGI-1 expresses attention as a list of `(q_range, k_range)` pairs, one per chunk (reference
§3.13, §7.4). Every backend computes exactly that; the model never builds a dense mask.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class AttentionBackend(Protocol):
    def ranged(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_ranges: list[tuple[int, int]],
        k_ranges: list[tuple[int, int]],
    ) -> Tensor:
        """q (Sq, Hq, hd), k/v (Sk, G, hd) -> (Sq, Hq, hd). Query range i attends to key range i
        (bidirectional inside); an empty key range gives zeros (flash-attn varlen behaviour)."""
        ...


class SdpaBackend:
    """PyTorch scaled_dot_product_attention. Range pairs of equal (query, key) lengths are
    stacked into one batched call: many sessions' chunks share shapes (every uncond chunk, the
    null captions, chunks at the same window level), and one call per shape instead of one per
    chunk is what makes packing sessions pay off. On CUDA SDPA picks flash kernels itself."""

    def ranged(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_ranges: list[tuple[int, int]],
        k_ranges: list[tuple[int, int]],
    ) -> Tensor:
        out = torch.zeros_like(q)
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, ((q0, q1), (k0, k1)) in enumerate(zip(q_ranges, k_ranges, strict=True)):
            if q1 > q0 and k1 > k0:  # an empty key range gives zeros
                buckets.setdefault((q1 - q0, k1 - k0), []).append(i)
        gqa = q.shape[1] != k.shape[1]
        for (q_len, k_len), members in buckets.items():
            # (S, H, hd) rows -> (B, H, S, hd); GQA repeats KV heads contiguously (head h ->
            # group h // rep), the flash-attn convention MAGI-1 was trained with. One gather per
            # tensor rather than a slice per chunk: under autograd every slice's backward writes
            # a whole (S, H, hd) gradient, a gather's backward one scatter.
            q_rows = _rows([q_ranges[i] for i in members], q.device)
            k_rows = _rows([k_ranges[i] for i in members], k.device)
            qs = q.index_select(0, q_rows).unflatten(0, (len(members), q_len)).transpose(1, 2)
            ks = k.index_select(0, k_rows).unflatten(0, (len(members), k_len)).transpose(1, 2)
            vs = v.index_select(0, k_rows).unflatten(0, (len(members), k_len)).transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa).transpose(1, 2)
            out.index_copy_(0, q_rows, o.flatten(0, 1))  # in place: no copy of `out` per bucket
        return out


def _rows(ranges: list[tuple[int, int]], device: torch.device) -> Tensor:
    """The row indices of the ranges, one after another."""
    return torch.cat([torch.arange(r0, r1, device=device) for r0, r1 in ranges])


def default_backend() -> AttentionBackend:
    return SdpaBackend()
