"""MAGI-1 transformer VAE (ViTVAE) and the pipeline's tiled encode / decode (reference §5).

Module attributes are the official checkpoint keys (`encoder.blocks.0.attn.qkv.weight`, ...), so
`load_state_dict(strict=True)` is the whole compatibility check. The head count and the
position-embedding base grid change the outputs but not the weight shapes, so they always come
from the checkpoint's own `config.json` (§5.1, §11 item 17); nothing here hard-codes them.

Precision: the official pipeline runs the VAE with bf16 weights (`load_vae(..., dtype=bf16)`);
fp32 reproduces the official code's fp32 outputs (shared/conformance/vae-tiny).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SCALE_FACTOR = 0.18215  # DiT latent = posterior mean x this (runtime_config.scale_factor)
DEFAULT_FPS = 24  # runtime_config.fps; the temporal tile is fps // 2 frames
LN_EPS = 1e-5  # every LayerNorm and the per-head q/k/v norm (the diffusers port's 1e-6 is wrong)
IMAGE_REPEAT = 4  # a single frame is repeated this often before encoding (fixed in the official)


@dataclass(frozen=True)
class VAEConfig:
    """The official `config.json` -> `ddconfig`. Defaults are the official constructor's, which the
    official loader uses for any key a config.json omits (real checkpoints spell out every key)."""

    embed_dim: int = 768  # transformer width D, encoder and decoder alike
    depth: int = 12  # blocks in the encoder, and again in the decoder
    num_heads: int = 12  # attention heads; the q/k/v norm runs over embed_dim / num_heads dims
    mlp_ratio: float = 4.0  # MLP hidden width = int(embed_dim * mlp_ratio)
    patch_size: int = 8  # spatial patch in pixels = spatial compression
    patch_length: int = 4  # temporal patch in frames = temporal compression
    video_size: int = 256  # pixels per side of the position-embedding base grid
    video_length: int = 16  # frames of the position-embedding base grid
    z_chans: int = 4  # latent channels
    qkv_bias: bool = False  # bias on the fused qkv Linear
    with_cls_token: bool = True  # learned token prepended to the sequence, dropped at the end
    ln_in_attn: bool = False  # per-head q/k/v norm in attention instead of a pre-norm (norm1)
    conv_last_layer: bool = True  # decoder ends in Conv3d(k=3); the official decoder needs True
    use_final_proj: bool = False  # decoder Linear + LayerNorm to 4 channels/voxel before unpatch
    use_rope: bool = False  # 3-D RoPE in attention; not implemented here, so refused
    double_z: bool = True  # encoder emits mean and logvar (2 * z_chans channels)
    in_chans: int = 3  # channels of the input video
    norm_code: bool = False  # encoder output L2-normalised over channels

    def __post_init__(self) -> None:
        for name in (
            "embed_dim",
            "depth",
            "num_heads",
            "patch_size",
            "patch_length",
            "z_chans",
            "in_chans",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"VAE {name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"VAE embed_dim ({self.embed_dim}) must be a multiple of num_heads "
                f"({self.num_heads}): each head gets embed_dim / num_heads channels"
            )
        if self.mlp_hidden < 1:
            raise ValueError(
                f"VAE mlp_ratio {self.mlp_ratio} gives an empty MLP for embed_dim {self.embed_dim}"
            )
        if self.video_size < self.patch_size or self.video_length < self.patch_length:
            raise ValueError(
                f"VAE base grid is empty: video_size {self.video_size} / patch_size "
                f"{self.patch_size}, video_length {self.video_length} / patch_length "
                f"{self.patch_length} must each be >= 1"
            )
        if not self.use_final_proj and self.embed_dim % self.voxel:
            raise ValueError(
                f"VAE embed_dim ({self.embed_dim}) must be a multiple of patch_length "
                f"x patch_size^2 ({self.voxel}): the decoder splits each token into "
                "one patch of pixels"
            )
        if not self.conv_last_layer:
            raise ValueError(
                "VAE conv_last_layer must be true: the official decoder only has a "
                "Conv3d last layer"
            )
        if self.use_rope:
            raise ValueError("VAE use_rope=true is not supported (no RoPE VAE is implemented)")
        if not self.double_z:
            raise ValueError(
                "VAE double_z must be true: the posterior mean is the first half of "
                "the encoder's output channels"
            )

    @property
    def base_grid(self) -> tuple[int, int, int]:
        """Latent (T, H, W) grid the learned position embeddings were stored for."""
        side = self.video_size // self.patch_size
        return (self.video_length // self.patch_length, side, side)

    @property
    def voxel(self) -> int:
        """Pixels (x frames) covered by one latent voxel."""
        return self.patch_length * self.patch_size**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def unpatch_channels(self) -> int:
        """Channels per pixel after unpatchify, the input of the decoder's last Conv3d."""
        return 4 if self.use_final_proj else self.embed_dim // self.voxel

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Small and fast for tests. Keeps MAGI-1's compression (patch 4x8x8, 16 channels), so tile
        geometry and frame counts are the real ones, and a base grid (2, 4, 4) smaller than a
        chunk's, so the position-embedding resize runs."""
        return cls(
            embed_dim=256,
            depth=1,
            num_heads=4,
            mlp_ratio=2.0,
            patch_size=8,
            patch_length=4,
            video_size=32,
            video_length=8,
            z_chans=16,
            qkv_bias=True,
            with_cls_token=True,
            ln_in_attn=True,
        )

    @classmethod
    def from_ddconfig(cls, ddconfig: dict[str, Any], source: str = "ddconfig") -> VAEConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(ddconfig) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown ddconfig keys {unknown}; known keys: {known}")
        return cls(**ddconfig)

    def to_ddconfig(self) -> dict[str, Any]:
        return dict(sorted(dataclasses.asdict(self).items()))

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        """Read the official VAE `config.json` (`{"_class_name": "ViTVAE", "ddconfig": {...}}`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"VAE config not found: {path} (a VAE folder holds "
                f"{CONFIG_FILE} and {WEIGHTS_FILE})"
            )
        raw = json.loads(path.read_text())
        if raw.get("_class_name") != "ViTVAE":
            got = raw.get("_class_name")
            raise ValueError(f"{path}: _class_name must be 'ViTVAE', got {got!r}")
        if raw.get("model_type", "vit") != "vit":
            raise ValueError(
                f"{path}: only model_type 'vit' exists in MAGI-1, got {raw['model_type']!r}"
            )
        if not isinstance(raw.get("ddconfig"), dict):
            raise ValueError(f"{path}: missing the 'ddconfig' object")
        return cls.from_ddconfig(raw["ddconfig"], source=str(path))

    def to_json(self, path: str | Path) -> None:
        doc = {
            "_class_name": "ViTVAE",
            "_diffusers_version": "0.29.2",
            "ddconfig": self.to_ddconfig(),
            "model_type": "vit",
        }
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Modules (attribute names = official keys)
# ------------------------------------------------------------------------------------------------


def head_norm(x: Tensor, eps: float = LN_EPS) -> Tensor:
    """Parameter-free norm over the last dim: (x - mean) / (biased std + eps). The official adds
    eps to the std, not to the variance, which a stock LayerNorm would do."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, correction=0)
    return (x - mean) / (std + eps)


class Attention(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.normalize_qkv = config.ln_in_attn
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        # (B, S, D) -> (B, S, 3, heads, hd); the norm covers q, k and v alike
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, D // self.num_heads)
        if self.normalize_qkv:
            qkv = head_norm(qkv)
        # (B, S, 3, heads, hd) -> 3 x (B, heads, S, hd); bidirectional, scale 1/sqrt(hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, S, hd) -> (B, S, D)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class Mlp(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(config.mlp_hidden, config.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        # With ln_in_attn the per-head q/k/v norm replaces the pre-attention LayerNorm, so the
        # checkpoint has no norm1 keys.
        d = config.embed_dim
        self.norm1 = nn.Identity() if config.ln_in_attn else nn.LayerNorm(d, eps=LN_EPS)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        kernel = (config.patch_length, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_chans, config.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _cls_count(config: VAEConfig) -> int:
    return 1 if config.with_cls_token else 0


def _learned_tokens(config: VAEConfig) -> tuple[nn.Parameter | None, nn.Parameter]:
    """(cls_token, pos_embed) with the official shapes; pos_embed covers cls + the base grid."""
    d = config.embed_dim
    cls = nn.Parameter(torch.zeros(1, 1, d)) if config.with_cls_token else None
    rows = _cls_count(config) + math.prod(config.base_grid)
    return cls, nn.Parameter(torch.zeros(1, rows, d))


def resize_pos_embed(
    pos_embed: Tensor, n_cls: int, base: tuple[int, int, int], grid: tuple[int, int, int]
) -> Tensor:
    """Position embeddings for a latent grid: the stored base-grid rows resized trilinearly
    (align_corners=False) to `grid`; the cls rows are kept as they are."""
    if grid == base:
        return pos_embed
    # (1, n_cls + lT0*lH0*lW0, D) -> (1, D, lT0, lH0, lW0)
    volume = pos_embed[:, n_cls:].reshape(1, *base, -1).permute(0, 4, 1, 2, 3)
    volume = F.interpolate(volume, size=grid, mode="trilinear", align_corners=False)
    # (1, D, lT, lH, lW) -> (1, lT*lH*lW, D)
    rows = volume.permute(0, 2, 3, 4, 1).reshape(1, math.prod(grid), -1)
    return torch.cat([pos_embed[:, :n_cls], rows], dim=1)


def _embed_tokens(
    x: Tensor,
    cls_token: Tensor | None,
    pos_embed: Tensor,
    config: VAEConfig,
    grid: tuple[int, int, int],
) -> Tensor:
    """(B, S, D) voxel tokens -> (B, n_cls + S, D) with cls prepended and positions added."""
    if cls_token is not None:
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return x + resize_pos_embed(pos_embed, _cls_count(config), config.base_grid, grid)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        cls, pos = _learned_tokens(config)
        self.register_parameter("cls_token", cls)
        self.pos_embed = pos
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim, eps=LN_EPS)
        self.last_layer = nn.Linear(config.embed_dim, 2 * config.z_chans)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, T, H, W) in [-1, 1] -> moments (B, 2z, T/pT, H/pH, W/pW), mean first."""
        # 1. patch_embed: (B, C, T, H, W) -> (B, D, lT, lH, lW)
        x = self.patch_embed(x)
        B, _, lT, lH, lW = x.shape
        # 2-3. tokens in (t, h, w) row-major order, cls first, learned positions:
        # (B, D, lT, lH, lW) -> (B, n_cls + lT*lH*lW, D)
        x = _embed_tokens(
            x.flatten(2).transpose(1, 2), self.cls_token, self.pos_embed, self.config, (lT, lH, lW)
        )
        # 4. blocks
        for block in self.blocks:
            x = block(x)
        # 5. norm, Linear to the moments, drop cls: (B, S, D) -> (B, 2z, lT, lH, lW)
        x = self.last_layer(self.norm(x))[:, _cls_count(self.config) :]
        x = x.reshape(B, lT, lH, lW, -1).permute(0, 4, 1, 2, 3)
        if self.config.norm_code:
            x = (x.float() / x.float().norm(dim=1, keepdim=True)).to(x.dtype)
        return x


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.proj_in = nn.Linear(config.z_chans, d)
        cls, pos = _learned_tokens(config)
        self.register_parameter("cls_token", cls)
        self.pos_embed = pos
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        if config.use_final_proj:
            width = config.unpatch_channels * config.voxel
            self.final_proj = nn.Linear(d, width)
            self.final_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.last_layer = nn.Conv3d(config.unpatch_channels, 3, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """(B, z, lT, lH, lW) latent (already / scale factor) -> (B, 3, lT*pT, lH*pH, lW*pW)."""
        cfg = self.config
        B, _, lT, lH, lW = z.shape
        # 1. proj_in per voxel: (B, z, lT, lH, lW) -> (B, lT*lH*lW, D)
        x = self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(B, lT * lH * lW, -1))
        # 2. cls + learned positions: (B, n_cls + S, D)
        x = _embed_tokens(x, self.cls_token, self.pos_embed, cfg, (lT, lH, lW))
        # 3. blocks, norm, drop cls: (B, S, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, _cls_count(cfg) :]
        if cfg.use_final_proj:
            x = self.final_norm(self.final_proj(x))
        # 4. unpatchify, each token laid out (pT, pH, pW, C) with C fastest:
        # (B, S, pT*pH*pW*C) -> (B, lT, lH, lW, pT, pH, pW, C) -> (B, C, lT*pT, lH*pH, lW*pW)
        pt, ps, c = cfg.patch_length, cfg.patch_size, cfg.unpatch_channels
        x = x.reshape(B, lT, lH, lW, pt, ps, ps, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(B, c, lT * pt, lH * ps, lW * ps)
        # 5. last_layer Conv3d(k=3, pad=1) -> RGB in about [-1, 1]
        return self.last_layer(x)


# ------------------------------------------------------------------------------------------------
# Tiling (official TileProcessor, §5.2)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    """Per-axis (t, h, w) geometry of one tiled pass, with the official TileProcessor's rounding."""

    size: tuple[int, int, int]  # tile extent, input units (frames/px to encode, latents to decode)
    stride: tuple[int, int, int]  # distance between tile starts, input units
    blend: tuple[int, int, int]  # nominal cross-fade length with the previous tile, output units
    keep: tuple[int, int, int]  # each blended tile is cropped to this, output units

    def __post_init__(self) -> None:
        for name in ("size", "stride", "keep"):
            if min(getattr(self, name)) < 1:
                raise ValueError(
                    f"tile {name} {getattr(self, name)} must be >= 1 on every axis: "
                    "the tile or its overlap is too small for the VAE's patch"
                )


def tile_plan(
    config: VAEConfig,
    tile_frames: int,
    tile_px: int,
    spatial_overlap: float,
    temporal_overlap: float,
    decode: bool,
) -> TilePlan:
    """The official TileProcessor's geometry: encode cuts tiles in pixels and blends latents,
    decode cuts tiles in latents and blends pixels; every length is rounded down with int()."""
    lat_t, lat_s = tile_frames // config.patch_length, tile_px // config.patch_size
    if min(lat_t, lat_s) < 1:
        raise ValueError(
            f"tiles of {tile_frames} frames x {tile_px} px hold no latent (patch "
            f"{config.patch_length} frames x {config.patch_size} px)"
        )
    if decode:
        size = (lat_t, lat_s)
        out = (lat_t * config.patch_length, lat_s * config.patch_size)
    else:
        size = (tile_frames, tile_px)
        out = (lat_t, lat_s)
    overlap = (temporal_overlap, spatial_overlap)
    stride = [int(size[a] * (1 - overlap[a])) for a in range(2)]
    blend = [int(out[a] * overlap[a]) for a in range(2)]
    keep = [out[a] - blend[a] for a in range(2)]
    # (t, s) -> (t, h, w): height and width share the spatial values
    return TilePlan(
        size=(size[0], size[1], size[1]),
        stride=(stride[0], stride[1], stride[1]),
        blend=(blend[0], blend[1], blend[1]),
        keep=(keep[0], keep[1], keep[1]),
    )


def _blend_into(a: Tensor, b: Tensor, dim: int, extent: int) -> None:
    """Cross-fade the neighbour `a` into the start of tile `b` along `dim`, in place:
    b[y] = a[-e + y] * (1 - y/e) + b[y] * (y/e), y < e = min(extent, a's size, b's size)."""
    e = min(extent, a.shape[dim], b.shape[dim])
    if e <= 0:
        return
    ramp = torch.arange(e, dtype=torch.float64, device=b.device) / e
    shape = [1] * b.ndim
    shape[dim] = e
    # Weights rounded to fp32 and each product rounded to b's dtype before the sum: the same
    # arithmetic as the official per-row loop with Python-float weights (bit-equal, fp32 and bf16).
    w_a = (1 - ramp).to(device=b.device, dtype=torch.float32).view(shape)
    w_b = ramp.to(device=b.device, dtype=torch.float32).view(shape)
    head = b.narrow(dim, 0, e)
    tail = a.narrow(dim, a.shape[dim] - e, e)
    head.copy_((tail.float() * w_a).to(b.dtype) + (head.float() * w_b).to(b.dtype))


def cut_tiles(x: Tensor, plan: TilePlan) -> dict[tuple[int, int, int], Tensor]:
    """The tiles of x (N, C, T, H, W), keyed by their (t, h, w) place in the tile grid, in raster
    order (the order the tiles are run in; edge tiles are smaller)."""
    starts = [range(0, x.shape[2 + axis], plan.stride[axis]) for axis in range(3)]
    st, sh, sw = plan.size
    places = itertools.product(*(range(len(s)) for s in starts))
    return {
        key: x[:, :, t0 : t0 + st, h0 : h0 + sh, w0 : w0 + sw]
        for key, (t0, h0, w0) in zip(places, itertools.product(*starts), strict=True)
    }


def stitch_tiles(outs: dict[tuple[int, int, int], Tensor], plan: TilePlan, chained: bool) -> Tensor:
    """Blend each tile's output (keyed as `cut_tiles` keys them, in its order) with its previous
    neighbour along t, then h, then w, crop it to plan.keep and stitch the crops.

    chained=False (decode): a tile is blended as a copy, against its neighbours' raw outputs.
    chained=True (encode): tiles are blended in place in raster order, so a neighbour has already
    been blended itself when it is used.
    """
    counts = [max(key[axis] for key in outs) + 1 for axis in range(3)]
    crops: dict[tuple[int, ...], Tensor] = {}
    for key, raw in outs.items():
        tile = raw if chained else raw.clone()
        for axis in range(3):
            if key[axis] > 0:
                prev = tuple(k - (a == axis) for a, k in enumerate(key))
                _blend_into(outs[prev], tile, dim=2 + axis, extent=plan.blend[axis])
        kt, kh, kw = plan.keep
        crops[key] = tile[:, :, :kt, :kh, :kw]
    rows = []
    for f in range(counts[0]):
        row = [
            torch.cat([crops[f, i, j] for j in range(counts[2])], dim=4) for i in range(counts[1])
        ]
        rows.append(torch.cat(row, dim=3))
    return torch.cat(rows, dim=2)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class ViTVAE(nn.Module):
    """MAGI-1's transformer VAE: 8x spatial, 4x temporal compression, posterior mean only."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.proj_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.proj_in.weight.device

    @torch.no_grad()
    def encode_mean(self, x: Tensor) -> Tensor:
        """Untiled encode: (N, C, T, H, W) in [-1, 1] -> posterior mean (N, z, T/4, H/8, W/8), in
        the weights' dtype. A single frame is an image: repeated 4x, latent 0 kept."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_chans:
            raise ValueError(f"expected a video (N, {cfg.in_chans}, T, H, W), got {tuple(x.shape)}")
        T, H, W = x.shape[2:]
        if 1 < T < cfg.patch_length or min(H, W) < cfg.patch_size:
            raise ValueError(
                f"cannot encode {T} frames of {H}x{W} px: need 1 frame (an image) or "
                f">= {cfg.patch_length}, and >= {cfg.patch_size} px per side"
            )
        x = x.to(device=self.device, dtype=self.dtype)
        if T == 1:
            moments = self.encoder(x.expand(-1, -1, IMAGE_REPEAT, -1, -1))[:, :, :1]
        else:
            moments = self.encoder(x)
        # The posterior is never sampled: the mean is the first half of the channels.
        return moments[:, : cfg.z_chans]

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Untiled decode: (N, z, n, h, w), already / scale factor -> (N, 3, 4n, 8h, 8w) in the
        weights' dtype. A single latent frame decodes to ONE frame (the first of four)."""
        if z.ndim != 5 or z.shape[1] != self.config.z_chans:
            raise ValueError(
                f"expected a latent (N, {self.config.z_chans}, n, h, w), got {tuple(z.shape)}"
            )
        video = self.decoder(z.to(device=self.device, dtype=self.dtype))
        return video[:, :, :1] if z.shape[2] == 1 else video

    @torch.no_grad()
    def tiled_encode(
        self,
        x: Tensor,
        tile_frames: int = DEFAULT_FPS // 2,
        tile_px: int = 256,
        spatial_overlap: float = 0.25,
        temporal_overlap: float = 0.0,
    ) -> Tensor:
        """The pipeline's encode: `encode_mean` on tiles of tile_frames x tile_px x tile_px pixels,
        blended in place (chained) over overlap x tile latents, cropped, stitched. The defaults
        are the pipeline's at 24 fps (MAGI-1's own API defaults differ; reference §5.2)."""
        plan = tile_plan(
            self.config, tile_frames, tile_px, spatial_overlap, temporal_overlap, False
        )
        self._check_encode_tiles(x, plan)
        outs = {key: self.encode_mean(tile) for key, tile in cut_tiles(x, plan).items()}
        return stitch_tiles(outs, plan, chained=True)

    @torch.no_grad()
    def tiled_decode(
        self,
        z: Tensor,
        tile_frames: int = DEFAULT_FPS // 2,
        tile_px: int = 256,
        spatial_overlap: float = 0.25,
        temporal_overlap: float = 0.0,
    ) -> Tensor:
        """The pipeline's decode: `decode` on tiles of tile_frames/4 x tile_px/8 x tile_px/8
        latents; each tile's copy is blended with its raw neighbours over overlap x tile pixels,
        cropped, stitched. Defaults are the pipeline's at 24 fps (3-latent, 256-px tiles)."""
        plan = tile_plan(self.config, tile_frames, tile_px, spatial_overlap, temporal_overlap, True)
        outs = {key: self.decode(tile) for key, tile in cut_tiles(z, plan).items()}
        return stitch_tiles(outs, plan, chained=False)

    def _check_encode_tiles(self, x: Tensor, plan: TilePlan) -> None:
        """Refuse inputs whose last tile the encoder cannot take (the official code crashes in
        Conv3d there), with a message that says how to fix the input."""
        minimum = (self.config.patch_length, self.config.patch_size, self.config.patch_size)
        for axis, name in enumerate(("frames", "px high", "px wide")):
            n = x.shape[2 + axis]
            for start in range(0, n, plan.stride[axis]):
                length = min(plan.size[axis], n - start)
                if length < minimum[axis] and not (axis == 0 and length == 1):
                    raise ValueError(
                        f"cannot encode a video {n} {name} with tiles of {plan.size[axis]}: the "
                        f"tile at {start} has {length} {name}, and the encoder needs >= "
                        f"{minimum[axis]}"
                        + (" (or exactly 1 frame)" if axis == 0 else "")
                        + "; trim or pad the video"
                    )


# ------------------------------------------------------------------------------------------------
# Frame counts and the pipeline's pixel <-> latent helpers (§5.3, §8)
# ------------------------------------------------------------------------------------------------


def pipeline_tile_frames(fps: int) -> int:
    """The pipeline's temporal tile, fps // 2 frames; it must hold at least one 4-frame patch."""
    if fps // 2 < 4:
        raise ValueError(f"fps must be >= 8 (the VAE tile is fps // 2 >= 4 frames), got {fps}")
    return fps // 2


def _latents_of_tile(frames: int, patch_length: int) -> int:
    if frames in (0, 1):
        return frames  # 1 frame: the image path, one latent
    if frames < patch_length:
        raise ValueError(
            f"a tile of {frames} frames cannot be encoded (the encoder takes 1 "
            f"frame or >= {patch_length})"
        )
    return frames // patch_length  # leftover frames are dropped, as the strided Conv3d does


def latent_frames_for(num_video_frames: int, fps: int = DEFAULT_FPS, patch_length: int = 4) -> int:
    """Latent frames that the pipeline's tiled encode makes of `num_video_frames` frames: each
    fps // 2-frame tile gives floor(tile / 4) latents, a 1-frame remainder gives 1 (the image
    path), and a 2..3-frame remainder cannot be encoded (ValueError; the official crashes)."""
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    tile = pipeline_tile_frames(fps)
    full, rest = divmod(num_video_frames, tile)
    try:
        tail = _latents_of_tile(rest, patch_length)
    except ValueError:
        raise ValueError(
            f"{num_video_frames} frames cannot be encoded at {fps} fps: {tile}-frame tiles leave "
            f"{rest} frames, and the encoder takes 1 or >= {patch_length}; use "
            f"{num_video_frames - rest} or {num_video_frames - rest + 1} frames"
        ) from None
    return full * _latents_of_tile(tile, patch_length) + tail


def video_frames_for(num_latents: int, fps: int = DEFAULT_FPS, patch_length: int = 4) -> int:
    """Frames the pipeline's tiled decode makes of `num_latents` latent frames: each tile of
    (fps // 2) // 4 latents gives 4 per latent, except a 1-latent tile, which gives 1 frame. At
    24 fps: 12 * (n // 3) + [0, 1, 8][n % 3]."""
    if num_latents < 1:
        raise ValueError(f"num_latents must be >= 1, got {num_latents}")
    tile = pipeline_tile_frames(fps) // patch_length

    def frames_of(latents: int) -> int:
        return latents if latents <= 1 else latents * patch_length

    full, rest = divmod(num_latents, tile)
    return full * frames_of(tile) + frames_of(rest)


def to_uint8_frames(video: Tensor) -> Tensor:
    """(N, 3, T, H, W) in about [-1, 1] -> (N*T, H, W, 3) uint8. The official truncates
    (`.to(uint8)` after the clamp), it does not round; the arithmetic stays in the video's dtype."""
    pixels = (video * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    # (N, 3, T, H, W) -> (N, T, H, W, 3) -> (N*T, H, W, 3)
    return pixels.permute(0, 2, 3, 4, 1).flatten(0, 1)


def decode_chunk_to_uint8(
    vae: ViTVAE, latent: Tensor, scale_factor: float = SCALE_FACTOR, fps: int = DEFAULT_FPS
) -> Tensor:
    """A DiT latent (1, z, n, h, w), scaled by `scale_factor`, -> video frames (T, 8h, 8w, 3)
    uint8, T = video_frames_for(n, fps): unscale in fp32, tiled decode, truncate to uint8."""
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"expected one latent (1, z, n, h, w), got {tuple(latent.shape)}")
    video = vae.tiled_decode(latent.float() / scale_factor, tile_frames=pipeline_tile_frames(fps))
    return to_uint8_frames(video)


def encode_frames(
    vae: ViTVAE, frames: Tensor, scale_factor: float = SCALE_FACTOR, fps: int = DEFAULT_FPS
) -> Tensor:
    """Video frames (T, H, W, 3) uint8 -> DiT latent (1, z, n, H/8, W/8) fp32, n =
    latent_frames_for(T, fps): x / 127.5 - 1, tiled encode, x scale_factor (in the VAE's dtype,
    as the official does)."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}"
        )
    # (T, H, W, 3) -> (1, 3, T, H, W)
    video = frames.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
    video = video.to(device=vae.device, dtype=vae.dtype)
    mean = vae.tiled_encode(video, tile_frames=pipeline_tile_frames(fps))
    return (mean * scale_factor).float()


# ------------------------------------------------------------------------------------------------
# Loading, saving, random weights
# ------------------------------------------------------------------------------------------------


def _listed(items: list[str], limit: int = 12) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + "; ".join(items[:limit]) + "]" + more


def _check_state(vae: ViTVAE, state: dict[str, Tensor], source: Path) -> None:
    """Raise ValueError naming the missing, unexpected and mis-shaped keys (first 12 of each)."""
    want = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    if missing := sorted(want.keys() - have.keys()):
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected := sorted(have.keys() - want.keys()):
        problems.append(f"unexpected keys {_listed(unexpected)}")
    shared = sorted(want.keys() & have.keys())
    if wrong := [f"{k}: file {have[k]} vs config {want[k]}" for k in shared if have[k] != want[k]]:
        problems.append(f"wrong shapes {_listed(wrong)}")
    if problems:
        raise ValueError(f"{source} does not match its {CONFIG_FILE}: " + "; ".join(problems))


def load_vae(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ViTVAE:
    """Load an official VAE folder (config.json + diffusion_pytorch_model.safetensors), strictly.
    The model is built on the meta device and the file's tensors are assigned to it, so the
    weights exist once."""
    folder = Path(folder)
    config = VAEConfig.from_json(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"VAE weights not found: {weights}")
    with torch.device("meta"):
        vae = ViTVAE(config)
    state = load_file(weights, device=str(device))
    _check_state(vae, state, weights)
    for key in state:  # one tensor at a time, so a cast never holds a second full copy
        state[key] = state[key].to(dtype)
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


def save_vae(vae: ViTVAE, folder: str | Path) -> None:
    """Write `vae` in the official layout: config.json + diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.config.to_json(folder / CONFIG_FILE)
    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def random_vae(
    config: VAEConfig, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02
) -> ViTVAE:
    """Deterministic random weights: every tensor N(0, std^2), LayerNorm gains 1 + N(0, std^2).
    Draws from its own generator only, so the global RNG is untouched."""
    with torch.device("meta"):
        vae = ViTVAE(config)
    vae = vae.to_empty(device="cpu")
    gains = {f"{name}.weight" for name, m in vae.named_modules() if isinstance(m, nn.LayerNorm)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std + (name in gains))
    return vae.to(dtype).eval()
