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
        self, q: Tensor, k: Tensor, v: Tensor, q_ranges: list[tuple[int, int]],
        k_ranges: list[tuple[int, int]],
    ) -> Tensor:
        """q (Sq, Hq, hd), k/v (Sk, G, hd) -> (Sq, Hq, hd). Query range i attends to key range i
        (bidirectional inside); an empty key range gives zeros (flash-attn varlen behaviour)."""
        ...


class SdpaBackend:
    """PyTorch scaled_dot_product_attention, one call per range pair. On CPU this is the math
    kernel; on CUDA SDPA picks its flash / memory-efficient kernels itself."""

    def ranged(
        self, q: Tensor, k: Tensor, v: Tensor, q_ranges: list[tuple[int, int]],
        k_ranges: list[tuple[int, int]],
    ) -> Tensor:
        out = torch.zeros_like(q)
        gqa = q.shape[1] != k.shape[1]
        for (q0, q1), (k0, k1) in zip(q_ranges, k_ranges, strict=True):
            if q1 <= q0 or k1 <= k0:
                continue
            # (S, H, hd) -> (H, S, hd); GQA repeats KV heads contiguously (head h -> h // rep),
            # the flash-attn convention MAGI-1 was trained with.
            o = F.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1),
                k[k0:k1].transpose(0, 1),
                v[k0:k1].transpose(0, 1),
                enable_gqa=gqa,
            )
            out[q0:q1] = o.transpose(0, 1)
        return out


def default_backend() -> AttentionBackend:
    return SdpaBackend()
