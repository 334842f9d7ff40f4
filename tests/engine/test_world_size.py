"""The engine on a worker group (engine.ranks): rank 0 schedules and broadcasts each step, every
rank runs its share of the forward. A whole generation with a mid-stream prompt change gives
what one rank gives, and the followers' mirrored caches end empty."""

from __future__ import annotations

import pytest

from engine.engine import Engine
from engine.ranks import (
    FollowerStats,
    RankGroup,
    load_rank0,
    load_rank_dit,
    load_rank_vae,
    serve_follower,
)
from model import parallel
from model.folder import read_config
from scheduler.session import SessionParams

PROMPT, SWITCH = "a red ball rolls", "a green cube jumps"


def generate(engine: Engine) -> tuple[dict, dict, int]:
    """3 chunks; a prompt pushed after the first step applies from chunk 1. Returns latents and
    frames by chunk, and the chunk the prompt applied from."""
    engine.open(SessionParams("s", ((0, PROMPT),), 3, 64, 64, seed=3))
    done = engine.step()
    entry = engine.scheduler.update_prompt("s", SWITCH)
    done += engine.run_until_idle()
    latents = {d.chunk_index: d.latent for d in done}
    frames = {d.chunk_index: d.frames for d in done}
    return latents, frames, entry.from_chunk


def _rank(rank: int, world: int, process_group, folder: str):
    group = RankGroup(rank, world, forward=process_group, control=process_group)
    layers = read_config(folder).model_config.num_layers
    if rank != 0:
        dit, vae = load_rank_dit(folder, rank, world, group), load_rank_vae(folder)
        return serve_follower(dit, group, layers, vae)
    model, forward = load_rank0(folder, group)
    result = generate(Engine(model, dit=forward))
    forward.close()
    return (*result, forward.stats)


@pytest.fixture(scope="module")
def single_rank(tiny_model):
    return generate(Engine(tiny_model))


@pytest.mark.parametrize("world", [2, 4])
def test_a_group_generates_what_one_rank_does(tiny_folder, single_rank, world):
    want_latents, want_frames, switched_at = single_rank
    assert switched_at == 1
    (latents, frames, from_chunk, stats), *followers = parallel.launch(
        _rank, world, str(tiny_folder)
    )
    assert from_chunk == 1 and sorted(latents) == [0, 1, 2]
    for c in latents:
        assert (latents[c] - want_latents[c]).abs().max() < 1e-4, c
        assert (frames[c].int() - want_frames[c].int()).abs().max() <= 1, c
    # every rank ran every forward, and each follower released its session's cache
    assert all(isinstance(f, FollowerStats) for f in followers)
    assert {f.forwards for f in followers} == {stats.forwards} and stats.forwards > 0
    assert all(f.caches_left == 0 for f in followers)
    # the chunks' decodes were split over the ranks (one decode per finished chunk here)
    assert {f.decodes for f in followers} == {3}
    # the step messages are small next to the forward they drive
    assert stats.send_s < stats.forward_s
    print(
        f"world {world}: {stats.forwards} forwards, {stats.message_bytes / stats.forwards:.0f}"
        f" B/message, send {1e3 * stats.send_s / stats.forwards:.2f} ms,"
        f" forward {1e3 * stats.forward_s / stats.forwards:.1f} ms"
    )


def test_a_plain_cache_is_refused_by_the_group_forward():
    from engine.ranks import _wire
    from model.dit import ChunkGroup
    from model.kv_cache import KVCache

    with pytest.raises(TypeError, match="GroupForward.new_cache"):
        _wire(ChunkGroup([], KVCache(1)))
