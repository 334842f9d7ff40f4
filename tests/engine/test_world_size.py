"""The engine on a worker group (engine.ranks): rank 0 schedules and broadcasts each plan, every
rank runs it on its own tensors with its share of the forward. A whole generation with a
mid-stream prompt change gives what one rank gives, a free in a plan frees on every rank, and a
session batched with another in the group is bit-identical to it alone there. The window is 2
chunks, so a chunk boundary holds cached KV (one share per rank): a snapshot gathers it and
resumes bit for bit on the group and on one rank. Only rank 0 holds T5: the followers build
every caption from the T5 output it sent, and hold exactly the prompts its ledger names."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import ranks
from engine.engine import Engine
from engine.ranks import (
    CaptionLedger,
    CaptionRows,
    FollowerStats,
    RankGroup,
    StepLink,
    load_rank,
    serve_follower,
)
from engine.snapshot import decode, encode
from model.config import MagiConfig
from model.folder import MagiModel
from model.text import TextConditioning, chunk_caption
from scheduler.session import ForkSource, SessionParams

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


def window_2(model: MagiModel) -> MagiModel:
    """The model with 2 chunks in flight: the chunks before them stay in the KV cache."""
    rc = dataclasses.replace(model.config.runtime_config, window_size=2)
    config = MagiConfig(model.config.model_config, rc, model.config.engine_config)
    return dataclasses.replace(model, config=config)


def snapshot_at_chunk_3(engine: Engine) -> tuple[bytes, dict]:
    """A 5-chunk session snapshotted as chunk 3 enters (chunk 0 cached then, chunk 1 awaiting
    its clean re-forward, chunk 2 in flight), and the latents of its uninterrupted run."""
    engine.open(SessionParams("kept", ((0, PROMPT),), 5, 64, 64, seed=5))
    done = []
    while 3 not in {m.chunk for m in engine.scheduler.sessions["kept"].fork_marks}:
        produced = engine.step()
        for d in produced:  # as a stream would: a session waits for its consumer
            engine.consumed(d.session_id)
        done += produced
    data = encode(engine.snapshot("kept"))
    done += engine.run_until_idle()
    return data, {d.chunk_index: d.latent for d in done}


def _rank(rank: int, world: int, process_group, folder: str):
    group = RankGroup(rank, world, forward=process_group, control=process_group)
    model, forward = load_rank(folder, group)
    model = window_2(model)
    # Every rank generates with meta as the default device: a tensor made without an explicit
    # device would land there and fail the step (the placement proof for a group).
    with torch.device("meta"):
        if rank != 0:
            return serve_follower(model, forward)
        # 3 prompts in all: a capacity of 2 makes the followers drop and get some again
        link = StepLink(group, caption_capacity=2)
        engine = Engine(model, dit=forward, link=link)
        result = generate(engine)
        held_after_the_end = len(engine.runner.sessions)
        engine.sync()  # idle: the plan that frees the finished session goes out
        # the same session (its pushed prompt in its timeline) batched with another one
        engine.open(SessionParams("again", ((0, PROMPT), (1, SWITCH)), 3, 64, 64, seed=3))
        engine.open(SessionParams("beside", ((0, "a blue box"),), 2, 64, 64, seed=4))
        again = {d.chunk_index: d for d in engine.run_until_idle() if d.session_id == "again"}
        # and a fork of it at chunk 1 (every rank restores its own tensors from its marks)
        engine.open(SessionParams("fork", (), 3, 64, 64, seed=3, fork=ForkSource("again", 1)))
        forked = {d.chunk_index: d.latent for d in engine.run_until_idle()}
        # a snapshot with cached KV (each rank holds a share) resumed on the group
        data, kept = snapshot_at_chunk_3(engine)
        engine.open(SessionParams("resumed", (), None, 64, 64, resume=data))
        resumed = {d.chunk_index: d.latent for d in engine.run_until_idle()}
        engine.sync()
        link.close()
    batched = ({c: d.latent for c, d in again.items()}, {c: d.frames for c, d in again.items()})
    snap = (data, kept, resumed)
    t5 = (model.text is not None, link.ledger.texts)
    return (*result, held_after_the_end, link.stats, forward.stats, batched, forked, snap, t5)


@pytest.fixture(scope="module")
def single_rank(tiny_model):
    return generate(Engine(window_2(tiny_model)))


# two ranks prove the protocol; 4- and 8-rank Ulysses is tested on the model (test_parallel)
@pytest.mark.parametrize("world", [2])
def test_a_group_generates_what_one_rank_does(tiny_folder, tiny_model, single_rank, world):
    want_latents, want_frames, switched_at = single_rank
    assert switched_at == 1
    (latents, frames, from_chunk, held, link, forward, batched, forked, snap, t5), *followers = (
        ranks.launch(_rank, world, str(tiny_folder))
    )
    # rank 0 alone loaded T5; the followers hold what its ledger says they do, no more
    rank0_t5, ledger = t5
    assert rank0_t5 and all(isinstance(f, FollowerStats) and not f.t5_loaded for f in followers)
    assert all(f.captions == ledger for f in followers) and len(ledger) <= 3
    assert link.captions_sent > 3 and link.captions_dropped > 0  # dropped, sent again
    assert from_chunk == 1 and sorted(latents) == [0, 1, 2]
    for c in latents:
        assert (latents[c] - want_latents[c]).abs().max() < 1e-4, c
        assert (frames[c].int() - want_frames[c].int()).abs().max() <= 1, c
    # every rank ran every plan and every forward
    assert {f.steps for f in followers} == {link.steps} and link.steps > 0
    assert {f.forwards for f in followers} == {forward.forwards} and forward.forwards > 0
    # rank 0 freed the finished session at once; the next plan freed it on every other rank
    assert held == 0 and all(f.sessions_left == 0 for f in followers)
    # batch invariance holds in a group: the session batched with another is bit-identical
    assert sorted(batched[0]) == [0, 1, 2]
    for c in latents:
        assert torch.equal(batched[0][c], latents[c]) and torch.equal(batched[1][c], frames[c])
    assert sorted(forked) == [1, 2] and all(torch.equal(forked[c], latents[c]) for c in forked)
    # the group's snapshot held all KV heads of chunk 0 and resumed bit for bit on the
    # group; on one rank it resumes too, as close to the group's run as one rank's run is
    data, kept, resumed = snap
    assert sorted(decode(data, None, torch.device("cpu")).kv) == [0]
    assert sorted(resumed) == [2, 3, 4] and all(torch.equal(resumed[c], kept[c]) for c in resumed)
    alone = Engine(window_2(tiny_model))
    alone.open(SessionParams("resumed", (), None, 64, 64, resume=data))
    for d in alone.run_until_idle():
        assert (d.latent - kept[d.chunk_index]).abs().max() < 1e-4, d.chunk_index
    # the chunks' decodes were split over the ranks (one per finished chunk: 3 + 3 + 2, the
    # fork's 2 plus chunk 0, which it decodes for its frame count without streaming it, the
    # kept session's 5 and the resumed one's 3)
    assert {f.decodes for f in followers} == {19}
    # the plans are small next to the forwards they drive (the prompt and nothing else)
    assert link.send_s < forward.forward_s
    print(
        f"world {world}: {link.steps} plans, {link.message_bytes / link.steps:.0f} B/message,"
        f" send {1e3 * link.send_s / link.steps:.2f} ms,"
        f" forward {1e3 * forward.forward_s / forward.forwards:.1f} ms,"
        f" {link.captions_sent} captions sent, {link.caption_bytes / link.captions_sent:.0f} B each"
    )


def test_the_ledger_keeps_the_plans_prompts_and_drops_the_least_recent():
    ledger = CaptionLedger(capacity=2)
    assert ledger.missing(["a", "b"]) == ["a", "b"] and ledger.use(["a", "b"]) == ()
    assert ledger.missing(["b", "c"]) == ["c"]
    assert ledger.use(["b", "c"]) == ("a",)  # "a" is the least recently used
    assert ledger.use(["a", "b", "c"]) == ()  # a plan's own prompts stay, past the capacity
    assert ledger.use(["c"]) == ("a",) and ledger.texts == {"b", "c"}
    with pytest.raises(ValueError, match="capacity"):
        CaptionLedger(capacity=0)


@pytest.mark.parametrize("words", [4, 2000])  # a short prompt; one T5 truncates to 800 tokens
def test_a_followers_caption_is_rank_0s(tiny_model, words):
    """The rows a follower gets build the caption rank 0 builds from all 800, bit for bit."""
    full = tiny_model.text.encode(" ".join(["ball"] * words))
    rows = CaptionRows.of(full)
    assert rows.embedding.shape[0] == full.num_tokens
    sent = rows.on(torch.device("cpu"))
    for cond in (TextConditioning(), TextConditioning(pad_hq=False, pad_duration=False)):
        want, got = (chunk_caption(e, tiny_model.special_tokens, cond, 0, 3) for e in (full, sent))
        # what the DiT reads: the visible rows (engine.runner._visible)
        assert torch.equal(got.embedding[got.mask.bool()], want.embedding[want.mask.bool()])
