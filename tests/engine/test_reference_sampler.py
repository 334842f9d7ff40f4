"""One session through the engine equals the official sampling loop, written out here the way
reference §4.3-§4.7 describe it: the whole video's latents, stages and sub-steps, slice_point,
the kv range of every chunk in tokens over `cache[0:slice_point] ++ this forward` (the full
cached history, never evicted), the three CFG branches or the distilled path with the
nearly-clean copy, and the Euler update."""

from __future__ import annotations

import torch

from engine.engine import Engine
from engine.sampling import chunk_noise, time_grid
from model.dit import ChunkGroup, ChunkInput
from model.kv_cache import KVCache
from model.text import TextConditioning, chunk_caption, null_caption
from scheduler.session import SessionParams
from scheduler.timegrid import step_intervals, step_size_value

H = W = 64


def visible(caption):
    return caption.embedding[caption.mask.bool()].float()


def official_loop(model, prompt: str, num_chunks: int, seed: int) -> list[torch.Tensor]:
    cfg = model.config
    rc, ec = cfg.runtime_config, cfg.engine_config
    n_steps, win, width = rc.num_steps, rc.window_size, rc.chunk_width
    dps = n_steps // win
    grid = time_grid(n_steps, ec.shortcut_mode)
    np_ = width * (H // 16) * (W // 16)
    x = [
        chunk_noise(seed, c, (16, width, H // 8, W // 8), torch.device("cpu"))
        for c in range(num_chunks)
    ]
    cache = KVCache(cfg.model_config.num_layers)
    null = visible(null_caption(model.dit.y_embedder.null_caption_embedding.detach()))
    text = [
        visible(
            chunk_caption(
                model.text.encode(prompt), model.special_tokens, TextConditioning(), c, num_chunks
            )
        )
        for c in range(num_chunks)
    ]
    steps_done = [0] * num_chunks
    for stage in range(num_chunks + win - 1):
        start, end = max(0, stage - win + 1), min(num_chunks, stage + 1)
        t_end = min(win, stage + 1)
        for j in range(dps):
            ks = {start + m: (t_end - 1 - m) * dps + j for m in range(end - start)}
            extra = start > 0 and j == 0
            sp = start - 1 if extra else start  # slice_point
            fwd = ([start - 1] if extra else []) + list(range(start, end))
            total = width * (sp + len(fwd))
            step = step_size_value(n_steps, step_intervals(n_steps, ec.shortcut_mode)[j])

            def k_range(g):
                d = n_steps if g not in ks else ks[g]
                look = (
                    rc.clean_chunk_kvrange
                    if d == n_steps
                    else rc.noise2clean_kvrange[d // (n_steps // len(rc.noise2clean_kvrange))]
                )
                return (max(0, g + 1 - look) * np_, (g + 1) * np_)

            def branch(captions, dropped, write):
                return ChunkGroup(
                    [
                        ChunkInput(
                            x[g],
                            rc.clean_t if g not in ks else float(grid[ks[g]]),
                            captions(g),
                            dropped,
                            width * g,
                            total,
                            k_range(g),
                            step,
                            g if (write and g not in ks) else None,
                        )
                        for g in fwd
                    ],
                    cache,
                    list(range(sp)),
                )

            groups, noisy = [], list(range(start, end))
            if rc.cfg_number == 3:
                groups.append(branch(lambda g, ks=ks: text[g] if g in ks else null, False, False))
                groups.append(branch(lambda g: null, True, True))
                groups += [
                    ChunkGroup(
                        [ChunkInput(x[g], float(grid[ks[g]]), null, True, 0, width, (0, np_), step)]
                    )
                    for g in noisy
                ]
            else:
                groups.append(branch(lambda g, ks=ks: text[g] if g in ks else null, False, True))
                oldest = noisy[0]
                if float(grid[ks[oldest]]) > ec.distill_nearly_clean_chunk_threshold:
                    slot = sp + len(fwd)
                    groups.append(
                        ChunkGroup(
                            [
                                ChunkInput(
                                    x[oldest],
                                    float(grid[ks[oldest]]),
                                    text[oldest],
                                    False,
                                    width * slot,
                                    width * (slot + 1),
                                    (0, np_),
                                    step,
                                )
                            ]
                        )
                    )
            out = model.dit(groups)
            off = 1 if extra else 0
            for m, g in enumerate(noisy):
                k = ks[g]
                if rc.cfg_number == 3:
                    idx = int((torch.tensor(rc.cfg_t_range) - 1e-7 < grid[k]).sum()) - 1
                    sp_, st = rc.prev_chunk_scales[idx], rc.text_scales[idx]
                    v = (
                        (1 - sp_) * out[2 + m][0]
                        + (sp_ - st) * out[1][off + m]
                        + st * out[0][off + m]
                    )
                else:
                    v = out[0][off + m]
                    if m == 0 and len(out) > 1:
                        v = v * 0.7 + out[1][0] * (1 - 0.7)
                x[g] = x[g] + v * (grid[k + 1] - grid[k])
                steps_done[g] += 1
    assert steps_done == [n_steps] * num_chunks
    return x


def engine_latents(model, prompt, num_chunks, seed):
    engine = Engine(model)
    engine.open(SessionParams("s", ((0, prompt),), num_chunks, H, W, seed=seed))
    return {d.chunk_index: d.latent for d in engine.run_until_idle()}


def test_engine_equals_the_official_loop_with_three_cfg_branches(tiny_model):
    want = official_loop(tiny_model, "a red ball rolls", 3, seed=11)
    got = engine_latents(tiny_model, "a red ball rolls", 3, seed=11)
    for c in range(3):
        assert (got[c] - want[c]).abs().max() < 1e-5, c


def test_engine_equals_the_official_loop_for_a_distilled_model(tiny_distill_model):
    want = official_loop(tiny_distill_model, "a blue box", 3, seed=12)
    got = engine_latents(tiny_distill_model, "a blue box", 3, seed=12)
    for c in range(3):
        assert (got[c] - want[c]).abs().max() < 1e-5, c
