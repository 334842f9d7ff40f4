"""T5 v1.1 encoder (MAGI-1's text encoder, magi1-reference.md §6) in plain torch, fp32.

Written so that importing it costs nothing beyond torch: transformers' `T5EncoderModel` pulls
in torch._dynamo, torch.distributed.tensor and the generation utilities (~1.5 s per process).
The math and its op order follow transformers' T5EncoderModel with SDPA attention (5.24), so
the output is bit-identical to it in fp32 on the CPU (tests/model/test_text.py compares them):

* embedding lookup, no scaling;
* per block: pre-RMSNorm self-attention with the relative position bias of block 0 shared by
  every block (bidirectional buckets), no 1/sqrt(d) scaling, padded keys at the dtype's min;
  then pre-RMSNorm gated-GELU FFN `wo(gelu_tanh(wi_0 x) * wi_1 x)`; residual adds;
* final RMSNorm. T5's RMSNorm has no mean subtraction and no bias.

Module attributes are the checkpoint keys (`shared.weight`, `encoder.block.N.layer.0.
SelfAttention.q.weight`, ...), so loading is `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_FILE = "config.json"
# Weight files in the order transformers prefers them; an index json names the shards.
_WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
# A full encoder-decoder checkpoint (google/t5-v1_1-xxl) also holds these; the encoder skips them.
_DECODER_PREFIXES = ("decoder.", "lm_head.")
# The encoder's own copy of the tied input embedding; transformers reads it in place of
# `shared.weight` when a checkpoint holds both.
_ENCODER_EMBEDDING = "encoder.embed_tokens.weight"


@dataclass(frozen=True)
class T5Config:
    """The fields of a transformers T5 config.json that the encoder reads."""

    vocab_size: int
    d_model: int  # 4096 for t5-v1_1-xxl
    d_kv: int  # width of one head
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_json(cls, path: str | Path) -> T5Config:
        """Read a config.json; refuse what this encoder does not compute (anything other than a
        T5 v1.1 encoder with the gated tanh-GELU FFN)."""
        path = Path(path)
        raw = json.loads(path.read_text())
        if raw.get("model_type", "t5") != "t5":
            raise ValueError(f"{path}: model_type {raw['model_type']!r}; expected 't5'")
        # transformers derives the activation from feed_forward_proj alone ("gated-gelu" ->
        # gated gelu_new, the tanh GELU) and ignores a stored dense_act_fn; so do we.
        ffn = raw.get("feed_forward_proj", "relu")
        if ffn != "gated-gelu":
            raise ValueError(
                f"{path}: feed_forward_proj {ffn!r} is not supported; this encoder computes "
                "T5 v1.1 ('gated-gelu', as t5-v1_1-xxl), not the original T5 ('relu') or others"
            )
        if raw.get("is_decoder", False):
            raise ValueError(f"{path}: is_decoder is true; expected an encoder config")
        fields = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        missing = {"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"} - set(fields)
        if missing:
            raise ValueError(f"{path}: missing {sorted(missing)}")
        return cls(**fields)


@dataclass(frozen=True)
class T5Output:
    """What `T5Encoder.forward` returns, named as transformers names it."""

    last_hidden_state: Tensor  # (B, L, d_model) float32


class Linear(nn.Module):
    """A bias-free linear layer whose weight starts empty: every weight comes from the files,
    and a random init on `meta` would import torch._dynamo (~3 s) through torch._refs."""

    def __init__(self, d_in: int, d_out: int, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    """A lookup table that starts empty (see `Linear`)."""

    def __init__(self, rows: int, dim: int, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim, device=device, dtype=torch.float32))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def gelu_tanh(x: Tensor) -> Tensor:
    """transformers' `gelu_new`, in its op order (F.gelu(approximate='tanh') rounds otherwise)."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets: half for keys after the query, half before; in each half,
    exact buckets for |distance| < num_buckets / 4, then log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative > 0).to(torch.long) * num_buckets
    distance = torch.abs(relative)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (
        torch.log(distance.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, large)


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, device: torch.device) -> None:
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.q = Linear(cfg.d_model, inner, device)
        self.k = Linear(cfg.d_model, inner, device)
        self.v = Linear(cfg.d_model, inner, device)
        self.o = Linear(inner, cfg.d_model, device)
        if has_relative_bias:
            self.relative_attention_bias = Embedding(
                cfg.relative_attention_num_buckets, cfg.num_heads, device
            )
        self.cfg = cfg

    def position_bias(self, length: int) -> Tensor:
        """(1, H, L, L) bias added to the scores; only block 0 holds the table."""
        positions = torch.arange(length, dtype=torch.long, device=self.q.weight.device)
        relative = positions[None, :] - positions[:, None]  # (L, L): key - query
        buckets = relative_position_bucket(
            relative,
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, _ = x.shape
        heads = (B, L, -1, self.cfg.d_kv)
        # (B, L, H * d_kv) -> (B, H, L, d_kv)
        q = self.q(x).view(heads).transpose(1, 2)
        k = self.k(x).view(heads).transpose(1, 2)
        v = self.v(x).view(heads).transpose(1, 2)
        # T5 puts no 1/sqrt(d_kv) on the scores: it was trained without it
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, scale=1.0)
        # (B, H, L, d_kv) -> (B, L, H * d_kv)
        out = out.reshape(B, -1, L, self.cfg.d_kv).transpose(1, 2).contiguous()
        return self.o(out.reshape(B, L, -1).contiguous())


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, device: torch.device) -> None:
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, has_relative_bias, device)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, device)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class GatedGeluFFN(nn.Module):
    def __init__(self, cfg: T5Config, device: torch.device) -> None:
        super().__init__()
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, device)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, device)
        self.wo = Linear(cfg.d_ff, cfg.d_model, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(gelu_tanh(self.wi_0(x)) * self.wi_1(x))


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config, device: torch.device) -> None:
        super().__init__()
        self.DenseReluDense = GatedGeluFFN(cfg, device)  # the checkpoint's name, whatever the act
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, device)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, device: torch.device) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            [SelfAttentionLayer(cfg, has_relative_bias, device), FeedForwardLayer(cfg, device)]
        )

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


class Stack(nn.Module):
    def __init__(self, cfg: T5Config, device: torch.device) -> None:
        super().__init__()
        self.block = nn.ModuleList([Block(cfg, i == 0, device) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, device)


class T5Encoder(nn.Module):
    """The encoder half of T5 v1.1. Build with `load_t5_encoder`; `device="meta"` gives the
    shapes without memory."""

    def __init__(self, cfg: T5Config, device: str | torch.device) -> None:
        super().__init__()
        device = torch.device(device)
        self.config = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, device)
        self.encoder = Stack(cfg, device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> T5Output:
        """`input_ids` (B, L) int64; `attention_mask` (B, L), 1 = token, 0 = padding."""
        blocks = self.encoder.block
        # 1. token embedding: (B, L) -> (B, L, d_model)
        x = self.shared(input_ids)
        # 2. the additive attention bias every block shares: block 0's relative position bias
        #    (1, H, L, L), with padded keys at the dtype's min (B, H, L, L) where any padding
        bias = blocks[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.to(device=x.device).bool()[:, None, None, :]  # (B, 1, 1, L)
            bias = torch.where(keep, bias, torch.finfo(x.dtype).min)
        bias = bias.contiguous()
        # 3. blocks: pre-norm self-attention, then pre-norm gated-GELU FFN, each with a residual
        for block in blocks:
            x = block(x, bias)
        # 4. final norm
        return T5Output(last_hidden_state=self.encoder.final_layer_norm(x))


def _weight_files(folder: Path) -> list[Path]:
    """The files holding the weights: one file, or the shards an index json names."""
    for single, index in _WEIGHT_FILES:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    names = ", ".join(name for pair in _WEIGHT_FILES for name in pair)
    raise FileNotFoundError(f"{folder}: no T5 weights; expected one of {names}")


def _read_weights(path: Path) -> dict[str, Tensor]:
    """One file's tensors on the CPU, decoder keys left out."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if not k.startswith(_DECODER_PREFIXES)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a pre-zipfile torch.save cannot be mapped; read it whole
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith(_DECODER_PREFIXES)}


def load_t5_encoder(folder: str | Path, device: str | torch.device = "cpu") -> T5Encoder:
    """The encoder in `folder` (config.json plus model.safetensors or pytorch_model.bin, single
    or sharded with an index json), fp32 on `device`, in eval mode."""
    folder = Path(folder)
    device = torch.device(device)
    cfg = T5Config.from_json(folder / CONFIG_FILE)
    state: dict[str, Tensor] = {}
    for path in _weight_files(folder):
        state.update(_read_weights(path))
    embedding = state.pop(_ENCODER_EMBEDDING, None)
    if embedding is not None:
        state["shared.weight"] = embedding
    state = {k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}
    model = T5Encoder(cfg, device="meta")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the T5 weights do not fit config.json: {e}") from e
    return model.eval().requires_grad_(False)
