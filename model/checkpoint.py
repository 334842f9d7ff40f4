"""Checkpoint I/O in the official layouts (reference §3.15, §7.5).

The DiT is built on the meta device and the safetensors tensors are assigned to it, so loading
never holds two copies of the weights; the key check is strict and its error names what is
missing, unexpected or mis-shaped. Shards are read one at a time with plain reads into freshly
allocated tensors (no memory map: a mapped shard's pages would count on top of the weights).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from model.config import CheckpointError, MagiConfig  # noqa: F401  (CheckpointError: re-exported)
from model.dit import VideoDiT
from model.fp8 import quantize_linear

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def build_dit_meta(config: MagiConfig) -> VideoDiT:
    with torch.device("meta"):
        return VideoDiT(config)


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    want = expected_shapes(model)
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    wrong = [
        f"{k}: file {shapes[k]} vs model {want[k]}"
        for k in sorted(set(want) & set(shapes))
        if shapes[k] != want[k]
    ]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            more = " ..." if len(keys) > 8 else ""
            problems.append(f"{what} ({len(keys)}): {', '.join(keys[:8])}{more}")
    if wrong:
        problems.append(
            f"wrong shapes ({len(wrong)}): {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}"
        )
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def shard_map(weight_dir: Path) -> dict[str, list[str]]:
    """shard file -> keys, from the index (or the single-file layout)."""
    index = weight_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        shards: dict[str, list[str]] = defaultdict(list)
        for key, shard in weight_map.items():
            shards[shard].append(key)
        for shard in shards:
            if not (weight_dir / shard).exists():
                raise CheckpointError(
                    f"{weight_dir / shard}: shard listed in {INDEX_FILE} is missing"
                )
        return dict(shards)
    single = weight_dir / SINGLE_FILE
    if single.exists():
        return {SINGLE_FILE: list(read_header(single)[0])}
    raise CheckpointError(f"{weight_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The safetensors header (key -> dtype, shape, data_offsets) and where the data starts."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + length


def read_shapes(weight_dir: Path, shards: dict[str, list[str]]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for shard, keys in shards.items():
        header, _ = read_header(weight_dir / shard)
        for key in keys:
            if key not in header:
                raise CheckpointError(
                    f"{weight_dir / shard}: key {key} listed in the index is not in the shard"
                )
            shapes[key] = tuple(header[key]["shape"])
    return shapes


def read_tensors(path: Path, keys: list[str]) -> dict[str, Tensor]:
    """Read these tensors into new (aligned) CPU tensors with `readinto`."""
    header, start = read_header(path)
    out = {}
    with open(path, "rb", buffering=0) as f:
        for key in keys:
            meta = header[key]
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: {key} has unsupported dtype {meta['dtype']}")
            tensor = torch.empty(meta["shape"], dtype=SAFETENSORS_DTYPES[meta["dtype"]])
            begin, end = meta["data_offsets"]
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if end - begin != len(buffer):
                raise CheckpointError(
                    f"{path}: {key} holds {end - begin} bytes, expected {len(buffer)}"
                )
            f.seek(start + begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{path}: file ends inside {key} (truncated shard?)")
            out[key] = tensor
    return out


def dit_weight_dir(model_dir: str | Path, config: MagiConfig) -> Path:
    """`<load>/inference_weight[.fp8][.distill]` of a model folder; it must exist."""
    weight_dir = Path(model_dir) / config.runtime_config.load / config.weight_subdir
    if not weight_dir.is_dir():
        raise CheckpointError(
            f"{weight_dir}: DiT weight folder not found (expected {config.weight_subdir}/)"
        )
    return weight_dir


def load_dit(
    model_dir: str | Path, config: MagiConfig, device: str | torch.device = "cpu"
) -> VideoDiT:
    """Build on meta, assign the tensors shard by shard (the file's dtypes are kept, as the
    official `assign=True` does), then promote the fp32 modules (§3.12)."""
    weight_dir = dit_weight_dir(model_dir, config)
    model = build_dit_meta(config)
    shards = shard_map(weight_dir)
    check_state_dict(model, read_shapes(weight_dir, shards), str(weight_dir))
    for shard, keys in shards.items():
        part = {k: t.to(device) for k, t in read_tensors(weight_dir / shard, keys).items()}
        model.load_state_dict(part, strict=False, assign=True)
        del part
    model.requires_grad_(False)
    return model.promote_high_precision().eval()


def init_random_(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic random weights in key order: normal(std) for matrices, small normal for
    norms' stored (gamma - 1) and biases, the official default bands for RoPE."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dtype == torch.float8_e4m3fn:
                continue
            if name.endswith("rope.bands"):
                n = param.numel()
                values = 1.0 / (10000 ** (torch.arange(n, dtype=torch.float32) / n))
            elif param.dim() >= 2:
                values = torch.randn(param.shape, generator=gen) * std
            else:
                values = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(values.to(param.dtype))


def random_dit(config: MagiConfig, seed: int) -> VideoDiT:
    """A DiT with deterministic random weights; fp8 variants get quantised twins of the linears."""
    # the same architecture with dense linears (their weights are quantised afterwards)
    engine = dataclasses.replace(config.engine_config, fp8_quant=False)
    runtime = dataclasses.replace(config.runtime_config, cfg_number=1 if engine.distill else 3)
    unquantised = MagiConfig(config.model_config, runtime, engine)
    model = VideoDiT(unquantised)
    init_random_(model, seed)
    if config.engine_config.fp8_quant:
        _quantise_layers_(model)
    return model.eval()


def _quantise_layers_(model: VideoDiT) -> None:
    layers = model.videodit_blocks.layers
    for layer in list(layers)[1:-1]:
        qkv = layer.self_attention.linear_qkv
        for name in ("q", "qx", "k", "v"):
            setattr(qkv, name, quantize_linear(getattr(qkv, name), per_channel=False))
        layer.mlp.linear_fc1 = quantize_linear(layer.mlp.linear_fc1, per_channel=False)
        layer.mlp.linear_fc2 = quantize_linear(layer.mlp.linear_fc2, per_channel=True)
        sa = layer.self_attention
        sa.linear_proj = quantize_linear(sa.linear_proj, per_channel=True)


def save_dit(
    model: nn.Module,
    weight_dir: str | Path,
    max_shard_bytes: int = 2 << 30,
    num_shards: int | None = None,
) -> None:
    """Write `model.safetensors.index.json` + `model-0000i-of-0000n.safetensors`, keys sorted."""
    weight_dir = Path(weight_dir)
    weight_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in sorted(model.state_dict().items())}
    shards = _split(state, max_shard_bytes, num_shards)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(weight_dir / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (weight_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _split(
    state: dict[str, Tensor], max_bytes: int, num_shards: int | None
) -> list[dict[str, Tensor]]:
    """Consecutive keys per shard: by a byte budget, or into exactly `num_shards` even parts."""
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    total = sum(sizes.values())
    shards: list[dict[str, Tensor]] = [{}]
    done = size = 0
    for key, tensor in state.items():
        if num_shards:
            new_shard = len(shards) < num_shards and done >= total * len(shards) / num_shards
        else:
            new_shard = size + sizes[key] > max_bytes
        if shards[-1] and new_shard:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += sizes[key]
        done += sizes[key]
    return shards
