"""Every request field is checked at the edge; errors name the field and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest

from model.config import get_preset
from proto import video_generation_pb2 as pb
from server import media
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
        ({"num_chunks": 0}, "num_chunks", "unbounded"),
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
