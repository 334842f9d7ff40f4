"""The DiT against a direct computation of the reference formulas (magi1-reference.md §3),
written here independently in float64 from a hand-made checkpoint: 1p norms, the 8-block
linear_proj permutation, the per-group K/V interleave, GQA, RoPE, gates, both FFN kinds, the
24B input path and the distill step embedding."""

from __future__ import annotations

import math

import pytest
import torch

from model.checkpoint import init_random_
from model.config import EngineConfig, MagiConfig, ModelConfig, RuntimeConfig
from model.dit import ChunkGroup, ChunkInput, VideoDiT

F64 = torch.float64


def small_config(big_path: bool) -> MagiConfig:
    model = ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=48,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=8,
        params_dtype="torch.float32",
        caption_channels=12,
        caption_max_length=20,
        in_channels=32 if big_path else 16,
        out_channels=32 if big_path else 16,
        x_rescale_factor=0.1 if big_path else 1.0,
        half_channel_vae=big_path,
        gated_linear_unit=big_path,
    )
    runtime = RuntimeConfig(
        cfg_number=1 if big_path else 3, num_steps=8, video_size_h=64, video_size_w=64
    )
    return MagiConfig(model, runtime, EngineConfig(distill=big_path))


def ln(x, w, b, one_p, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * (w + 1 if one_p else w) + b


def attend(q, k, v):
    """q (Lq, H, d), k/v (Lk, G, d), head h uses group h // (H/G)."""
    rep = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(q.shape[1]):
        g = h // rep
        s = q[:, h] @ k[:, g].T / math.sqrt(q.shape[-1])
        out[:, h] = torch.softmax(s, -1) @ v[:, g]
    return out


def rope_angles(frame0, frames_total, t, hp, wp, bands):
    rho = math.sqrt(hp * wp / 256)

    def axis(x, f, r):
        return x if f == 1 else x / (f - 1) * (r - 1)

    rows = []
    for f in range(frame0, frame0 + t):
        for i in range(hp):
            for j in range(wp):
                pt = axis(float(f), frames_total, frames_total)
                ph = axis(i - (hp - 1) / 2, hp, hp / rho)
                pw = axis(j - (wp - 1) / 2, wp, wp / rho)
                rows.append(torch.cat([pt * bands, ph * bands, pw * bands]))
    return torch.stack(rows)  # (S, 3 * nb)


def rotate(x, angles):
    """Pairs (m, m + 3nb) rotated by angle m; the remaining dims unchanged."""
    n = angles.shape[-1]
    out = x.clone()
    c, s = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
    out[..., :n] = x[..., :n] * c - x[..., n : 2 * n] * s
    out[..., n : 2 * n] = x[..., :n] * s + x[..., n : 2 * n] * c
    return out


def reference_forward(sd, cfg: MagiConfig, chunks: list[ChunkInput]) -> list[torch.Tensor]:
    m = cfg.model_config
    d, hq, g_, hd = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    sd = {k: v.to(F64) for k, v in sd.items()}
    # embeddings per chunk
    tokens, conds, angles, texts = [], [], [], []
    for c in chunks:
        x = c.latent.to(F64) * m.x_rescale_factor
        if m.half_channel_vae:
            x = torch.cat([x, x])
        cin, t, hh, ww = x.shape
        hp, wp = hh // 2, ww // 2
        w = sd["x_embedder.weight"][:, :, 0]  # (D, Cin, 2, 2)
        patches = x.reshape(cin, t, hp, 2, wp, 2).permute(1, 2, 4, 0, 3, 5).reshape(t * hp * wp, -1)
        tokens.append(patches @ w.reshape(d, -1).T)

        def temb(value):
            freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=F64) / 128)
            arg = value * freqs * 1000
            e = torch.cat([torch.cos(arg), torch.sin(arg)])
            h1 = torch.nn.functional.silu(
                e @ sd["t_embedder.mlp.0.weight"].T + sd["t_embedder.mlp.0.bias"]
            )
            return h1 @ sd["t_embedder.mlp.2.weight"].T + sd["t_embedder.mlp.2.bias"]

        cond = temb(c.t)
        if cfg.engine_config.distill:
            cond = cond + temb(c.step_size)
        null = sd["y_embedder.null_caption_embedding"][-1 if c.caption_dropped else -2]
        cond = (
            cond
            + null @ sd["y_embedder.y_proj_adaln.0.weight"].T
            + sd["y_embedder.y_proj_adaln.0.bias"]
        )
        conds.append(cond)
        angles.append(rope_angles(c.rope_frame, c.rope_frames_total, t, hp, wp, sd["rope.bands"]))
        y = c.caption.to(F64)
        texts.append(
            torch.nn.functional.silu(
                y @ sd["y_embedder.y_proj_xattn.0.weight"].T + sd["y_embedder.y_proj_xattn.0.bias"]
            )
        )
    sizes = [tk.shape[0] for tk in tokens]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    h = torch.cat(tokens)
    for layer in range(m.num_layers):
        p = lambda name: sd[f"videodit_blocks.layers.{layer}.{name}"]  # noqa: E731
        a = ln(
            h,
            p("self_attention.linear_qkv.layer_norm.weight"),
            p("self_attention.linear_qkv.layer_norm.bias"),
            False,
        )

        def qk(wname, nname, heads):
            x = (a @ p(f"self_attention.linear_qkv.{wname}.weight").T).reshape(-1, heads, hd)
            return ln(
                x, p(f"self_attention.{nname}.weight"), p(f"self_attention.{nname}.bias"), True
            )

        ang = torch.cat(angles)
        q = rotate(qk("q", "q_layernorm", hq), ang)
        k = rotate(qk("k", "k_layernorm", g_), ang)
        v = (a @ p("self_attention.linear_qkv.v.weight").T).reshape(-1, g_, hd)
        qx = qk("qx", "q_layernorm_xattn", hq)
        w_kv = p("self_attention.linear_kv_xattn.weight")
        new_h = []
        for ci, c in enumerate(chunks):
            s0, s1 = starts[ci], starts[ci] + sizes[ci]
            k0, k1 = c.k_range
            o_sa = attend(q[s0:s1], k[k0:k1], v[k0:k1]).reshape(s1 - s0, -1)
            kx = torch.stack(
                [texts[ci] @ w_kv[2 * hd * gi : 2 * hd * gi + hd].T for gi in range(g_)], 1
            )
            vx = torch.stack(
                [texts[ci] @ w_kv[2 * hd * gi + hd : 2 * hd * (gi + 1)].T for gi in range(g_)], 1
            )
            kx = ln(
                kx,
                p("self_attention.k_layernorm_xattn.weight"),
                p("self_attention.k_layernorm_xattn.bias"),
                True,
            )
            o_xa = attend(qx[s0:s1], kx, vx).reshape(s1 - s0, -1)
            r = hq * hd // 8
            proj_in = torch.cat(
                [
                    torch.cat([o_sa[:, b * r : (b + 1) * r], o_xa[:, b * r : (b + 1) * r]], 1)
                    for b in range(8)
                ],
                1,
            )
            o = proj_in @ p("self_attention.linear_proj.weight").T
            gates = torch.tanh(
                torch.nn.functional.silu(conds[ci]) @ p("ada_modulate_layer.proj.0.weight").T
                + p("ada_modulate_layer.proj.0.bias")
            )
            g_msa, g_mlp = gates[:d], gates[d:]
            h1 = h[s0:s1] + ln(
                o * g_msa, p("self_attn_post_norm.weight"), p("self_attn_post_norm.bias"), True
            )
            z = (
                ln(h1, p("mlp.layer_norm.weight"), p("mlp.layer_norm.bias"), False)
                @ p("mlp.linear_fc1.weight").T
            )
            if m.gated_linear_unit:
                z = torch.nn.functional.silu(z[:, : m.ffn_hidden_size]) * z[:, m.ffn_hidden_size :]
            else:
                z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
            mlp = z @ p("mlp.linear_fc2.weight").T
            new_h.append(
                h1 + ln(mlp * g_mlp, p("mlp_post_norm.weight"), p("mlp_post_norm.bias"), True)
            )
        h = torch.cat(new_h)
    h = ln(
        h,
        sd["videodit_blocks.final_layernorm.weight"],
        sd["videodit_blocks.final_layernorm.bias"],
        True,
    )
    out = h @ sd["final_linear.linear.weight"].T
    results = []
    for ci, c in enumerate(chunks):
        _, t, hh, ww = c.latent.shape
        tok = out[starts[ci] : starts[ci] + sizes[ci]].reshape(t, hh // 2, ww // 2, 2, 2, -1)
        vel = torch.zeros(tok.shape[-1], t, hh, ww, dtype=F64)
        for pi in range(2):
            for pj in range(2):
                vel[:, :, pi::2, pj::2] = tok[:, :, :, pi, pj].permute(3, 0, 1, 2)
        if m.half_channel_vae:
            vel = vel[:16]
        results.append(vel / m.x_rescale_factor)
    return results


def make_chunks(cfg: MagiConfig, gen: torch.Generator) -> list[ChunkInput]:
    c = cfg.model_config.caption_channels
    np_ = 2 * 2 * 3  # tokens per chunk: T=2 frames, 2x3 patches
    step = 4.0 if cfg.engine_config.distill else None
    return [
        ChunkInput(
            torch.randn(16, 2, 4, 6, generator=gen),
            0.9999,
            torch.randn(5, c, generator=gen),
            True,
            rope_frame=2,
            rope_frames_total=6,
            k_range=(0, np_),
            step_size=step,
        ),
        ChunkInput(
            torch.randn(16, 2, 4, 6, generator=gen),
            0.37,
            torch.randn(3, c, generator=gen),
            False,
            rope_frame=4,
            rope_frames_total=6,
            k_range=(0, 2 * np_),
            step_size=step,
        ),
    ]


@pytest.mark.parametrize("big_path", [False, True], ids=["4.5B-gelu", "24B-swiglu-rescale-distill"])
def test_forward_equals_direct_computation_of_reference_formulas(big_path):
    cfg = small_config(big_path)
    model = VideoDiT(cfg)
    init_random_(model, seed=3, std=0.1)
    model.eval()
    chunks = make_chunks(cfg, torch.Generator().manual_seed(5))
    got = model([ChunkGroup(chunks)])[0]
    want = reference_forward(model.state_dict(), cfg, chunks)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert float((g.to(F64) - w).norm() / w.norm()) < 1e-5


def test_empty_caption_gives_zero_cross_attention_not_nan():
    cfg = small_config(False)
    model = VideoDiT(cfg)
    init_random_(model, seed=1)
    chunk = make_chunks(cfg, torch.Generator().manual_seed(0))[0]
    chunk.caption = torch.zeros(0, cfg.model_config.caption_channels)
    out = model([ChunkGroup([chunk])])[0][0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_bf16_weights_follow_the_precision_map_and_stay_close_to_fp32(gated):
    import dataclasses

    from model.checkpoint import random_dit
    from model.config import get_preset

    base = get_preset("tiny")
    mc = dataclasses.replace(base.model_config, gated_linear_unit=gated)
    configs = [
        MagiConfig(dataclasses.replace(mc, params_dtype=d), base.runtime_config, base.engine_config)
        for d in ("torch.bfloat16", "torch.float32")
    ]
    bf16, fp32 = (random_dit(c, seed=0).promote_high_precision() for c in configs)
    layer = bf16.videodit_blocks.layers[0]
    assert layer.self_attention.linear_qkv.q.weight.dtype == torch.bfloat16
    assert layer.self_attention.q_layernorm.weight.dtype == torch.float32  # promoted
    assert layer.self_attention.q_layernorm_xattn.weight.dtype == torch.bfloat16  # not promoted
    assert bf16.t_embedder.mlp[0].weight.dtype == torch.float32

    def chunk():
        gen = torch.Generator().manual_seed(1)
        return ChunkInput(
            torch.randn(16, 6, 8, 8, generator=gen),
            0.5,
            torch.randn(7, 64, generator=gen),
            False,
            0,
            6,
            (0, 96),
        )

    a = bf16([ChunkGroup([chunk()])])[0][0]
    b = fp32([ChunkGroup([chunk()])])[0][0]
    assert a.dtype == torch.float32
    assert float((a - b).norm() / b.norm()) < 0.03


def test_every_fp32_pattern_names_a_module_and_only_those_are_promoted():
    """The precision map is data (`FP32_MODULES`): a renamed module would silently stay bf16, so
    every pattern must name at least one module; every other parameter keeps the params dtype."""
    import dataclasses
    from fnmatch import fnmatchcase

    from model.checkpoint import build_dit_meta
    from model.config import get_preset
    from model.dit import FP32_MODULES

    base = get_preset("tiny")
    mc = dataclasses.replace(base.model_config, params_dtype="torch.bfloat16")
    model = build_dit_meta(MagiConfig(mc, base.runtime_config, base.engine_config))
    model.promote_high_precision()
    names = [name for name, _ in model.named_modules()]
    for pattern in FP32_MODULES:
        assert any(fnmatchcase(n, pattern) for n in names), pattern
    for key, param in model.named_parameters():
        parents = [key.rsplit(".", k)[0] for k in range(1, key.count(".") + 1)]
        promoted = any(fnmatchcase(p, pat) for p in parents for pat in FP32_MODULES)
        assert param.dtype == (torch.float32 if promoted else torch.bfloat16), key
