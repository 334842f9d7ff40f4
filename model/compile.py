"""`torch.compile` of the DiT's token-wise parts, applied from outside (as model/parallel.py is).

A forward packs a different set of chunks every step: attention takes Python lists of ranges
(`RangePlan`), and the groups and caches are Python objects, so a compiled layer would guard on
them and recompile every step. Only the pieces whose inputs are tensors alone are compiled, with
symbolic token counts (`dynamic=True`), so one graph serves every packing:

- `TransformerLayer.attention_inputs`: pre-LayerNorm, Q/K/V projections, QK-norm and RoPE;
- `TransformerLayer.residuals`: the output projection, the gated residuals and the MLP;
- `SelfAttention.cross_kv`: cross-attention's K/V projection of the caption tokens.

Attention, the cache writes and the packing stay eager. `fullgraph=True` makes a graph break an
error at the first forward instead of a silent slowdown. Every layer runs the same code with
parameters of the same shapes, so the layers share the compiled graphs (torch inlines modules
and passes their parameters as graph inputs): a model compiles each piece once per layer kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from model.dit import TransformerLayer, VideoDiT
from model.sharding import ShardedDiT

COMPILE_MODES = ("off", "on")  # the --compile values
# (owner, method) pairs compiled per layer, as attribute paths from the layer
_PIECES = (("", "attention_inputs"), ("", "residuals"), ("self_attention", "cross_kv"))


def compile_dit(dit: VideoDiT | ShardedDiT, mode: str, backend: str = "inductor") -> None:
    """Replace the token-wise pieces of every layer `dit` runs with compiled versions (in place).
    `mode` "off" leaves the model as it is and does not import the compiler; "on" compiles with
    `backend` (inductor's default mode; tests pass "aot_eager"). Compilation itself happens on
    the first forward. Calling it again on a compiled model changes nothing."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile {mode!r}: use {' or '.join(COMPILE_MODES)}")
    if mode == "off":
        return
    for layer in _running_layers(dit):
        for owner_path, name in _PIECES:
            owner = layer.get_submodule(owner_path)
            if name in vars(owner):  # already an instance attribute: compiled before
                continue
            # an instance attribute shadows the method, so the layer's own calls take it
            setattr(owner, name, _compiled(getattr(owner, name), backend))


@contextmanager
def eager(dit: VideoDiT | ShardedDiT) -> Iterator[None]:
    """Within the block a compiled model runs its eager pieces; after it, the compiled ones
    again (the same wrappers, so nothing recompiles): an A/B of one model (bench/gpu_check.py)."""
    saved = []
    for layer in _running_layers(dit):
        for owner_path, name in _PIECES:
            owner = layer.get_submodule(owner_path)
            if name in vars(owner):
                saved.append((owner, name, vars(owner).pop(name)))
    try:
        yield
    finally:
        for owner, name, compiled in saved:
            setattr(owner, name, compiled)


def _running_layers(dit: VideoDiT | ShardedDiT) -> list[TransformerLayer]:
    """The layer objects the forward calls: a `ShardedDiT` runs its gathered scratch layers
    (its model's own layers hold meta parameters), a `VideoDiT` its own."""
    if isinstance(dit, ShardedDiT):
        return dit.scratch_layers()
    return list(dit.videodit_blocks.layers)


def _compiled(method: Callable, backend: str) -> Callable:
    # dynamic=True: the token count (and the caption length) changes from step to step
    return torch.compile(method, dynamic=True, fullgraph=True, backend=backend)


def is_compiled(layer: nn.Module) -> bool:
    """Whether `compile_dit` replaced this layer's pieces (for tests and the GPU check)."""
    return all(name in vars(layer.get_submodule(path)) for path, name in _PIECES)
