"""Every request field is checked at the edge; errors name the field and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest

from model.config import PRESETS, get_preset
from proto import video_generation_pb2 as pb
from server import convert, media
from server.config import Limits
from server.errors import InvalidRequest
from server.validation import (
    ServedModel,
    parse_cancel,
    parse_client_event,
    parse_generate,
    parse_prompt_update,
)
from tests.server.helpers import encode_image, request

TINY = ServedModel("tiny", get_preset("tiny"))
DISTILL = ServedModel("d", get_preset("tiny_distill"))
LIMITS = Limits(
    max_width_px=256,
    max_height_px=256,
    max_chunks=8,
    max_prompt_chars=50,
    max_image_bytes=10_000,
    max_input_pixels=100_000,
)


def refused(req: pb.GenerateRequest, field: str, model: ServedModel = TINY) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_generate(req, model, LIMITS)
    assert info.value.field == field, str(info.value)
    return str(info.value)


def test_defaults_are_resolved_from_the_model():
    spec = parse_generate(
        pb.GenerateRequest(timeline=[pb.TimelineEntry(text="x")], num_chunks=2), TINY, LIMITS
    )
    assert (spec.mode, spec.width, spec.height, spec.num_steps) == ("t2v", 64, 64, 8)
    assert spec.output_encoding == pb.OUTPUT_ENCODING_FMP4_H264
    assert spec.seed is None and spec.session_id == "" and spec.prompts == ((0, "x"),)


@pytest.mark.parametrize(
    ("changes", "field", "says"),
    [
        ({"width_px": 100}, "width_px", "multiple of 16 in 16..256"),
        ({"height_px": 512}, "height_px", "16..256"),
        ({"num_chunks": 9}, "num_chunks", "more than 8"),
        ({"num_chunks": 0}, "num_chunks", "set num_chunks 1..8 (unbounded sessions are disabled"),
        ({"unbounded": True}, "unbounded", "set num_chunks 0 or unbounded false"),
        ({"seed": 1 << 63}, "seed", "use 0..9223372036854775807"),
        ({"model": "m" * 5000}, "model", "... (5000 characters)"),
        (
            {"sampling": pb.Sampling(shortcut_mode=7)},
            "sampling.shortcut_mode",
            "use SHORTCUT_MODE_8_16_16",
        ),
        ({"model": "24B"}, "model", "'tiny'"),
        ({"session_id": "bad id!"}, "session_id", "[A-Za-z0-9._-]"),
        ({"mode": pb.GENERATION_MODE_I2V}, "mode", "needs image"),
        ({"mode": 9}, "mode", "unknown mode"),
        ({"output_encoding": 7}, "output_encoding", "unknown value"),
        ({"sampling": pb.Sampling(num_steps=6)}, "sampling.num_steps", "multiple of 4"),
        ({"sampling": pb.Sampling(num_steps=1000)}, "sampling.num_steps", "4..256"),
        (
            {"sampling": pb.Sampling(shortcut_mode=pb.SHORTCUT_MODE_16_16_8)},
            "sampling.shortcut_mode",
            "distilled",
        ),
        (
            {"sampling": pb.Sampling(text_guidance_scales=[1.0])},
            "sampling.text_guidance_scales",
            "5 finite values",
        ),
    ],
)
def test_bad_fields_are_refused_by_name(changes, field, says):
    req = request()
    for key, value in changes.items():
        if isinstance(value, pb.Sampling):
            req.sampling.CopyFrom(value)
        else:
            setattr(req, key, value)
    assert says in refused(req, field)


def test_timeline_entries_are_checked_one_by_one():
    req = request(chunks=4)
    assert "greater" in refused(_timeline(req, [(0, "a"), (0, "b")]), "timeline[1].from_chunk")
    assert "chunk 0" in refused(_timeline(req, [(1, "a")]), "timeline[0].from_chunk")
    assert "past the last" in refused(
        _timeline(req, [(0, "a"), (4, "b")]), "timeline[1].from_chunk"
    )
    assert "empty" in refused(_timeline(req, [(0, "  ")]), "timeline[0].text")
    assert "at most 50" in refused(_timeline(req, [(0, "x" * 51)]), "timeline[0].text")
    assert "at least one" in refused(_timeline(req, []), "timeline")


def _timeline(req: pb.GenerateRequest, entries) -> pb.GenerateRequest:
    out = pb.GenerateRequest()
    out.CopyFrom(req)
    del out.timeline[:]
    out.timeline.extend(pb.TimelineEntry(from_chunk=f, text=t) for f, t in entries)
    return out


def test_guidance_scales_are_taken_per_request_on_a_cfg3_model():
    req = request()
    req.sampling.text_guidance_scales.extend([1.0, 1.0, 1.0, 0.0, 0.0])
    spec = parse_generate(req, TINY, LIMITS)
    assert spec.text_scales == (1.0, 1.0, 1.0, 0.0, 0.0) and spec.prev_chunk_scales is None
    assert parse_generate(request(), TINY, LIMITS).text_scales is None


def test_guidance_scales_are_refused_on_a_distilled_model():
    req = request()
    req.sampling.text_guidance_scales.extend([1.0] * 5)
    assert "distilled" in refused(req, "sampling.text_guidance_scales", DISTILL)


def test_image_checks_happen_before_any_decoding():
    req = request(image=b"not an image")
    assert "JPEG or PNG" in refused(req, "image")
    bomb = media.PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR" + (50_000).to_bytes(4, "big") * 2
    assert "100000 pixels" in refused(request(image=bomb + b"\x00" * 100), "image")
    assert "at most 10000" in refused(request(image=b"\x89PNG" + b"\x00" * 10_000), "image")
    ok = encode_image(np.zeros((8, 8, 3), np.uint8))
    assert parse_generate(request(image=ok), TINY, LIMITS).mode == "i2v"


def test_raw_frames_larger_than_a_grpc_message_are_refused():
    limits = Limits(max_width_px=2048, max_height_px=2048)
    req = request(size=1280, output_encoding=pb.OUTPUT_ENCODING_RAW_RGB24)
    req.height_px = 1280
    with pytest.raises(InvalidRequest, match="4 MiB") as info:
        parse_generate(req, TINY, limits)
    assert info.value.field == "output_encoding"


def test_prompt_updates_and_interact_events():
    spec = parse_prompt_update(pb.PromptUpdate(session_id="s1", text="go", from_chunk=3), LIMITS)
    assert (spec.session_id, spec.from_chunk, spec.replace_later) == ("s1", 3, False)
    on_stream = parse_prompt_update(pb.PromptUpdate(text="go"), LIMITS, stream_session="mine")
    assert (on_stream.session_id, on_stream.from_chunk) == ("mine", None)
    with pytest.raises(InvalidRequest, match="text: the prompt is empty"):
        parse_prompt_update(pb.PromptUpdate(session_id="s1", text=""), LIMITS)
    with pytest.raises(InvalidRequest, match="session_id: is required"):
        parse_cancel(pb.CancelSessionRequest())
    with pytest.raises(InvalidRequest, match="not this stream's session"):
        parse_cancel(pb.CancelSessionRequest(session_id="other"), stream_session="mine")
    assert parse_cancel(pb.CancelSessionRequest(), stream_session="mine") == "mine"
    with pytest.raises(InvalidRequest, match="first ClientEvent must be start"):
        parse_client_event(pb.ClientEvent(cancel=pb.CancelSessionRequest()), first=True)
    with pytest.raises(InvalidRequest, match="already running"):
        parse_client_event(pb.ClientEvent(start=request()), first=False)


# ---- bounded by default ---------------------------------------------------------------------


def test_unset_num_chunks_says_what_to_set():
    unbounded_ok = Limits(max_chunks=8, allow_unbounded=True)
    with pytest.raises(InvalidRequest) as info:
        parse_generate(_length(0, unbounded=False), TINY, unbounded_ok)
    assert info.value.field == "num_chunks"
    assert "set num_chunks 1..8, or unbounded true" in str(info.value)


def test_unbounded_runs_until_cancelled_only_where_the_server_allows_it():
    unbounded_ok = Limits(max_chunks=8, allow_unbounded=True)
    spec = parse_generate(_length(0, unbounded=True), TINY, unbounded_ok)
    assert spec.num_chunks is None
    # entries of an unbounded session may lie past max_chunks: it runs that long
    far = _timeline(_length(0, unbounded=True), [(0, "a"), (100, "b")])
    assert parse_generate(far, TINY, unbounded_ok).prompts == ((0, "a"), (100, "b"))
    with pytest.raises(InvalidRequest, match="unbounded: .*num_chunks is 3; set num_chunks 0"):
        parse_generate(_length(3, unbounded=True), TINY, unbounded_ok)
    assert "disabled" in refused(_length(0, unbounded=True), "unbounded")


def test_the_chunk_cap_is_bounded_by_default_and_can_be_raised():
    assert Limits().max_chunks == 256 and not Limits().allow_unbounded
    assert parse_generate(request(chunks=10_000), TINY, Limits(max_chunks=10_000)).num_chunks
    with pytest.raises(ValueError, match="0 no longer means no cap"):
        Limits(max_chunks=0)
    with pytest.raises(ValueError, match="max_chunks must be in"):
        Limits(max_chunks=1 << 32)
    assert "more than 256" in str(_refusal(request(chunks=(1 << 32) - 1), Limits()))


def test_list_models_reports_the_chunk_cap_and_whether_unbounded_is_served():
    info = convert.model_info(TINY, Limits(max_chunks=99, allow_unbounded=True))
    assert (info.max_chunks, info.unbounded_allowed) == (99, True)
    info = convert.model_info(TINY, Limits())
    assert (info.max_chunks, info.unbounded_allowed) == (256, False)


# ---- every field at the edge ----------------------------------------------------------------


def test_seed_range_is_what_the_noise_generator_distinguishes():
    """chunk_noise keys its generator by the seed modulo 2**63: larger seeds would repeat."""
    assert parse_generate(request(seed=(1 << 63) - 1), TINY, LIMITS).seed == (1 << 63) - 1
    assert parse_generate(request(seed=0), TINY, LIMITS).seed == 0
    assert "or leave it unset" in refused(request(seed=(1 << 64) - 1), "seed")


@pytest.mark.parametrize("value", [-1.0, 50.5, 1e30, float("inf"), float("nan")])
def test_guidance_scales_out_of_range_are_refused(value):
    req = request()
    req.sampling.prev_chunk_guidance_scales.extend([1.0, 1.0, 1.0, 1.0, value])
    assert "5 finite values in 0..50" in refused(req, "sampling.prev_chunk_guidance_scales")


def test_guidance_scales_at_the_bounds_are_taken():
    req = request()
    req.sampling.text_guidance_scales.extend([0.0, 50.0, 50.0, 0.0, 0.0])
    assert parse_generate(req, TINY, LIMITS).text_scales == (0.0, 50.0, 50.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "\t\n\r",
        "\u200b",  # zero-width space
        "\u200b\u200c\u200d\u2060\ufeff",  # zero-width (non-)joiners, word joiner, BOM
        "\u00a0\u3000\u2003",  # no-break, ideographic and em spaces (Zs)
        "\u2028\u2029",  # line and paragraph separators
        "\u202e\u2066",  # bidi overrides (Cf)
        "\x00\x1b",  # controls (Cc)
        "\u3164\uffa0",  # Hangul fillers: letters that draw nothing
        "\u0301\u0308",  # combining marks with no letter to sit on
        "\ue000",  # private use
    ],
)
def test_text_that_is_blank_once_invisible_characters_are_removed_is_refused(text):
    assert "the prompt is empty" in refused(_timeline(request(), [(0, text)]), "timeline[0].text")
    with pytest.raises(InvalidRequest, match="text: the prompt is empty"):
        parse_prompt_update(pb.PromptUpdate(session_id="s1", text=text), LIMITS)


@pytest.mark.parametrize("text", ["a", "\u200ba\u200b", "\U0001f388", "赤いボール", "e\u0301"])
def test_text_with_anything_visible_is_taken_as_sent(text):
    spec = parse_generate(_timeline(request(), [(0, text)]), TINY, LIMITS)
    assert spec.prompts == ((0, text),)


def test_a_foreign_session_id_is_quoted_short():
    with pytest.raises(InvalidRequest) as info:
        parse_cancel(pb.CancelSessionRequest(session_id="x" * 100_000), stream_session="mine")
    assert len(str(info.value)) < 200 and "100000 characters" in str(info.value)


# ---- ListModels defaults, sent back, are always accepted ------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_list_models_default_sampling_sent_back_is_accepted(preset):
    model = ServedModel(preset, get_preset(preset))
    limits = Limits(max_width_px=1280, max_height_px=1280)
    info = convert.model_info(model, limits)
    # through the wire: the scales become proto floats (fp32)
    info = pb.ModelInfo.FromString(info.SerializeToString())
    assert info.default_sampling.text_guidance_scales  # the echo is not trivially empty
    req = pb.GenerateRequest(
        model=info.name,
        timeline=[pb.TimelineEntry(text="a red ball rolls")],
        num_chunks=1,
        sampling=info.default_sampling,
        width_px=info.resolution.default_width_px,
        height_px=info.resolution.default_height_px,
    )
    spec = parse_generate(req, model, limits)
    rc, ec = model.config.runtime_config, model.config.engine_config
    # exactly what leaving every sampling field unset gives
    unset = pb.GenerateRequest()
    unset.CopyFrom(req)
    unset.ClearField("sampling")
    assert spec == parse_generate(unset, model, limits)
    assert (spec.num_steps, spec.shortcut_mode) == (rc.num_steps, ec.shortcut_mode)
    assert spec.text_scales is None and spec.prev_chunk_scales is None


def test_a_shortcut_mode_other_than_the_models_own_still_needs_a_distilled_model():
    req = request()
    req.sampling.shortcut_mode = pb.SHORTCUT_MODE_8_16_16  # tiny's own: accepted
    assert parse_generate(req, TINY, LIMITS).shortcut_mode == "8,16,16"
    req.sampling.shortcut_mode = pb.SHORTCUT_MODE_16_16_8
    assert "this model uses 8,16,16" in refused(req, "sampling.shortcut_mode")
    req.sampling.num_steps = 12
    assert parse_generate(req, DISTILL, LIMITS).shortcut_mode == "16,16,8"


def test_guidance_other_than_the_models_own_is_refused_on_a_distilled_model():
    req = request()
    req.sampling.text_guidance_scales.extend(DISTILL.config.runtime_config.text_scales)
    assert parse_generate(req, DISTILL, LIMITS).text_scales is None
    req.sampling.text_guidance_scales[0] = 1.0
    assert "distilled" in refused(req, "sampling.text_guidance_scales", DISTILL)


def _length(chunks: int, unbounded: bool) -> pb.GenerateRequest:
    """request() with num_chunks and unbounded exactly as given."""
    req = request()
    req.num_chunks, req.unbounded = chunks, unbounded
    return req


def _refusal(req: pb.GenerateRequest, limits: Limits) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_generate(req, TINY, limits)
    return info.value
