"""The engine end to end on the tiny model: one session exactly as MAGI-1 samples it, prompts,
cancel, admission, fairness, backpressure and constant memory. (Many sessions batched into one
step, each bit-identical to itself alone: test_batch_invariance.py.)"""

from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from scheduler.scheduler import RequestTooLarge, SchedulerConfig
from scheduler.session import SessionParams, SessionState


def params(
    sid: str, chunks: int | None = 3, seed: int = 1, prompts=((0, "a red ball rolls"),), **kw
) -> SessionParams:
    return SessionParams(sid, tuple(prompts), chunks, 64, 64, seed=seed, **kw)


def latents_by_chunk(done, sid):
    return {d.chunk_index: d.latent for d in done if d.session_id == sid}


def alone(model, p: SessionParams):
    engine = Engine(model)
    engine.open(p)
    return latents_by_chunk(engine.run_until_idle(), p.session_id)


def test_t2v_session_outputs_every_chunk_in_order_with_its_frames(tiny_model):
    engine = Engine(tiny_model)
    engine.open(params("s", chunks=3))
    done = engine.run_until_idle()
    assert [d.chunk_index for d in done] == [0, 1, 2]
    assert [d.first_frame for d in done] == [0, 24, 48]
    assert all(d.frames.shape == (24, 64, 64, 3) and d.frames.dtype == torch.uint8 for d in done)
    assert all(d.prompt.text == "a red ball rolls" and d.prompt.version == 1 for d in done)
    session = engine.scheduler.get("s")
    assert session.state is SessionState.FINISHED
    assert engine.used_bytes("s") == 0 and "s" not in engine.runner.sessions


def test_session_is_reproducible_and_depends_on_its_seed(tiny_model):
    a = alone(tiny_model, params("a", chunks=2, seed=7))
    b = alone(tiny_model, params("b", chunks=2, seed=7))
    c = alone(tiny_model, params("c", chunks=2, seed=8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(a[0], c[0])


def test_prompt_pushed_mid_stream_changes_exactly_the_chunks_from_its_chunk_on(tiny_model):
    base = alone(tiny_model, params("base", chunks=4))
    engine = Engine(tiny_model)
    engine.open(params("p", chunks=4))
    done = []
    for _ in range(3):  # chunks 0 and 1 have entered (dps = 2)
        done += engine.step()
    entry = engine.scheduler.update_prompt("p", "a green cube jumps")
    assert entry.from_chunk == 2 and entry.version == 2
    done += engine.run_until_idle()
    got = latents_by_chunk(done, "p")
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    assert not torch.allclose(got[2], base[2]) and not torch.allclose(got[3], base[3])
    prompts = {d.chunk_index: (d.prompt.text, d.prompt.version) for d in done}
    assert prompts[1] == ("a red ball rolls", 1) and prompts[2] == ("a green cube jumps", 2)


def test_prompt_switch_needs_no_kv_recompute(tiny_model):
    """Clean-chunk KV is computed with the null caption, so the cache of chunk 0 is the same
    whatever prompt steers the chunks after it: a switch leaves the cache valid."""
    caches = []
    for timeline in (((0, "a red ball rolls"),), ((0, "a red ball rolls"), (1, "it turns blue"))):
        engine = Engine(tiny_model)
        session = engine.open(params("k", chunks=None, prompts=timeline))
        for _ in range(9):  # chunk 0 is re-forwarded clean at step 8 (stage 4, sub-step 0)
            engine.step()
            for _ in range(session.unconsumed):
                engine.consumed("k")
        caches.append(engine.runner.sessions["k"].cache)
    assert caches[0].chunk_indices == caches[1].chunk_indices == [0]
    for layer in range(3):
        assert torch.equal(caches[0].read(layer, [0]), caches[1].read(layer, [0]))


def test_cancel_mid_window_frees_everything_and_leaves_others_unchanged(tiny_model):
    want = alone(tiny_model, params("b", chunks=2, seed=5))
    engine = Engine(tiny_model)
    engine.open(params("a", chunks=4, seed=4))
    engine.open(params("b", chunks=2, seed=5))
    done = []
    for _ in range(9):
        done += engine.step()
        for d in done[-2:]:
            engine.consumed(d.session_id)
    assert engine.used_bytes("a") > 0
    engine.cancel("a")
    assert engine.used_bytes("a") == 0 and "a" not in engine.runner.sessions
    assert engine.scheduler.get("a").state is SessionState.CANCELLED
    done += engine.run_until_idle()
    got = latents_by_chunk(done, "b")
    assert all((got[k] - want[k]).abs().max() < 1e-5 for k in want)
    assert max(d.chunk_index for d in done if d.session_id == "a") < 3


def test_a_request_larger_than_the_whole_budget_is_refused_at_once(tiny_model):
    engine = Engine(tiny_model, SchedulerConfig(memory_budget_bytes=1024))
    with pytest.raises(RequestTooLarge, match="more than the whole budget"):
        engine.open(params("big", chunks=1))


def test_unbounded_session_memory_is_flat_once_the_window_is_full(tiny_model):
    engine = Engine(tiny_model)
    session = engine.open(params("u", chunks=None))
    samples = []
    for step in range(60):
        engine.step()
        while session.unconsumed:
            engine.consumed("u")
        if step % 2 == 0 and step > 10:  # after sub-step 0 of a stage: window full
            samples.append(engine.used_bytes("u"))
            assert len(engine.runner.sessions["u"].cache.chunk_indices) == 1
    assert max(samples) == min(samples)
    assert session.chunks_out >= 20
    assert max(samples) <= session.estimated_bytes


def test_distilled_model_runs_the_one_forward_path(tiny_distill_model):
    engine = Engine(tiny_distill_model)
    engine.open(params("d", chunks=2))
    done = engine.run_until_idle()
    assert [d.chunk_index for d in done] == [0, 1]
    assert all(torch.isfinite(d.latent).all() for d in done)


def test_per_session_guidance_scales_override_the_models(tiny_model):
    rc = tiny_model.config.runtime_config
    base = alone(tiny_model, params("a", chunks=1))
    same = alone(
        tiny_model,
        params("b", chunks=1, text_scales=rc.text_scales, prev_chunk_scales=rc.prev_chunk_scales),
    )
    other = alone(tiny_model, params("c", chunks=1, text_scales=(1.0, 1.0, 1.0, 0.0, 0.0)))
    assert torch.equal(base[0], same[0])
    assert not torch.allclose(base[0], other[0])


def test_a_cancelled_sessions_id_reopened_before_the_next_step_runs(tiny_model):
    engine = Engine(tiny_model)
    engine.open(params("x", chunks=1))
    engine.step()
    engine.cancel("x")
    engine.open(params("x", chunks=1))  # the client reuses its id at once
    done = engine.run_until_idle()
    assert [d.chunk_index for d in done] == [0] and engine.used_bytes("x") == 0
