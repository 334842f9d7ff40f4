"""MAGI-1's diffusion transformer (`videodit_ardf`), for packed chunks of many sessions.

Module attributes are the official state-dict keys (reference §3.14), so `load_state_dict(strict=
True)` is the key check. One forward takes any number of chunks, grouped by the key sequence they
attend over (one session's cache plus its chunks in this forward, or a lone uncond chunk); each
chunk carries its own timestep, caption, adaLN row, RoPE placement and key range. With one group
laid out as the official sampler lays it out this is exactly `VideoDiTModel.forward`.

Sections of `forward` follow reference §3: 1 patch embed, 2 RoPE, 3 timestep, 4 caption and
condition, 5 layers, 6 final layer and unpatchify. Activations are sequence-first `(S, D)` (the
official batch axis of 1 is dropped), tokens in `(T, H, W)` row-major order per chunk.

There is one forward. Context parallelism is applied from outside through a `Seam` passed to it:
the points where the tokens are split after embedding, where Q|K|V go from the token split to
the head split and back around self-attention, where each layer's weights come from, and where
the output is gathered along the sequence. The base `Seam` is the identity (one device);
model/parallel.py's `UlyssesSeam` is the context-parallel one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import AttentionBackend, RangePlan, as_backend
from model.config import MagiConfig, ModelConfig
from model.fp8 import PerChannelFp8Linear, PerTensorFp8Linear
from model.kv_cache import KVCache

TIMESTEP_FREQ_DIM = 256  # sinusoid width of the timestep embedder
TIMESTEP_RESCALE = 1000  # t in [0, 1] is scaled by this inside the sinusoid
LINEAR_PROJ_BLOCKS = 8  # hard-coded "hn=8" of the linear_proj input permutation (§3.9)
ROPE_REFERENCE_AREA = 16 * 16  # spatial RoPE coordinates are rescaled to this many patches

# The precision map (§3.12): the modules the official `_high_precision_promoter` keeps in fp32,
# as `named_modules` patterns (fnmatch, `*` = a layer index). Everything else keeps the params
# dtype. The fp32 compute regions (linear_proj under fp32 autocast, the gated residual adds and
# post-norms, the final linear) are in the formulas themselves.
FP32_MODULES = (
    "x_embedder",
    "t_embedder",
    "y_embedder",
    "rope",
    "videodit_blocks.layers.*.self_attention.q_layernorm",
    "videodit_blocks.layers.*.self_attention.k_layernorm",
    "videodit_blocks.layers.*.self_attn_post_norm",
    "videodit_blocks.layers.*.mlp_post_norm",
    "videodit_blocks.final_layernorm",
    "final_linear",
)


@dataclass
class ChunkInput:
    """One chunk's queries in a packed forward."""

    latent: Tensor  # (C, T, H, W) fp32, C = 16 latent channels
    t: float  # flow time: 0 = noise, 1 = clean
    caption: Tensor  # (L, caption_channels): the valid (mask = 1) caption tokens, L may be 0
    caption_dropped: bool  # adaLN text row: null_caption_embedding[-1] if True else [-2]
    rope_frame: int  # latent-frame index of the chunk's first frame on the RoPE time axis
    rope_frames_total: int  # length of that time axis (official T_total; fp32 rescale needs it)
    k_range: tuple[int, int]  # token range into its group's key sequence
    step_size: float | None = None  # distill models: the shortcut step-size value (§3.3)
    cache_index: int | None = None  # write this chunk's K|V into the group's cache at this index


@dataclass
class ChunkGroup:
    """Chunks sharing one key sequence: `cache[cached_chunks] ++ K|V of these chunks`."""

    chunks: list[ChunkInput]
    cache: KVCache | None = None  # the session's cache (read and, per chunk, written)
    cached_chunks: list[int] = field(default_factory=list)  # cache entries prepended, in order


class LayerNorm1p(nn.Module):
    """The official `FusedLayerNorm` with zero-centred gamma: weight is stored as gamma - 1."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight + 1, self.bias, self.eps)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.compute_dtype = cfg.dtype
        dc = cfg.cond_dim
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, dc), nn.SiLU(), nn.Linear(dc, dc))

    def forward(self, t: Tensor) -> Tensor:
        """t (n,) -> (n, Dc). The order of fp32 operations is the official one (§3.3)."""
        half = TIMESTEP_FREQ_DIM // 2
        # computed on the host and moved, as the official code does (exp rounds per backend)
        steps = torch.arange(half, dtype=torch.float32, device="cpu")
        freqs = torch.exp(-math.log(10000) * steps / half)
        args = t.float()[:, None] * freqs[None].to(t.device) * TIMESTEP_RESCALE
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        # the sinusoid is rounded to the params dtype before the (fp32) MLP, as officially
        emb = emb.to(self.compute_dtype).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_x = int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio)
        self.y_proj_xattn = nn.Sequential(nn.Linear(cfg.caption_channels, d_x), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(cfg.caption_channels, cfg.cond_dim))
        self.null_caption_embedding = nn.Parameter(
            torch.empty(cfg.caption_max_length, cfg.caption_channels)
        )


class RotaryEmbedding(nn.Module):
    """Learned-band 3-D RoPE (`LearnableRotaryEmbeddingCat`, in_pixels=False)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.bands = nn.Parameter(torch.empty(cfg.rope_bands))

    def table(self, frames: range, frames_total: int, hp: int, wp: int) -> Tensor:
        """`[sin | cos]` of the angles of the tokens of `frames` -> (len(frames)*hp*wp, 6*bands).

        Coordinates: time = frame index, space centred; each axis is rescaled as
        `x / (f - 1) * (r - 1)` in fp32 (divide first) to the reference shape
        `[frames_total, hp / rho, wp / rho]`, rho = sqrt(hp * wp / 256) (reference §3.7)."""
        rho = math.sqrt((hp * wp) / ROPE_REFERENCE_AREA)
        sizes = [frames_total, hp, wp]
        refs = [frames_total, hp / rho, wp / rho]
        device = self.bands.device
        coords = [
            torch.arange(s, dtype=torch.int64, device=device).to(torch.float32) for s in sizes
        ]
        coords[1] = coords[1] - (hp - 1) / 2
        coords[2] = coords[2] - (wp - 1) / 2
        coords = [
            x if f == 1 else x / (f - 1) * (r - 1)
            for x, f, r in zip(coords, sizes, refs, strict=True)
        ]
        coords[0] = coords[0][frames.start : frames.stop]
        grid = torch.stack(torch.meshgrid(*coords, indexing="ij"), dim=-1)  # (T, H, W, 3)
        bands = self.bands.float().to(grid.device)
        pos = grid.unsqueeze(-1) * bands  # (T, H, W, 3, bands)
        n = pos.shape[0] * hp * wp
        return torch.cat([pos.sin().reshape(n, -1), pos.cos().reshape(n, -1)], dim=-1)


def apply_rotary(x: Tensor, table: Tensor) -> Tensor:
    """Non-interleaved rotation of the first 6*bands dims (pairs m, m + 3*bands); rest unchanged.
    x (S, H, hd) fp32, table (S, 6*bands)."""
    sin, cos = table.tensor_split(2, dim=-1)
    half = sin.shape[-1]
    sin, cos = sin[:, None, :], cos[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def _linear(
    cfg: ModelConfig, quantised: bool, per_channel: bool, d_in: int, d_out: int
) -> nn.Module:
    if not quantised:
        return nn.Linear(d_in, d_out, bias=False, dtype=cfg.dtype)
    klass = PerChannelFp8Linear if per_channel else PerTensorFp8Linear
    return klass(d_in, d_out, out_dtype=cfg.dtype)


class LinearQKV(nn.Module):
    """Shared pre-LayerNorm and the four token projections (`linear_qkv.*`)."""

    def __init__(self, cfg: ModelConfig, quantised: bool) -> None:
        super().__init__()
        d, q_size, kv_size = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.kv_channels,
            cfg.num_query_groups * cfg.kv_channels,
        )
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layernorm_epsilon, dtype=cfg.dtype)
        self.q = _linear(cfg, quantised, False, d, q_size)
        self.qx = _linear(cfg, quantised, False, d, q_size)
        self.k = _linear(cfg, quantised, False, d, kv_size)
        self.v = _linear(cfg, quantised, False, d, kv_size)


class AdaModulateLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        gates = int(cfg.hidden_size * cfg.cond_gating_ratio) * 2
        self.proj = nn.Sequential(nn.Linear(cfg.cond_dim, gates, dtype=cfg.dtype))

    def forward(self, c: Tensor) -> Tensor:
        """c (n, Dc) -> tanh-softcapped gates (n, 2D): [msa | mlp]."""
        g = self.proj(F.silu(c))
        return torch.tanh(g.float()).to(g.dtype)


class SelfAttention(nn.Module):
    """Parallel self- and cross-attention (`FullyParallelAttention`)."""

    def __init__(self, cfg: ModelConfig, quantised: bool) -> None:
        super().__init__()
        hd, eps, dt = cfg.kv_channels, cfg.layernorm_epsilon, cfg.dtype
        q_size = cfg.num_attention_heads * hd
        self.hd = hd
        self.linear_qkv = LinearQKV(cfg, quantised)
        d_x = int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio)
        self.linear_kv_xattn = nn.Linear(d_x, 2 * cfg.num_query_groups * hd, bias=False, dtype=dt)
        self.linear_proj = _linear(cfg, quantised, True, 2 * q_size, cfg.hidden_size)
        self.q_layernorm = LayerNorm1p(hd, eps, dt)
        self.k_layernorm = LayerNorm1p(hd, eps, dt)
        self.q_layernorm_xattn = LayerNorm1p(hd, eps, dt)
        self.k_layernorm_xattn = LayerNorm1p(hd, eps, dt)

    def qk(self, proj: nn.Module, norm: LayerNorm1p, a: Tensor, rope: Tensor) -> Tensor:
        """Project, QK-norm and rotate in fp32, back to the compute dtype. -> (S, heads, hd)"""
        x = proj(a)
        dtype = x.dtype
        x = norm(x.reshape(x.shape[0], -1, self.hd).float())
        return apply_rotary(x, rope).to(dtype)

    def cross_kv(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """text (Lt, D) -> K, V (Lt, G, hd). Weight rows are per group `[K_g ; V_g]` (§3.8)."""
        groups = self.linear_kv_xattn.weight.shape[0] // (2 * self.hd)
        kv = (text @ self.linear_kv_xattn.weight.t()).view(text.shape[0], groups, 2 * self.hd)
        k, v = kv.split(self.hd, dim=-1)
        return self.k_layernorm_xattn(k), v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quantised: bool) -> None:
        super().__init__()
        self.gated = cfg.gated_linear_unit
        f = cfg.ffn_hidden_size
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, dtype=cfg.dtype)
        self.linear_fc1 = _linear(
            cfg, quantised, False, cfg.hidden_size, 2 * f if self.gated else f
        )
        self.linear_fc2 = _linear(cfg, quantised, True, f, cfg.hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        x = self.linear_fc1(self.layer_norm(h))
        if self.gated:  # SwiGLU: silu(first half) * second half
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        else:
            x = F.gelu(x)  # exact erf GELU
        return self.linear_fc2(x)


def _gate_add(x: Tensor, residual: Tensor, gate: Tensor, post_norm: LayerNorm1p) -> Tensor:
    """`residual + LN1p(x * gate)` in fp32, back to the residual dtype (§3.6 steps 6, 8)."""
    out = post_norm(x.float() * gate.float()) + residual.float()
    return out.to(residual.dtype)


@dataclass
class _Packed:
    """Per-forward bookkeeping shared by all layers (built once in `run`). Self-attention sees
    the whole packed sequence (S tokens); the token-wise ops see this device's slice `[lo, hi)`
    of it (s tokens; the whole sequence unless a `Seam` splits it)."""

    groups: list[ChunkGroup]
    group_spans: list[tuple[int, int]]  # per group: its tokens in the packed sequence
    group_first_chunk: list[int]  # per group: index of its first chunk in `chunk_spans`
    chunk_spans: list[tuple[int, int]]  # per chunk: its tokens in the packed sequence
    text: Tensor  # (Lt, D) projected caption tokens of all chunks
    # this device's slice of the tokens
    rope: Tensor  # (s, 6*bands) fp32
    gate_rows: Tensor  # (s,) chunk index of every token
    local_chunk_spans: list[tuple[int, int]]  # pieces of chunks in the slice, slice coordinates
    local_text_spans: list[tuple[int, int]]  # the rows of `text` of each piece's chunk
    cross_plan: RangePlan  # cross-attention: local_chunk_spans over local_text_spans
    # self-attention's plan and the groups' key lengths it was built for (see `self_plan`)
    _self_plan: tuple[tuple[int, ...], RangePlan] | None = None

    def self_plan(
        self, key_lengths: tuple[int, ...], backend: AttentionBackend, device: torch.device
    ) -> RangePlan:
        """Self-attention's plan: every chunk's packed queries over its key range, shifted to
        its group's place among the groups' key sequences (`key_lengths`: cache ++ forward).
        The first layer builds it, when the cached keys' lengths are known; the others reuse it
        (their lengths are the same: the ranges are, in every layer)."""
        if self._self_plan is None or self._self_plan[0] != key_lengths:
            k_ranges, offset = [], 0
            for group, length in zip(self.groups, key_lengths, strict=True):
                k_ranges += [(offset + c.k_range[0], offset + c.k_range[1]) for c in group.chunks]
                offset += length
            self._self_plan = (key_lengths, backend.plan(self.chunk_spans, k_ranges, device))
        return self._self_plan[1]


class Seam:
    """Where context parallelism cuts into the forward, applied from outside (model/parallel.py).
    This base class is the identity: one device computes every token with every head, running
    the model's own layers. `VideoDiT.run` calls the hooks in this order: `token_range` once
    after the embeddings; per layer, `layers` hands out the layer, `to_heads` runs before
    self-attention and `to_tokens` after it; `gather_output` once after the final linear."""

    def token_range(self, length: int) -> tuple[int, int]:
        """The tokens `[lo, hi)` of the packed sequence (of `length`) this device computes."""
        return 0, length

    def layers(self, layers: nn.ModuleList) -> Iterable[TransformerLayer]:
        """The transformer layers to run, in order (a sharded runtime gathers their weights)."""
        return layers

    def to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (s, Hq, hd), k and v (s, G, hd) of this device's tokens -> the same for all S
        tokens and this device's heads. The k and v returned are what the KV cache holds."""
        return q, k, v

    def to_tokens(self, o: Tensor) -> Tensor:
        """Self-attention output (S, heads, hd) of this device's heads -> (s, Hq, hd)."""
        return o

    def gather_output(self, out: Tensor) -> Tensor:
        """The final linear's output (s, pT*pH*pW*C) of this device's tokens -> all S tokens."""
        return out


def _local_spans(
    spans: list[tuple[int, int]], lo: int, hi: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """The parts of packed spans inside `[lo, hi)`, shifted to the slice; and which spans."""
    out, which = [], []
    for i, (a, b) in enumerate(spans):
        a, b = max(a, lo), min(b, hi)
        if b > a:
            out.append((a - lo, b - lo))
            which.append(i)
    return out, which


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, quantised: bool) -> None:
        super().__init__()
        self.ada_modulate_layer = AdaModulateLayer(cfg)
        self.self_attention = SelfAttention(cfg, quantised)
        self.self_attn_post_norm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_epsilon, cfg.dtype)
        self.mlp = MLP(cfg, quantised)
        self.mlp_post_norm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_epsilon, cfg.dtype)

    def forward(
        self,
        h: Tensor,
        gates: Tensor,
        p: _Packed,
        layer: int,
        backend: AttentionBackend,
        seam: Seam,
    ) -> Tensor:
        """One layer (§3.6) over this device's tokens h (s, D); the seam moves self-attention's
        inputs to the head split and its output back (the identity on one device)."""
        # 2-3. pre-LayerNorm, Q/K/V of this device's tokens with all heads: q (s, Hq, hd)
        a, q, k, v = self.attention_inputs(h, p.rope)
        # 3. self-attention of this device's heads over the full key sequences: (S, h, hd)
        q, k, v = seam.to_heads(q, k, v)
        o_sa = seam.to_tokens(self.self_attend(q, k, v, p, layer, backend))  # (s, Hq, hd)
        # 4-8. cross-attention, projection, gated residuals, MLP: token-wise
        return self.finish(h, a, o_sa, gates[p.gate_rows], p, backend)

    def attention_inputs(self, h: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Shared pre-LayerNorm `a` (s, D) and the self-attention q (s, Hq, hd), k and v
        (s, G, hd) of this device's tokens; q and k QK-normed and rotated in fp32."""
        sa = self.self_attention
        a = sa.linear_qkv.layer_norm(h)
        q = sa.qk(sa.linear_qkv.q, sa.q_layernorm, a, rope)
        k = sa.qk(sa.linear_qkv.k, sa.k_layernorm, a, rope)
        v = sa.linear_qkv.v(a).reshape(a.shape[0], -1, sa.hd)
        return a, q, k, v

    def self_attend(
        self, q: Tensor, k: Tensor, v: Tensor, p: _Packed, layer: int, backend: AttentionBackend
    ) -> Tensor:
        """Block-causal attention of every chunk over its group's `cache ++ forward` keys.

        All groups' key sequences are packed one after another, each chunk's key range shifted
        to its group's place, so one backend call covers every chunk of every session. The
        chunks that ask for it have their K|V written to their group's cache first. q, k, v
        hold all S tokens (and, under a splitting seam, this device's heads only)."""
        hd = self.self_attention.hd
        kv_parts = []
        sizes = [s1 - s0 for s0, s1 in p.group_spans]  # the groups tile the packed sequence
        per_group = zip(p.groups, k.split(sizes), v.split(sizes), strict=True)
        for g, (group, k_g, v_g) in enumerate(per_group):
            s0 = p.group_spans[g][0]
            kv = torch.cat([k_g, v_g], dim=-1)  # (Sg, G, 2hd), the cache layout
            self._write_cache(group, kv, layer, p.chunk_spans[p.group_first_chunk[g] :], s0)
            if group.cached_chunks:
                kv = torch.cat(
                    [group.cache.read(layer, group.cached_chunks).to(kv.dtype), kv], dim=0
                )
            kv_parts.append(kv)
        plan = p.self_plan(tuple(kv.shape[0] for kv in kv_parts), backend, q.device)
        keys, values = torch.cat(kv_parts).split(hd, dim=-1)
        return backend.attend(q, keys, values, plan)

    def finish(
        self,
        h: Tensor,
        a: Tensor,
        o_sa: Tensor,
        gate_rows: Tensor,
        p: _Packed,
        backend: AttentionBackend,
    ) -> Tensor:
        """Cross-attention, the projection, the gated residuals and the MLP over this device's
        tokens h (s, D); `gate_rows` (s, 2D)."""
        sa = self.self_attention
        s = h.shape[0]
        # cross-attention: each chunk's queries (its piece in the slice) over its caption tokens
        qx = sa.q_layernorm_xattn(sa.linear_qkv.qx(a).reshape(s, -1, sa.hd))
        kx, vx = sa.cross_kv(p.text)
        o_xa = backend.attend(qx, kx, vx, p.cross_plan)
        return self.residuals(h, o_sa, o_xa, gate_rows)

    def residuals(self, h: Tensor, o_sa: Tensor, o_xa: Tensor, gate_rows: Tensor) -> Tensor:
        """The projection, the gated residuals and the MLP: token-wise, tensors in and out (so
        model/compile.py can compile it for any token count)."""
        sa = self.self_attention
        s = h.shape[0]
        # output projection over the [SA_0, XA_0, ..., SA_7, XA_7] interleave (§3.9)
        o = torch.cat([o_sa.reshape(s, -1), o_xa.reshape(s, -1)], dim=-1)
        o = o.reshape(s, 2, LINEAR_PROJ_BLOCKS, -1).transpose(1, 2).reshape(s, -1)
        if isinstance(sa.linear_proj, nn.Linear):
            o = F.linear(o.float(), sa.linear_proj.weight.float())  # fp32 autocast officially
        else:
            o = sa.linear_proj(o)
        gate_msa, gate_mlp = gate_rows.chunk(2, dim=-1)
        h = _gate_add(o, h, gate_msa, self.self_attn_post_norm)
        return _gate_add(self.mlp(h), h, gate_mlp, self.mlp_post_norm)

    @staticmethod
    def _write_cache(
        group: ChunkGroup, kv: Tensor, layer: int, spans: list[tuple[int, int]], s0: int
    ) -> None:
        """Store the K|V of the group's chunks that ask for it (`spans` start at the group's
        first chunk and run on past it; `kv` starts at packed token `s0`)."""
        for chunk, (c0, c1) in zip(group.chunks, spans, strict=False):
            if chunk.cache_index is None:
                continue
            if group.cache is None:
                raise ValueError("a chunk asks for a cache write but its group has no cache")
            group.cache.write(layer, chunk.cache_index, kv[c0 - s0 : c1 - s0].clone())


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, fp8_quant: bool) -> None:
        super().__init__()
        n = cfg.num_layers
        # fp8 checkpoints keep the first and the last layer in bf16 (§7.5)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, fp8_quant and 0 < i < n - 1) for i in range(n)
        )
        self.final_layernorm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_epsilon, cfg.dtype)


class FinalLinear(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        out = cfg.patch_size * cfg.patch_size * cfg.t_patch_size * cfg.out_channels
        self.linear = nn.Linear(cfg.hidden_size, out, bias=False)


class VideoDiT(nn.Module):
    """The whole DiT. Build it on the meta device and load weights with `model.checkpoint`."""

    def __init__(self, config: MagiConfig, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        cfg = config.model_config
        self.cfg = cfg
        self.distill = config.engine_config.distill
        self.backend = as_backend(backend)
        p, pt = cfg.patch_size, cfg.t_patch_size
        self.x_embedder = nn.Conv3d(
            cfg.in_channels, cfg.hidden_size, (pt, p, p), (pt, p, p), bias=False
        )
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = CaptionEmbedder(cfg)
        self.rope = RotaryEmbedding(cfg)
        self.videodit_blocks = TransformerBlock(cfg, config.engine_config.fp8_quant)
        self.final_linear = FinalLinear(cfg)

    def promote_high_precision(self) -> VideoDiT:
        """fp32 for the modules the official `_high_precision_promoter` promotes (§3.12):
        those named by `FP32_MODULES`."""
        for name, module in self.named_modules():
            if any(fnmatchcase(name, pattern) for pattern in FP32_MODULES):
                module.float()
        return self

    @torch.inference_mode()
    def forward(self, groups: list[ChunkGroup], seam: Seam | None = None) -> list[list[Tensor]]:
        """Velocities, per group per chunk, each (C_out, T, H, W) fp32. `seam`: how a context-
        parallel runtime splits the forward (model/parallel.py); None runs it all here."""
        return self.run(groups, seam)

    def run(self, groups: list[ChunkGroup], seam: Seam | None = None) -> list[list[Tensor]]:
        """The forward without inference mode, so training can take gradients through it."""
        if seam is None:
            seam = Seam()
        chunks = [c for g in groups for c in g.chunks]
        # 1. x_embedder: each chunk (C, T, H, W) -> tokens (T*Hp*Wp, D), in fp32
        tokens, grids = self._embed_latents(chunks)
        # 2. RoPE table per chunk, at the chunk's own time slot: (S, 6*bands)
        rope = self._rope_tables(chunks, grids)
        # 3 + 4. condition per chunk: t_emb (+ step-size emb) + adaLN text row: (n_chunks, Dc)
        condition = self._condition(chunks)
        text, text_spans = self._caption_tokens(chunks)
        # 5. transformer layers over this device's slice (s, D) of the packed sequence (S, D)
        lo, hi = seam.token_range(sum(t.shape[0] for t in tokens))
        packed = self._pack(groups, tokens, rope, text, text_spans, lo, hi)
        h = torch.cat(tokens)[lo:hi].to(self.cfg.dtype)
        layers = self.videodit_blocks.layers
        for i, layer in enumerate(seam.layers(layers)):
            # adaLN gates from the model's own layer i: a seam may hand out a gathered copy
            gates = layers[i].ada_modulate_layer(condition)  # (n_chunks, 2D)
            h = layer(h, gates, packed, i, self.backend, seam)
        h = self.videodit_blocks.final_layernorm(h.float())
        # 6. final linear (fp32): (s, pT*pH*pW*C), gathered to (S, ...), unpatchified per chunk
        out = F.linear(h.float(), self.final_linear.linear.weight.float())
        return self._velocities(seam.gather_output(out), grids, packed.chunk_spans, groups)

    def _velocities(
        self,
        out: Tensor,
        grids: list[tuple[int, int, int]],
        chunk_spans: list[tuple[int, int]],
        groups: list[ChunkGroup],
    ) -> list[list[Tensor]]:
        """The final linear's output (S, pT*pH*pW*C) unpatchified per chunk, grouped as given."""
        sizes = [s1 - s0 for s0, s1 in chunk_spans]  # the chunks tile the sequence
        velocities = [
            self._unpatchify(rows, grid) for rows, grid in zip(out.split(sizes), grids, strict=True)
        ]
        result, i = [], 0
        for g in groups:
            result.append(velocities[i : i + len(g.chunks)])
            i += len(g.chunks)
        return result

    def _embed_latents(
        self, chunks: list[ChunkInput]
    ) -> tuple[list[Tensor], list[tuple[int, int, int]]]:
        """Patch-embed every chunk in fp32; chunks of one shape share one Conv3d call."""
        cfg = self.cfg
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(chunks):
            by_shape.setdefault(tuple(c.latent.shape), []).append(i)
        tokens: list[Tensor] = [chunks[0].latent.new_empty(0)] * len(chunks)
        grids: list[tuple[int, int, int]] = [(0, 0, 0)] * len(chunks)
        for members in by_shape.values():
            x = torch.stack([chunks[i].latent.float() for i in members]) * cfg.x_rescale_factor
            if cfg.half_channel_vae:  # 24B: 16 latent channels duplicated to 32
                x = torch.cat([x, x], dim=1)
            x = self.x_embedder(x.to(self.x_embedder.weight.dtype)).float()  # (B, D, T, Hp, Wp)
            for j, i in enumerate(members):
                tokens[i] = x[j].flatten(1).transpose(0, 1)  # (T*Hp*Wp, D)
                grids[i] = tuple(x.shape[2:])
        return tokens, grids

    def _rope_tables(self, chunks: list[ChunkInput], grids: list[tuple[int, int, int]]) -> Tensor:
        """RoPE rows of every chunk; placements repeat across branches and sessions (every
        uncond chunk sits at frames 0..5), so each distinct one is computed once."""
        tables: dict[tuple[int, int, int, int, int], Tensor] = {}
        rows = []
        for c, (t, hp, wp) in zip(chunks, grids, strict=True):
            key = (c.rope_frame, t, c.rope_frames_total, hp, wp)
            if key not in tables:
                frames = range(c.rope_frame, c.rope_frame + t)
                tables[key] = self.rope.table(frames, c.rope_frames_total, hp, wp)
            rows.append(tables[key])
        return torch.cat(rows)

    def _condition(self, chunks: list[ChunkInput]) -> Tensor:
        device = self.y_embedder.null_caption_embedding.device
        t = torch.tensor([c.t for c in chunks], dtype=torch.float32, device=device)
        emb = self.t_embedder(t)
        if self.distill:
            if any(c.step_size is None for c in chunks):
                raise ValueError("a distill model needs step_size on every chunk")
            emb = emb + self.t_embedder(
                torch.tensor([c.step_size for c in chunks], dtype=torch.float32, device=device)
            )
        null = self.y_embedder.null_caption_embedding
        rows = torch.stack([null[-1] if c.caption_dropped else null[-2] for c in chunks])
        adaln = self.y_embedder.y_proj_adaln(rows.float())
        return (emb.float() + adaln.float()).to(self.cfg.dtype)

    def _caption_tokens(self, chunks: list[ChunkInput]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Every chunk's valid caption tokens through y_proj_xattn, packed: (Lt, D)."""
        captions = [c.caption.float() for c in chunks]
        spans, start = [], 0
        for cap in captions:
            spans.append((start, start + cap.shape[0]))
            start += cap.shape[0]
        text = self.y_embedder.y_proj_xattn(
            torch.cat(captions).to(self.y_embedder.null_caption_embedding.dtype)
        )
        return text.to(self.cfg.dtype), spans

    def _pack(self, groups, tokens, rope, text, text_spans, lo: int, hi: int) -> _Packed:
        """The layers' bookkeeping; token-wise parts for this device's tokens `[lo, hi)`."""
        chunk_spans, group_spans, first = [], [], []
        start, i = 0, 0
        for group in groups:
            if group.cached_chunks and group.cache is None:
                raise ValueError("a group lists cached chunks but has no cache")
            g0 = start
            first.append(i)
            for _ in group.chunks:
                chunk_spans.append((start, start + tokens[i].shape[0]))
                start += tokens[i].shape[0]
                i += 1
            group_spans.append((g0, start))
        device = tokens[0].device
        gate_rows = torch.repeat_interleave(
            torch.arange(len(tokens), device=device),
            torch.tensor([t.shape[0] for t in tokens], device=device),
        )
        local_chunks, which = _local_spans(chunk_spans, lo, hi)
        local_text = [text_spans[i] for i in which]
        return _Packed(
            groups,
            group_spans,
            first,
            chunk_spans,
            text,
            rope[lo:hi],
            gate_rows[lo:hi],
            local_chunks,
            local_text,
            self.backend.plan(local_chunks, local_text, text.device),
        )

    def _unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """(T*Hp*Wp, pT*pH*pW*C) -> (C, T*pT, Hp*pH, Wp*pW); channel fastest within a token."""
        cfg = self.cfg
        t, hp, wp = grid
        p, pt = cfg.patch_size, cfg.t_patch_size
        x = x.reshape(t, hp, wp, pt, p, p, -1).permute(6, 0, 3, 1, 4, 2, 5)
        x = x.reshape(-1, t * pt, hp * p, wp * p)
        if cfg.half_channel_vae:
            x = x[:16]
        return x / cfg.x_rescale_factor
