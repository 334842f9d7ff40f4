"""Every request field checked at the edge, one function per request kind.

Each check raises InvalidRequest naming the field and what is allowed. Media headers are probed
here (cheap); decoding pixels happens later in the thread pool (`decode_inputs`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from model.config import MagiConfig, preset_name
from proto import video_generation_pb2 as pb
from scheduler.session import ForkSource, SessionParams
from server import media
from server.config import GRPC_MESSAGE_BYTES, RAW_FRAME_OVERHEAD_BYTES, Limits
from server.errors import InvalidRequest
from server.snapshots import TOKEN as RESUME_TOKEN

SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Control calls may name another principal's session as OWNER/ID (admins; server/sessions.py)
OWNED_SESSION_ID = re.compile(r"(?:[A-Za-z0-9._@:+-]{1,128}/)?[A-Za-z0-9._-]{1,64}")
SIZE_MULTIPLE_PX = 16  # VAE stride 8 x DiT patch 2
MIN_SIZE_PX = 16
V2V_PREFIX_FRAMES = 32  # frames of the prefix video the model continues from
MODES = {
    pb.GENERATION_MODE_T2V: "t2v",
    pb.GENERATION_MODE_I2V: "i2v",
    pb.GENERATION_MODE_V2V: "v2v",
}
SHORTCUT_MODES = {pb.SHORTCUT_MODE_8_16_16: "8,16,16", pb.SHORTCUT_MODE_16_16_8: "16,16,8"}
SHORTCUT_STEPS = 12  # distilled models use shortcut sampling at exactly this many steps
# engine/sampling.py chunk_noise keys its generator by the seed modulo 2**63: a larger seed would
# silently repeat a smaller one's video, so it is refused (the server picks its own below this)
MAX_SEED = (1 << 63) - 1
# CFG scales past this only saturate (or overflow fp32 into NaN frames); the official ones are
# at most 7.5
MAX_GUIDANCE_SCALE = 50.0
# Unicode categories that draw nothing: controls, format (zero-width, BOM, bidi), unassigned,
# private use, separators, and combining marks that have no letter to sit on
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zs", "Zl", "Zp", "Mn", "Me"})
# letters (Lo) and symbols that render as blank: Hangul fillers and the blank Braille pattern
_INVISIBLE_CHARS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
QUOTED_CHARS = 40  # how much of a client's string an error message repeats


@dataclass(frozen=True)
class ServedModel:
    """What the edge needs to know about the model it serves (no weights)."""

    name: str
    config: MagiConfig

    @property
    def preset(self) -> str:
        return preset_name(self.config) or ""

    @property
    def fps(self) -> int:
        return self.config.runtime_config.fps

    @property
    def frames_per_chunk(self) -> int:
        rc = self.config.runtime_config
        return rc.chunk_width * rc.temporal_downsample_factor

    @property
    def distill(self) -> bool:
        return self.config.engine_config.distill


@dataclass(frozen=True)
class PromptSpec:
    session_id: str  # may be empty on Interact (the stream's session)
    text: str
    from_chunk: int | None
    replace_later: bool


# ---- GenerateRequest -------------------------------------------------------------------------


def parse_generate(
    request: pb.GenerateRequest, model: ServedModel, limits: Limits
) -> SessionParams:
    """The request record, every default resolved but the session id and seed (the server
    assigns those when it opens the session); the image or video still encoded."""
    if request.model not in ("", model.name):
        raise InvalidRequest(
            "model",
            f"unknown model {_quote(request.model)}; this server serves "
            f"{model.name!r} (or leave it empty)",
        )
    if request.session_id and not SESSION_ID.fullmatch(request.session_id):
        raise InvalidRequest("session_id", "must be 1-64 characters of [A-Za-z0-9._-], or empty")
    if request.HasField("fork"):
        if request.resume:
            raise InvalidRequest("fork", "a request forks or resumes, not both; drop one")
        return _parse_fork(request, limits)
    if request.resume:
        return _parse_resume(request)
    mode = _mode(request)
    num_chunks = _num_chunks(request, limits)
    width, height = _size(request, model, limits)
    num_steps, shortcut = _sampling(request.sampling, model, limits)
    text_scales, prev_scales = _guidance_scales(request.sampling, model)
    image = video = None
    if mode == "i2v":
        image = _media(request.image, "image", limits.max_image_bytes, limits, media.probe_image)
    if mode == "v2v":
        video = _media(
            request.prefix_video, "prefix_video", limits.max_video_bytes, limits, media.probe_mp4
        )
    return SessionParams(
        session_id=request.session_id,
        mode=mode,
        prompts=_timeline(request.timeline, num_chunks, limits),
        num_chunks=num_chunks,
        width=width,
        height=height,
        seed=_seed(request),
        num_steps=num_steps,
        shortcut_mode=shortcut,
        text_scales=text_scales,
        prev_chunk_scales=prev_scales,
        output_encoding=_encoding(request.output_encoding, width, height),
        image=image,
        video=video,
    )


def parse_detach_grace(request: pb.GenerateRequest, limits: Limits) -> float:
    """How long, in seconds, the session outlives a broken call (0: it is cancelled)."""
    grace, most = request.detach_grace_s, limits.max_detach_grace_s
    if grace == 0:
        return 0.0
    if not most:
        raise InvalidRequest(
            "detach_grace_s",
            f"{grace:g} s asked, but reattach is disabled on this server "
            "(--max-detach-grace-s 0); send 0",
        )
    if not 0 < grace <= most:  # NaN and infinities too
        raise InvalidRequest(
            "detach_grace_s", f"{grace:g} is not allowed; use 0 (no reattach) or up to {most:g} s"
        )
    return grace


# what a fork takes from its source: the fields a fork request must leave unset (the first
# four have presence; the others are unset when zero)
_FORK_INHERITS_PRESENT = ("image", "prefix_video", "seed", "sampling")
_FORK_INHERITS_SCALAR = ("mode", "num_chunks", "unbounded", "width_px", "height_px")


def _inherited_fields_given(request: pb.GenerateRequest) -> list[str]:
    """The fields a fork or a resume takes from its source that the request sets anyway."""
    given = [n for n in _FORK_INHERITS_PRESENT if request.HasField(n)]
    return given + [n for n in _FORK_INHERITS_SCALAR if getattr(request, n)]


def _parse_fork(request: pb.GenerateRequest, limits: Limits) -> SessionParams:
    """A fork as far as the edge can check it alone; `complete_fork` fills in its source."""
    given = _inherited_fields_given(request)
    if given:
        raise InvalidRequest(
            given[0],
            "a fork takes its source's size, seed, mode, sampling and length; leave "
            f"{given[0]} unset",
        )
    fork = request.fork
    if not SESSION_ID.fullmatch(fork.session_id):
        raise InvalidRequest(
            "fork.session_id", "name the session to fork: 1-64 characters of [A-Za-z0-9._-]"
        )
    prompts, previous = [], fork.at_chunk - 1
    if len(request.timeline) > limits.max_timeline_entries:
        raise InvalidRequest(
            "timeline", f"{len(request.timeline)} entries; at most {limits.max_timeline_entries}"
        )
    for i, entry in enumerate(request.timeline):
        where = f"timeline[{i}]"
        if entry.from_chunk <= previous:
            why = (
                f"is before the fork's at_chunk {fork.at_chunk}: a fork's timeline starts at its "
                "fork chunk or later (leave it empty to keep the source's)"
                if i == 0
                else f"must be greater than the previous entry's {previous}"
            )
            raise InvalidRequest(f"{where}.from_chunk", f"{entry.from_chunk} {why}")
        prompts.append((entry.from_chunk, _text(f"{where}.text", entry.text, limits)))
        previous = entry.from_chunk
    return SessionParams(
        session_id=request.session_id,
        prompts=tuple(prompts),
        num_chunks=None,  # the rest is the source's: complete_fork
        width=0,
        height=0,
        seed=None,
        output_encoding=request.output_encoding,
        fork=ForkSource(fork.session_id, fork.at_chunk),
    )


def _parse_resume(request: pb.GenerateRequest) -> SessionParams:
    """A resume as far as the edge can check it; `complete_resume` fills in the snapshot."""
    given = _inherited_fields_given(request) + (["timeline"] if request.timeline else [])
    if given:
        raise InvalidRequest(
            given[0],
            "a resume takes its snapshot's size, seed, mode, sampling, length and timeline; "
            f"leave {given[0]} unset (push prompts once it runs)",
        )
    if not RESUME_TOKEN.fullmatch(request.resume):  # (server/snapshots.py makes them)
        raise InvalidRequest(
            "resume",
            "not a resume token: SnapshotSession returns one (32 hex digits, a dot, 64 more)",
        )
    return SessionParams(
        session_id=request.session_id,
        prompts=(),
        num_chunks=None,
        width=0,
        height=0,
        seed=None,
        output_encoding=request.output_encoding,
        resume=request.resume,
    )


def complete_resume(params: SessionParams, meta: dict, data: bytes) -> SessionParams:
    """The resumed session's record from its snapshot's header (engine/snapshot_format.py)."""
    spec = meta["spec"]
    prefix = spec["prefix_chunks"]
    encoding = params.output_encoding or pb.OUTPUT_ENCODING_UNSPECIFIED
    return SessionParams(
        session_id=params.session_id,
        prompts=tuple((f - prefix, text) for f, text, _ in meta["timeline"]),
        num_chunks=spec["generated_total"],
        width=spec["width"],
        height=spec["height"],
        seed=spec["seed"],
        mode=spec["mode"],
        num_steps=spec["num_steps"],
        shortcut_mode=spec["shortcut_mode"],
        text_scales=_tuple_or_none(spec["text_scales"]),
        prev_chunk_scales=_tuple_or_none(spec["prev_chunk_scales"]),
        output_encoding=_encoding(encoding, spec["width"], spec["height"]),
        resume=data,
    )


def _tuple_or_none(value) -> tuple | None:
    return None if value is None else tuple(value)


def complete_fork(params: SessionParams, source: SessionParams) -> SessionParams:
    """The fork's record: its source's (as opened: `source.session_id` is the engine's key), its
    own id, timeline and output; the checks that need the source."""
    at, n = params.fork.at_chunk, source.num_chunks
    if n is not None and at >= n:
        raise InvalidRequest(
            "fork.at_chunk", f"{at} is past the source's last chunk; use 0..{n - 1}"
        )
    for i, (from_chunk, _) in enumerate(params.prompts):
        if n is not None and from_chunk >= n:
            raise InvalidRequest(
                f"timeline[{i}].from_chunk",
                f"{from_chunk} is past the last chunk; use {at}..{n - 1}",
            )
    encoding = params.output_encoding or pb.OUTPUT_ENCODING_UNSPECIFIED
    return dataclasses.replace(
        source,
        session_id=params.session_id,
        prompts=params.prompts,
        output_encoding=_encoding(encoding, source.width, source.height),
        image=None,
        video=None,
        fork=ForkSource(source.session_id, at),
    )


def _mode(request: pb.GenerateRequest) -> str:
    given = request.WhichOneof("prefix")
    inferred = {"image": "i2v", "prefix_video": "v2v", None: "t2v"}[given]
    if request.mode == pb.GENERATION_MODE_UNSPECIFIED:
        return inferred
    if request.mode not in MODES:
        raise InvalidRequest("mode", f"unknown mode {request.mode}; use T2V, I2V or V2V")
    mode = MODES[request.mode]
    if mode != inferred:
        need = {"t2v": "neither image nor prefix_video", "i2v": "image", "v2v": "prefix_video"}
        raise InvalidRequest(
            "mode",
            f"{mode.upper()} needs {need[mode]}, but the request has "
            f"{given or 'neither'}; set the matching input or leave mode unset",
        )
    return mode


def _num_chunks(request: pb.GenerateRequest, limits: Limits) -> int | None:
    """Bounded by default: num_chunks 1..max_chunks, or 0 with `unbounded` where allowed."""
    value, most = request.num_chunks, limits.max_chunks
    if request.unbounded:
        if value:
            raise InvalidRequest(
                "unbounded",
                f"an unbounded session runs until cancelled, but num_chunks is {value}; "
                "set num_chunks 0 or unbounded false",
            )
        if not limits.allow_unbounded:
            raise InvalidRequest(
                "unbounded",
                f"unbounded sessions are disabled on this server; set num_chunks 1..{most}",
            )
        return None
    if value == 0:
        unbounded = (
            ", or unbounded true to run until cancelled"
            if limits.allow_unbounded
            else " (unbounded sessions are disabled on this server)"
        )
        raise InvalidRequest("num_chunks", f"is unset (0); set num_chunks 1..{most}{unbounded}")
    if value > most:
        raise InvalidRequest("num_chunks", f"{value} is more than {most}; ask for 1..{most}")
    return value


def _seed(request: pb.GenerateRequest) -> int | None:
    if not request.HasField("seed"):
        return None
    if request.seed > MAX_SEED:
        raise InvalidRequest(
            "seed",
            f"{request.seed} is too large; use 0..{MAX_SEED} (2**63-1), or leave it unset and "
            "the server picks one",
        )
    return request.seed


def _size(request: pb.GenerateRequest, model: ServedModel, limits: Limits) -> tuple[int, int]:
    rc = model.config.runtime_config
    width = request.width_px or rc.video_size_w
    height = request.height_px or rc.video_size_h
    for name, value, most in (
        ("width_px", width, limits.max_width_px),
        ("height_px", height, limits.max_height_px),
    ):
        if value % SIZE_MULTIPLE_PX or not MIN_SIZE_PX <= value <= most:
            raise InvalidRequest(
                name,
                f"{value} is not allowed; use a multiple of "
                f"{SIZE_MULTIPLE_PX} in {MIN_SIZE_PX}..{most} (0 = {rc.video_size_w}"
                f"x{rc.video_size_h}, the model default)",
            )
    return width, height


def _sampling(sampling: pb.Sampling, model: ServedModel, limits: Limits) -> tuple[int, str]:
    rc, ec = model.config.runtime_config, model.config.engine_config
    steps = sampling.num_steps or rc.num_steps
    quantum = math.lcm(rc.window_size, len(rc.noise2clean_kvrange))
    if steps % quantum or not quantum <= steps <= limits.max_num_steps:
        raise InvalidRequest(
            "sampling.num_steps",
            f"{steps} is not allowed; use a multiple of "
            f"{quantum} in {quantum}..{limits.max_num_steps} (0 = {rc.num_steps})",
        )
    if sampling.shortcut_mode == pb.SHORTCUT_MODE_UNSPECIFIED:
        return steps, ec.shortcut_mode
    if sampling.shortcut_mode not in SHORTCUT_MODES:
        raise InvalidRequest(
            "sampling.shortcut_mode",
            f"unknown value {sampling.shortcut_mode}; use SHORTCUT_MODE_8_16_16 or "
            "SHORTCUT_MODE_16_16_8, or leave it UNSPECIFIED",
        )
    chosen = SHORTCUT_MODES[sampling.shortcut_mode]
    if chosen == ec.shortcut_mode:
        # the model's own, as ListModels and SessionParams report it: the same as UNSPECIFIED
        return steps, chosen
    if not ec.distill or steps != SHORTCUT_STEPS:
        raise InvalidRequest(
            "sampling.shortcut_mode",
            f"{chosen} applies only to distilled models at num_steps {SHORTCUT_STEPS}; leave "
            f"it UNSPECIFIED (this model uses {ec.shortcut_mode})",
        )
    return steps, chosen


def _guidance_scales(
    sampling: pb.Sampling, model: ServedModel
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Per-request CFG scales (one per cfg_t_range entry), or None for the model's."""
    rc = model.config.runtime_config
    return tuple(
        _guidance(f"sampling.{field}", list(getattr(sampling, field)), default, rc.cfg_number)
        for field, default in (
            ("text_guidance_scales", rc.text_scales),
            ("prev_chunk_guidance_scales", rc.prev_chunk_scales),
        )
    )


def _guidance(
    field: str, values: list[float], default: tuple[float, ...], cfg_number: int
) -> tuple[float, ...] | None:
    if not values:
        return None
    if _as_float32(values) == _as_float32(default):
        # the model's own scales (ListModels reports them, as float): the same as leaving it
        # empty, on every model, so its defaults sent back are always accepted
        return None
    if cfg_number != 3:
        raise InvalidRequest(
            field,
            "this model is distilled (one forward, no guidance); leave it empty or send the "
            "model's own (ListModels default_sampling)",
        )
    if len(values) != len(default) or not all(
        math.isfinite(v) and 0 <= v <= MAX_GUIDANCE_SCALE for v in values
    ):
        raise InvalidRequest(
            field,
            f"give {len(default)} finite values in 0..{MAX_GUIDANCE_SCALE:g}, one per "
            "cfg_t_range entry, or leave it empty",
        )
    return tuple(values)


def _as_float32(values) -> list[float]:
    """The values as the wire (proto float) and the engine (fp32 tensors) hold them."""
    return np.asarray(values, dtype=np.float32).tolist()


def _encoding(value: int, width: int, height: int) -> int:
    if value == pb.OUTPUT_ENCODING_UNSPECIFIED:
        return pb.OUTPUT_ENCODING_FMP4_H264
    if value not in (pb.OUTPUT_ENCODING_FMP4_H264, pb.OUTPUT_ENCODING_RAW_RGB24):
        raise InvalidRequest(
            "output_encoding", f"unknown value {value}; use FMP4_H264 or RAW_RGB24"
        )
    if value == pb.OUTPUT_ENCODING_RAW_RGB24:
        if width * height * 3 + RAW_FRAME_OVERHEAD_BYTES > GRPC_MESSAGE_BYTES:
            raise InvalidRequest(
                "output_encoding",
                f"a RAW_RGB24 frame of {width}x{height} "
                "exceeds gRPC's 4 MiB message limit; use FMP4_H264 or a "
                "smaller size",
            )
    return value


def _timeline(entries, num_chunks: int | None, limits: Limits) -> tuple[tuple[int, str], ...]:
    if not entries:
        raise InvalidRequest("timeline", "give at least one entry (from_chunk 0, the prompt)")
    if len(entries) > limits.max_timeline_entries:
        raise InvalidRequest(
            "timeline", f"{len(entries)} entries; at most {limits.max_timeline_entries}"
        )
    prompts, previous = [], -1
    for i, entry in enumerate(entries):
        where = f"timeline[{i}]"
        if i == 0 and entry.from_chunk != 0:
            raise InvalidRequest(f"{where}.from_chunk", "the first entry must start at chunk 0")
        if entry.from_chunk <= previous:
            raise InvalidRequest(
                f"{where}.from_chunk",
                f"{entry.from_chunk} must be greater than the previous entry's {previous}",
            )
        if num_chunks is not None and entry.from_chunk >= num_chunks:
            raise InvalidRequest(
                f"{where}.from_chunk",
                f"{entry.from_chunk} is past the last chunk; use 0..{num_chunks - 1}",
            )
        prompts.append((entry.from_chunk, _text(f"{where}.text", entry.text, limits)))
        previous = entry.from_chunk
    return tuple(prompts)


def _text(field: str, text: str, limits: Limits) -> str:
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest(field, f"{len(text)} characters; at most {limits.max_prompt_chars}")
    if not any(_visible(ch) for ch in text):
        raise InvalidRequest(
            field,
            "the prompt is empty (nothing but spaces or invisible characters); write the text",
        )
    return text


def _visible(ch: str) -> bool:
    return ch not in _INVISIBLE_CHARS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES


def _quote(value: str) -> str:
    """A client's string in an error message, cut short: a status message travels in a
    trailer, whose size gRPC limits (8 KiB by default)."""
    if len(value) <= QUOTED_CHARS:
        return repr(value)
    return f"{value[:QUOTED_CHARS]!r}... ({len(value)} characters)"


def _media(data: bytes, field: str, max_bytes: int, limits: Limits, probe) -> bytes:
    if not data:
        raise InvalidRequest(field, "is empty")
    if len(data) > max_bytes:
        raise InvalidRequest(field, f"{len(data)} bytes; at most {max_bytes}")
    try:
        size = probe(data)
    except media.MediaError as e:
        raise InvalidRequest(field, str(e)) from e
    width, height = size[-2:]
    if width * height > limits.max_input_pixels or not width or not height:
        raise InvalidRequest(
            field,
            f"{width}x{height} is not allowed; at most {limits.max_input_pixels} pixels per frame",
        )
    return data


def decode_inputs(
    spec: SessionParams, model: ServedModel, limits: Limits
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(image, video) pixels scaled to the request's size; runs in the thread pool."""
    try:
        if spec.image is not None:
            return media.decode_image(
                spec.image, spec.width, spec.height, limits.max_input_pixels
            ), None
        if spec.video is not None:
            return None, media.decode_video_tail(
                spec.video,
                spec.width,
                spec.height,
                limits.max_input_pixels,
                model.fps,
                V2V_PREFIX_FRAMES,
            )
    except media.MediaError as e:
        raise InvalidRequest("image" if spec.image is not None else "prefix_video", str(e)) from e
    return None, None


# ---- the other requests ----------------------------------------------------------------------


def parse_prompt_update(
    request: pb.PromptUpdate, limits: Limits, stream_session: str | None = None
) -> PromptSpec:
    """UpdatePrompt (stream_session None: session_id required) or an Interact prompt event."""
    session_id = _session_id(request.session_id, stream_session)
    return PromptSpec(
        session_id=session_id,
        text=_text("text", request.text, limits),
        from_chunk=request.from_chunk if request.HasField("from_chunk") else None,
        replace_later=request.replace_later,
    )


def parse_cancel(request: pb.CancelSessionRequest, stream_session: str | None = None) -> str:
    return _session_id(request.session_id, stream_session)


def parse_get_session(request: pb.GetSessionRequest) -> str:
    return _session_id(request.session_id, None)


def parse_snapshot(request: pb.SnapshotRequest) -> str:
    """One of the caller's own sessions (not OWNER/ID: a snapshot is its owner's alone)."""
    if not SESSION_ID.fullmatch(request.session_id):
        raise InvalidRequest("session_id", "must be 1-64 characters of [A-Za-z0-9._-]")
    return request.session_id


def parse_attach(request: pb.AttachRequest) -> tuple[str, int]:
    """(session id, first chunk): only the owner attaches, so the id is a plain one."""
    if not SESSION_ID.fullmatch(request.session_id):
        raise InvalidRequest(
            "session_id", "name the session to attach to: 1-64 characters of [A-Za-z0-9._-]"
        )
    return request.session_id, request.from_chunk


def parse_client_event(event: pb.ClientEvent, first: bool) -> str:
    """The kind of an Interact event; `start` exactly once, first."""
    kind = event.WhichOneof("event")
    if kind is None:
        raise InvalidRequest("event", "a ClientEvent must set start, prompt or cancel")
    if first and kind != "start":
        raise InvalidRequest("event", f"the first ClientEvent must be start, got {kind}")
    if not first and kind == "start":
        raise InvalidRequest(
            "start",
            "a session is already running on this stream; send "
            "prompt or cancel, or open a new Interact call",
        )
    return kind


def _session_id(value: str, stream_session: str | None) -> str:
    if stream_session is not None:
        if value and value != stream_session:
            raise InvalidRequest(
                "session_id",
                f"{_quote(value)} is not this stream's session {stream_session!r}; leave it empty",
            )
        return stream_session
    if not value:
        raise InvalidRequest("session_id", "is required")
    if not OWNED_SESSION_ID.fullmatch(value):
        raise InvalidRequest(
            "session_id",
            "must be 1-64 characters of [A-Za-z0-9._-] (an admin may prefix the owner: OWNER/ID)",
        )
    return value
