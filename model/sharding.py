"""Weight sharding of the DiT's transformer layers over N ranks (FSDP / ZeRO-3 style), on top of
the Ulysses context parallelism of model/parallel.py (issue 6).

Sharded: every transformer layer's parameters except its `ada_modulate_layer` (all that the
layer's forward uses once its gates are computed). Replicated, loaded in full on every rank: the
embeddings, timestep / caption projections, RoPE bands, the per-layer adaLN projections (small:
`Dc x 2D` per layer), the final LayerNorm and linear.

Layout: per layer and per runtime dtype, the layer's sharded parameters (state-dict order) are
flattened one after another into one flat vector of `L` elements, padded to `Lp = ceil(L / N) N`;
rank r owns the contiguous elements `[r Lp/N, (r+1) Lp/N)`. A bf16 model has two flat vectors
per layer (bf16 weights, the fp32-promoted QK / post norms), an fp8 layer three (e4m3 weights,
fp32 scales and promoted norms, bf16 norms and cross-attention KV).

Loading (`load_dit_shard`) reads from the safetensors shards only the byte ranges of each tensor
that fall into the rank's slices, with `readinto` straight into the slice (converted first where
the runtime dtype differs from the file's, i.e. the fp32-promoted norms); no rank ever holds a
whole layer stack. Forward (`ShardedDiT.gathered_layers`, which `parallel.UlyssesSeam.layers`
hands to the model's one layer loop): before layer i runs, its flat vectors are all-gathered (one
`all_gather_single` per dtype) into a scratch `TransformerLayer` whose parameters are views into
the gathered buffers; two scratch layers per layer kind alternate, so the gather of layer i+1
runs (async) while layer i computes.
The gathered values are exactly the file's, so the result is bit-identical to the unsharded
context-parallel forward.

Memory per rank: replicated + sharded / N (+ padding < N elements per flat vector) + 2 gathered
layers per layer kind (scratch).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.checkpoint import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    build_dit_meta,
    check_state_dict,
    dit_weight_dir,
    load_dit,
    read_header,
    shard_map,
)
from model.config import MagiConfig
from model.dit import TransformerLayer, VideoDiT

LAYER_PREFIX = "videodit_blocks.layers."
REPLICATED_IN_LAYER = ("ada_modulate_layer.",)  # per-layer parts every rank holds in full


def is_sharded_key(key: str) -> bool:
    """Whether a state-dict key is split over the ranks (a transformer layer's, but not adaLN)."""
    if not key.startswith(LAYER_PREFIX):
        return False
    rest = key[len(LAYER_PREFIX) :].split(".", 1)[1]
    return not rest.startswith(REPLICATED_IN_LAYER)


@dataclass(frozen=True)
class FlatSpec:
    """One (layer, dtype) flat vector: its parameters (names inside the layer) and their place."""

    dtype: torch.dtype
    names: tuple[str, ...]  # inside the layer, e.g. "mlp.linear_fc1.weight"
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # element offset of each parameter in the flat vector
    numel: int  # L, before padding
    world_size: int

    @property
    def padded(self) -> int:
        return -(-self.numel // self.world_size) * self.world_size

    @property
    def shard(self) -> int:
        """Elements each rank holds."""
        return self.padded // self.world_size

    def rank_range(self, rank: int) -> tuple[int, int]:
        return rank * self.shard, (rank + 1) * self.shard


@dataclass(frozen=True)
class LayerLayout:
    specs: tuple[FlatSpec, ...]  # one per dtype, in the order the dtypes first occur

    @property
    def signature(self) -> tuple:
        """Layers with equal signatures can share a scratch layer (fp8: first and last differ)."""
        return tuple((s.dtype, s.names, s.shapes) for s in self.specs)


def layer_layout(layer: nn.Module, world_size: int) -> LayerLayout:
    """The flat layout of one layer's sharded parameters (their dtypes as the model holds them,
    i.e. after `promote_high_precision`)."""
    by_dtype: dict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = {}
    for name, param in layer.named_parameters():
        if name.startswith(REPLICATED_IN_LAYER):
            continue
        by_dtype.setdefault(param.dtype, []).append((name, tuple(param.shape)))
    specs = []
    for dtype, entries in by_dtype.items():
        offsets, total = [], 0
        for _, shape in entries:
            offsets.append(total)
            total += _numel(shape)
        specs.append(
            FlatSpec(
                dtype=dtype,
                names=tuple(n for n, _ in entries),
                shapes=tuple(s for _, s in entries),
                offsets=tuple(offsets),
                numel=total,
                world_size=world_size,
            )
        )
    return LayerLayout(tuple(specs))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class ParamBytes:
    """Bytes of parameters one rank holds."""

    sharded: int  # this rank's slices of the layers' flat vectors (padding included)
    replicated: int  # embeddings, condition, adaLN projections, final layer: every rank
    scratch: int  # the gathered full-layer buffers the forward reuses
    read_from_disk: int = 0  # bytes `load_dit_shard` read from the safetensors files

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + self.scratch


class _Scratch:
    """A full `TransformerLayer` whose sharded parameters are views into flat gather buffers."""

    def __init__(self, template: TransformerLayer, layout: LayerLayout, device) -> None:
        # meta parameters of the right dtypes and structure; the adaLN projection is shared
        ada = template.ada_modulate_layer
        self.layer = copy.deepcopy(template, memo={id(ada): ada})
        self.buffers = [torch.empty(s.padded, dtype=s.dtype, device=device) for s in layout.specs]
        for spec, buf in zip(layout.specs, self.buffers, strict=True):
            for name, shape, off in zip(spec.names, spec.shapes, spec.offsets, strict=True):
                module_name, _, pname = name.rpartition(".")
                module = self.layer.get_submodule(module_name)
                view = buf[off : off + _numel(shape)].view(shape)
                module._parameters[pname] = nn.Parameter(view, requires_grad=False)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


def _gather(out: Tensor, local: Tensor, group, async_op: bool):
    """All-gather of equal slices into one flat tensor; dtypes gloo lacks travel as bytes."""
    if out.dtype in (torch.float8_e4m3fn, torch.bool):
        out, local = out.view(torch.uint8), local.view(torch.uint8)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, local, group=group, async_op=async_op)


@dataclass
class ShardedDiT:
    """This rank's part of a DiT: `dit` holds the replicated parameters (its layers' sharded
    parameters stay on the meta device), `shards[i]` this rank's slice of each flat vector of
    layer i. Pass it to `parallel.ulysses_forward` in place of a `VideoDiT`."""

    dit: VideoDiT
    rank: int
    world_size: int
    layouts: list[LayerLayout]
    shards: list[list[Tensor]]  # per layer, per FlatSpec: (shard,) elements
    bytes_read: int = 0
    _scratch: dict[tuple, list[_Scratch]] = field(default_factory=dict, repr=False)

    def scratch_layers(self) -> list[TransformerLayer]:
        """The gathered full layers the forward runs (two per layer kind)."""
        return [s.layer for pair in self._scratch.values() for s in pair]

    def __post_init__(self) -> None:
        # two scratch layers per layer kind, allocated up front (outside inference mode)
        device = self.shards[0][0].device if self.shards and self.shards[0] else "cpu"
        for i, layout in enumerate(self.layouts):
            if layout.signature not in self._scratch:
                template = self.dit.videodit_blocks.layers[i]
                self._scratch[layout.signature] = [
                    _Scratch(template, layout, device) for _ in range(2)
                ]

    @property
    def cfg(self):
        return self.dit.cfg

    def param_bytes(self) -> ParamBytes:
        sharded = sum(t.numel() * t.element_size() for layer in self.shards for t in layer)
        replicated = sum(
            p.numel() * p.element_size() for p in self.dit.parameters() if not p.is_meta
        )
        scratch = sum(s.nbytes for pair in self._scratch.values() for s in pair)
        return ParamBytes(sharded, replicated, scratch, self.bytes_read)

    def gathered_layers(self, group: dist.ProcessGroup, stats=None) -> Iterator[TransformerLayer]:
        """Yield full layer i (a scratch layer holding the all-gathered weights) for i = 0..L-1;
        the gather of layer i+1 is in flight while the caller runs layer i. `stats` (a
        `parallel.CommStats`) gets the bytes this rank sends: its slices to N - 1 ranks."""
        if dist.get_world_size(group) != self.world_size:
            raise ValueError(
                f"weights were sharded for {self.world_size} ranks, the group has "
                f"{dist.get_world_size(group)}"
            )
        n = len(self.layouts)

        def start(i: int) -> tuple[_Scratch, list]:
            scratch = self._scratch[self.layouts[i].signature][i % 2]
            handles = []
            for buf, local in zip(scratch.buffers, self.shards[i], strict=True):
                handles.append(_gather(buf, local, group, async_op=True))
                if stats is not None:
                    stats.weight_all_gather += (
                        local.numel() * local.element_size() * (self.world_size - 1)
                    )
            return scratch, handles

        pending = start(0)
        for i in range(n):
            scratch, handles = pending
            for h in handles:
                h.wait()
            if i + 1 < n:
                pending = start(i + 1)  # the other scratch of its kind: layer i's is in use
            yield scratch.layer


def _target_dtypes(model: VideoDiT, headers: dict[str, dict]) -> dict[str, torch.dtype]:
    """The dtype every parameter has after `load_dit` (file dtype, then the fp32 promotion),
    found by loading meta tensors of the file dtypes into the meta model and promoting it."""
    meta = {
        k: torch.empty(h["shape"], dtype=SAFETENSORS_DTYPES[h["dtype"]], device="meta")
        for k, h in headers.items()
    }
    model.load_state_dict(meta, strict=True, assign=True)
    model.promote_high_precision()
    return {k: v.dtype for k, v in model.state_dict().items()}


def _headers(weight_dir: Path, shards: dict[str, list[str]]) -> dict[str, dict]:
    """key -> its header entry, plus `path` and `start` (where the shard's data begins)."""
    out = {}
    for shard, keys in shards.items():
        path = weight_dir / shard
        header, start = read_header(path)
        for key in keys:
            if key not in header:
                raise CheckpointError(f"{path}: key {key} listed in the index is not in the shard")
            meta = dict(header[key])
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: {key} has unsupported dtype {meta['dtype']}")
            begin, end = meta["data_offsets"]
            size = _numel(tuple(meta["shape"])) * SAFETENSORS_DTYPES[meta["dtype"]].itemsize
            if end - begin != size:
                raise CheckpointError(f"{path}: {key} holds {end - begin} bytes, expected {size}")
            meta.update(path=path, start=start)
            out[key] = meta
    return out


class _Reader:
    """Reads element ranges of tensors from safetensors files, counting the bytes read."""

    def __init__(self) -> None:
        self.files: dict[Path, object] = {}
        self.bytes_read = 0

    def read(self, key: str, meta: dict, lo: int, hi: int, out: Tensor) -> None:
        """Elements `[lo, hi)` of the flattened tensor `key` into `out` (hi - lo elements)."""
        file_dtype = SAFETENSORS_DTYPES[meta["dtype"]]
        target = out if out.dtype == file_dtype else torch.empty(hi - lo, dtype=file_dtype)
        buffer = memoryview(target.view(torch.uint8).numpy())
        path = meta["path"]
        if path not in self.files:
            self.files[path] = open(path, "rb", buffering=0)  # noqa: SIM115
        f = self.files[path]
        f.seek(meta["start"] + meta["data_offsets"][0] + lo * file_dtype.itemsize)
        if f.readinto(buffer) != len(buffer):
            raise CheckpointError(f"{path}: file ends inside {key} (truncated shard?)")
        self.bytes_read += len(buffer)
        if target is not out:
            out.copy_(target)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def load_dit_shard(
    model_dir: str | Path,
    config: MagiConfig,
    rank: int,
    world_size: int,
    device: str | torch.device = "cpu",
) -> VideoDiT | ShardedDiT:
    """This rank's part of the DiT in `model_dir` (the folder `load_dit` takes): the replicated
    parameters in full and its slice of every layer's flat vectors, read from the files by byte
    range. The key / shape check is as strict as `load_dit`'s. World size 1 is `load_dit`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if world_size == 1:
        return load_dit(model_dir, config, device=device)
    weight_dir = dit_weight_dir(model_dir, config)
    model = build_dit_meta(config)
    shards = shard_map(weight_dir)
    headers = _headers(weight_dir, shards)
    check_state_dict(model, {k: tuple(h["shape"]) for k, h in headers.items()}, str(weight_dir))
    dtypes = _target_dtypes(model, headers)  # model: meta, promoted dtypes
    reader = _Reader()
    try:
        # replicated tensors, in full
        replicated = {}
        for key, meta in headers.items():
            if is_sharded_key(key):
                continue
            t = torch.empty(_numel(tuple(meta["shape"])), dtype=dtypes[key])
            reader.read(key, meta, 0, t.numel(), t)
            replicated[key] = t.view(meta["shape"]).to(device)
        model.load_state_dict(replicated, strict=False, assign=True)
        del replicated
        # this rank's slice of every layer's flat vectors
        layers = model.videodit_blocks.layers
        layouts, local = [], []
        for i, layer in enumerate(layers):
            layout = layer_layout(layer, world_size)
            parts = []
            for spec in layout.specs:
                lo, hi = spec.rank_range(rank)
                buf = torch.zeros(spec.shard, dtype=spec.dtype)
                for name, shape, off in zip(spec.names, spec.shapes, spec.offsets, strict=True):
                    a, b = max(lo, off), min(hi, off + _numel(shape))
                    if b > a:
                        key = f"{LAYER_PREFIX}{i}.{name}"
                        reader.read(key, headers[key], a - off, b - off, buf[a - lo : b - lo])
                parts.append(buf.to(device))
            layouts.append(layout)
            local.append(parts)
    finally:
        reader.close()
    model.requires_grad_(False)
    return ShardedDiT(model.eval(), rank, world_size, layouts, local, reader.bytes_read)


def sharded_bytes_total(config: MagiConfig) -> tuple[int, int]:
    """(bytes of all sharded parameters, bytes of the replicated ones) of a loaded model of this
    config with the runtime dtypes (fp32 promotion included), without padding."""
    model = build_dit_meta(config).promote_high_precision()
    sharded = replicated = 0
    for key, t in model.state_dict().items():
        size = t.numel() * t.element_size()
        if is_sharded_key(key):
            sharded += size
        else:
            replicated += size
    return sharded, replicated
