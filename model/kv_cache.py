"""Per-session KV cache of clean chunks.

MAGI-1 caches, per layer, the self-attention K and V of every clean chunk (K after QK-norm and
RoPE, V raw), computed once when the chunk is re-forwarded at `clean_t` (reference §3.13, §4.5).
The official buffer spans the whole video; ours stores chunks by global index so the scheduler can
drop what no kv range can reach any more, which keeps an unbounded session's memory constant.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """K and V of one session's clean chunks: `chunk index -> per-layer (Np, G, 2*hd)` tensors,
    last dim `[K | V]` as in the official buffer."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._chunks: dict[int, list[Tensor | None]] = {}

    def write(self, layer: int, chunk_index: int, key_value: Tensor) -> None:
        slots = self._chunks.setdefault(chunk_index, [None] * self.num_layers)
        slots[layer] = key_value.detach()

    def read(self, layer: int, chunk_indices: list[int]) -> Tensor:
        """The cached K|V of these chunks for one layer, concatenated along tokens in order."""
        parts = []
        for index in chunk_indices:
            slots = self._chunks.get(index)
            if slots is None or slots[layer] is None:
                raise KeyError(f"chunk {index} has no cached KV for layer {layer}")
            parts.append(slots[layer])
        return torch.cat(parts, dim=0)

    def layers_of(self, chunk_index: int) -> list[Tensor]:
        """One cached chunk's K|V, per layer (the tensors held, not copies)."""
        slots = self._chunks[chunk_index]
        if any(kv is None for kv in slots):
            raise KeyError(f"chunk {chunk_index} is not cached in every layer")
        return list(slots)

    def has(self, chunk_index: int) -> bool:
        slots = self._chunks.get(chunk_index)
        return slots is not None and all(s is not None for s in slots)

    @property
    def chunk_indices(self) -> list[int]:
        return sorted(self._chunks)

    def drop_before(self, chunk_index: int) -> None:
        """Forget chunks older than `chunk_index` (no kv range can reach them any more)."""
        for index in [i for i in self._chunks if i < chunk_index]:
            del self._chunks[index]

    def share(self) -> KVCache:
        """A cache holding the same chunks' tensors (not copies): a clean chunk's K|V is never
        rewritten, so a fork point can keep them while this cache moves on."""
        other = KVCache(self.num_layers)
        other._chunks = {c: list(slots) for c, slots in self._chunks.items()}
        return other

    def clear(self) -> None:
        self._chunks.clear()

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for slots in self._chunks.values()
            for t in slots
            if t is not None
        )
