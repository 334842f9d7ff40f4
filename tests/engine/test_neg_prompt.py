"""NEG_PROMPT (issue 17): the null caption becomes `[BORDERNESS, TRANS, LOGO, CAPTION, null_0 ..
null_45]`, its mask still the first 50 rows (reference §2.3, §4.10). The official sampler reads
that null half `y[1]` everywhere a null caption goes: the null and uncond CFG branches, the clean
chunk's re-forward that writes its KV (§4.4 step 3) and the v2v prefix forward (§4.9). So it
changes a cfg-3 generation from chunk 0 on, and a distilled (cfg 1) one only through the clean
chunks' KV: chunk 0 of a t2v session never attends to a clean chunk."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engine.engine import Engine
from engine.runner import ModelRunner
from model.text import SpecialToken, TextConditioning
from scheduler.session import SessionParams

NEG = TextConditioning(neg_prompt=True)
SIZE = 64


def expected_neg_null(model) -> torch.Tensor:
    """The visible null rows as the reference lays them out, from the raw vectors."""
    tokens = model.special_tokens
    null = model.dit.y_embedder.null_caption_embedding.detach()
    return torch.cat(
        [
            tokens.other[SpecialToken.BORDERNESS : SpecialToken.BORDERNESS + 1],  # row 4
            tokens.other[SpecialToken.TRANS : SpecialToken.TRANS + 1],  # row 0
            tokens.logo,
            tokens.caption,
            null[:46],
        ]
    ).float()


def generate(model, cond: TextConditioning | None, num_chunks: int = 2) -> dict[int, torch.Tensor]:
    engine = Engine(model, text_conditioning=cond)
    engine.open(SessionParams("s", ((0, "a red ball rolls"),), num_chunks, SIZE, SIZE, seed=3))
    return {d.chunk_index: d.latent for d in engine.run_until_idle()}


def with_null_rows(model, rows: torch.Tensor):
    """A copy of the model whose null_caption_embedding starts with `rows` (adaLN rows -2 / -1,
    at the end of the 800, are untouched)."""
    dit = copy.deepcopy(model.dit)
    with torch.no_grad():
        dit.y_embedder.null_caption_embedding[: rows.shape[0]] = rows
    return dataclasses.replace(model, dit=dit)


@pytest.fixture(scope="module")
def cfg3_runs(tiny_model):
    rewritten = with_null_rows(tiny_model, expected_neg_null(tiny_model))
    return generate(tiny_model, None), generate(tiny_model, NEG), generate(rewritten, None)


@pytest.fixture(scope="module")
def distill_runs(tiny_distill_model):
    model = tiny_distill_model
    rewritten = with_null_rows(model, expected_neg_null(model))
    return generate(model, None), generate(model, NEG), generate(rewritten, None)


def test_neg_prompt_null_caption_is_borderness_trans_logo_caption_then_null_rows_0_to_45(
    tiny_model,
):
    runner = ModelRunner(tiny_model, text_conditioning=NEG)
    want = expected_neg_null(tiny_model)
    assert want.shape == (50, tiny_model.config.model_config.caption_channels)
    assert torch.equal(runner._null_tokens, want)
    assert runner._null.mask.sum() == 50 and runner._null.mask[:50].bool().all()


def test_default_null_caption_is_the_first_50_null_rows(tiny_model):
    runner = ModelRunner(tiny_model)
    null = tiny_model.dit.y_embedder.null_caption_embedding.detach()
    assert torch.equal(runner._null_tokens, null[:50].float())


def test_neg_prompt_changes_every_chunk_of_a_cfg3_generation(cfg3_runs):
    default, neg, _ = cfg3_runs
    assert default.keys() == neg.keys() == {0, 1}
    for c in default:
        assert not torch.equal(default[c], neg[c]), c


def test_cfg3_neg_prompt_equals_null_rows_rewritten_to_the_reference_layout(cfg3_runs):
    # Every null-caption slot (null and uncond branches, clean re-forward) sees the 4 tokens.
    _, neg, rewritten = cfg3_runs
    for c in neg:
        assert torch.equal(neg[c], rewritten[c]), c


def test_distilled_model_sees_neg_prompt_only_through_the_clean_chunk_kv(distill_runs):
    default, neg, rewritten = distill_runs
    assert default.keys() == neg.keys() == {0, 1}
    assert torch.equal(default[0], neg[0])  # no clean chunk in reach while chunk 0 is denoised
    assert not torch.equal(default[1], neg[1])  # reads chunk 0's KV written with the null caption
    for c in neg:
        assert torch.equal(neg[c], rewritten[c]), c
