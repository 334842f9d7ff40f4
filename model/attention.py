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
        for members in buckets.values():
            # (S, H, hd) slices -> (B, H, S, hd); GQA repeats KV heads contiguously (head h ->
            # group h // rep), the flash-attn convention MAGI-1 was trained with.
            qs = torch.stack([q[q_ranges[i][0] : q_ranges[i][1]] for i in members]).transpose(1, 2)
            ks = torch.stack([k[k_ranges[i][0] : k_ranges[i][1]] for i in members]).transpose(1, 2)
            vs = torch.stack([v[k_ranges[i][0] : k_ranges[i][1]] for i in members]).transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa).transpose(1, 2)
            for j, i in enumerate(members):
                out[q_ranges[i][0] : q_ranges[i][1]] = o[j]
        return out


def default_backend() -> AttentionBackend:
    return SdpaBackend()
