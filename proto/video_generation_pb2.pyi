from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATION_MODE_UNSPECIFIED: _ClassVar[GenerationMode]
    GENERATION_MODE_T2V: _ClassVar[GenerationMode]
    GENERATION_MODE_I2V: _ClassVar[GenerationMode]
    GENERATION_MODE_V2V: _ClassVar[GenerationMode]

class OutputEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_ENCODING_UNSPECIFIED: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_FMP4_H264: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_RAW_RGB24: _ClassVar[OutputEncoding]

class ShortcutMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHORTCUT_MODE_UNSPECIFIED: _ClassVar[ShortcutMode]
    SHORTCUT_MODE_8_16_16: _ClassVar[ShortcutMode]
    SHORTCUT_MODE_16_16_8: _ClassVar[ShortcutMode]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_QUEUED: _ClassVar[SessionState]
    SESSION_STATE_RUNNING: _ClassVar[SessionState]
    SESSION_STATE_FINISHED: _ClassVar[SessionState]
    SESSION_STATE_CANCELLED: _ClassVar[SessionState]
    SESSION_STATE_FAILED: _ClassVar[SessionState]
GENERATION_MODE_UNSPECIFIED: GenerationMode
GENERATION_MODE_T2V: GenerationMode
GENERATION_MODE_I2V: GenerationMode
GENERATION_MODE_V2V: GenerationMode
OUTPUT_ENCODING_UNSPECIFIED: OutputEncoding
OUTPUT_ENCODING_FMP4_H264: OutputEncoding
OUTPUT_ENCODING_RAW_RGB24: OutputEncoding
SHORTCUT_MODE_UNSPECIFIED: ShortcutMode
SHORTCUT_MODE_8_16_16: ShortcutMode
SHORTCUT_MODE_16_16_8: ShortcutMode
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_QUEUED: SessionState
SESSION_STATE_RUNNING: SessionState
SESSION_STATE_FINISHED: SessionState
SESSION_STATE_CANCELLED: SessionState
SESSION_STATE_FAILED: SessionState

class GenerateRequest(_message.Message):
    __slots__ = ("model", "mode", "timeline", "image", "prefix_video", "num_chunks", "width_px", "height_px", "seed", "sampling", "output_encoding", "session_id", "unbounded", "fork", "detach_grace_s", "resume")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_VIDEO_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    UNBOUNDED_FIELD_NUMBER: _ClassVar[int]
    FORK_FIELD_NUMBER: _ClassVar[int]
    DETACH_GRACE_S_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    model: str
    mode: GenerationMode
    timeline: _containers.RepeatedCompositeFieldContainer[TimelineEntry]
    image: bytes
    prefix_video: bytes
    num_chunks: int
    width_px: int
    height_px: int
    seed: int
    sampling: Sampling
    output_encoding: OutputEncoding
    session_id: str
    unbounded: bool
    fork: ForkSource
    detach_grace_s: float
    resume: str
    def __init__(self, model: _Optional[str] = ..., mode: _Optional[_Union[GenerationMode, str]] = ..., timeline: _Optional[_Iterable[_Union[TimelineEntry, _Mapping]]] = ..., image: _Optional[bytes] = ..., prefix_video: _Optional[bytes] = ..., num_chunks: _Optional[int] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., seed: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., output_encoding: _Optional[_Union[OutputEncoding, str]] = ..., session_id: _Optional[str] = ..., unbounded: _Optional[bool] = ..., fork: _Optional[_Union[ForkSource, _Mapping]] = ..., detach_grace_s: _Optional[float] = ..., resume: _Optional[str] = ...) -> None: ...

class ForkSource(_message.Message):
    __slots__ = ("session_id", "at_chunk")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    at_chunk: int
    def __init__(self, session_id: _Optional[str] = ..., at_chunk: _Optional[int] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("num_steps", "text_guidance_scales", "prev_chunk_guidance_scales", "shortcut_mode")
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    TEXT_GUIDANCE_SCALES_FIELD_NUMBER: _ClassVar[int]
    PREV_CHUNK_GUIDANCE_SCALES_FIELD_NUMBER: _ClassVar[int]
    SHORTCUT_MODE_FIELD_NUMBER: _ClassVar[int]
    num_steps: int
    text_guidance_scales: _containers.RepeatedScalarFieldContainer[float]
    prev_chunk_guidance_scales: _containers.RepeatedScalarFieldContainer[float]
    shortcut_mode: ShortcutMode
    def __init__(self, num_steps: _Optional[int] = ..., text_guidance_scales: _Optional[_Iterable[float]] = ..., prev_chunk_guidance_scales: _Optional[_Iterable[float]] = ..., shortcut_mode: _Optional[_Union[ShortcutMode, str]] = ...) -> None: ...

class TimelineEntry(_message.Message):
    __slots__ = ("from_chunk", "text", "version")
    FROM_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    from_chunk: int
    text: str
    version: int
    def __init__(self, from_chunk: _Optional[int] = ..., text: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PromptUpdate(_message.Message):
    __slots__ = ("session_id", "text", "from_chunk", "replace_later")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_FIELD_NUMBER: _ClassVar[int]
    REPLACE_LATER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    from_chunk: int
    replace_later: bool
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., from_chunk: _Optional[int] = ..., replace_later: _Optional[bool] = ...) -> None: ...

class CancelSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("token", "from_chunk", "size_bytes")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    token: str
    from_chunk: int
    size_bytes: int
    def __init__(self, token: _Optional[str] = ..., from_chunk: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("session_id", "from_chunk")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    from_chunk: int
    def __init__(self, session_id: _Optional[str] = ..., from_chunk: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class ClientEvent(_message.Message):
    __slots__ = ("start", "prompt", "cancel")
    START_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    start: GenerateRequest
    prompt: PromptUpdate
    cancel: CancelSessionRequest
    def __init__(self, start: _Optional[_Union[GenerateRequest, _Mapping]] = ..., prompt: _Optional[_Union[PromptUpdate, _Mapping]] = ..., cancel: _Optional[_Union[CancelSessionRequest, _Mapping]] = ...) -> None: ...

class PromptAck(_message.Message):
    __slots__ = ("session_id", "prompt_version", "from_chunk", "rejection")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_version: int
    from_chunk: int
    rejection: str
    def __init__(self, session_id: _Optional[str] = ..., prompt_version: _Optional[int] = ..., from_chunk: _Optional[int] = ..., rejection: _Optional[str] = ...) -> None: ...

class CancelSessionResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    def __init__(self, state: _Optional[_Union[SessionState, str]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("started", "chunk", "frame", "prompt_ack", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ACK_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    chunk: Chunk
    frame: RawFrame
    prompt_ack: PromptAck
    finished: SessionFinished
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., frame: _Optional[_Union[RawFrame, _Mapping]] = ..., prompt_ack: _Optional[_Union[PromptAck, _Mapping]] = ..., finished: _Optional[_Union[SessionFinished, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "params", "queue_position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    params: SessionParams
    queue_position: int
    def __init__(self, session_id: _Optional[str] = ..., params: _Optional[_Union[SessionParams, _Mapping]] = ..., queue_position: _Optional[int] = ...) -> None: ...

class SessionParams(_message.Message):
    __slots__ = ("model", "mode", "num_chunks", "width_px", "height_px", "fps", "frames_per_chunk", "seed", "sampling", "cfg_number", "output_encoding", "timeline", "fork")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CFG_NUMBER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    FORK_FIELD_NUMBER: _ClassVar[int]
    model: str
    mode: GenerationMode
    num_chunks: int
    width_px: int
    height_px: int
    fps: int
    frames_per_chunk: int
    seed: int
    sampling: Sampling
    cfg_number: int
    output_encoding: OutputEncoding
    timeline: _containers.RepeatedCompositeFieldContainer[TimelineEntry]
    fork: ForkSource
    def __init__(self, model: _Optional[str] = ..., mode: _Optional[_Union[GenerationMode, str]] = ..., num_chunks: _Optional[int] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., fps: _Optional[int] = ..., frames_per_chunk: _Optional[int] = ..., seed: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., cfg_number: _Optional[int] = ..., output_encoding: _Optional[_Union[OutputEncoding, str]] = ..., timeline: _Optional[_Iterable[_Union[TimelineEntry, _Mapping]]] = ..., fork: _Optional[_Union[ForkSource, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("chunk_index", "first_frame_index", "frame_count", "width_px", "height_px", "fps", "prompt_text", "prompt_version", "timings", "init_segment", "media_segment", "init_segment_size", "media_segment_size")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    INIT_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    INIT_SEGMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_SEGMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    first_frame_index: int
    frame_count: int
    width_px: int
    height_px: int
    fps: int
    prompt_text: str
    prompt_version: int
    timings: ChunkTimings
    init_segment: bytes
    media_segment: bytes
    init_segment_size: int
    media_segment_size: int
    def __init__(self, chunk_index: _Optional[int] = ..., first_frame_index: _Optional[int] = ..., frame_count: _Optional[int] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., fps: _Optional[int] = ..., prompt_text: _Optional[str] = ..., prompt_version: _Optional[int] = ..., timings: _Optional[_Union[ChunkTimings, _Mapping]] = ..., init_segment: _Optional[bytes] = ..., media_segment: _Optional[bytes] = ..., init_segment_size: _Optional[int] = ..., media_segment_size: _Optional[int] = ...) -> None: ...

class ChunkTimings(_message.Message):
    __slots__ = ("queue_ms", "denoise_ms", "decode_ms", "encode_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    denoise_ms: float
    decode_ms: float
    encode_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., denoise_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ...) -> None: ...

class RawFrame(_message.Message):
    __slots__ = ("chunk_index", "frame_index", "last_in_chunk", "rgb24")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_IN_CHUNK_FIELD_NUMBER: _ClassVar[int]
    RGB24_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    frame_index: int
    last_in_chunk: bool
    rgb24: bytes
    def __init__(self, chunk_index: _Optional[int] = ..., frame_index: _Optional[int] = ..., last_in_chunk: _Optional[bool] = ..., rgb24: _Optional[bytes] = ...) -> None: ...

class SessionFinished(_message.Message):
    __slots__ = ("state", "status_code", "status_message", "stats")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    status_code: int
    status_message: str
    stats: SessionStats
    def __init__(self, state: _Optional[_Union[SessionState, str]] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ..., stats: _Optional[_Union[SessionStats, _Mapping]] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("chunks_done", "frames_done", "wall_time_s", "time_to_first_chunk_s")
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_CHUNK_S_FIELD_NUMBER: _ClassVar[int]
    chunks_done: int
    frames_done: int
    wall_time_s: float
    time_to_first_chunk_s: float
    def __init__(self, chunks_done: _Optional[int] = ..., frames_done: _Optional[int] = ..., wall_time_s: _Optional[float] = ..., time_to_first_chunk_s: _Optional[float] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "state", "queue_position", "stats", "prompt_version", "timeline", "next_steerable_chunk", "params", "status_code", "status_message", "owner", "worker_memory", "fork_history", "detached")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEERABLE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    WORKER_MEMORY_FIELD_NUMBER: _ClassVar[int]
    FORK_HISTORY_FIELD_NUMBER: _ClassVar[int]
    DETACHED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: SessionState
    queue_position: int
    stats: SessionStats
    prompt_version: int
    timeline: _containers.RepeatedCompositeFieldContainer[TimelineEntry]
    next_steerable_chunk: int
    params: SessionParams
    status_code: int
    status_message: str
    owner: str
    worker_memory: DeviceMemory
    fork_history: ForkHistory
    detached: Detached
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[_Union[SessionState, str]] = ..., queue_position: _Optional[int] = ..., stats: _Optional[_Union[SessionStats, _Mapping]] = ..., prompt_version: _Optional[int] = ..., timeline: _Optional[_Iterable[_Union[TimelineEntry, _Mapping]]] = ..., next_steerable_chunk: _Optional[int] = ..., params: _Optional[_Union[SessionParams, _Mapping]] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ..., owner: _Optional[str] = ..., worker_memory: _Optional[_Union[DeviceMemory, _Mapping]] = ..., fork_history: _Optional[_Union[ForkHistory, _Mapping]] = ..., detached: _Optional[_Union[Detached, _Mapping]] = ...) -> None: ...

class Detached(_message.Message):
    __slots__ = ("attach_by_unix_ms", "from_chunk", "next_chunk")
    ATTACH_BY_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    attach_by_unix_ms: int
    from_chunk: int
    next_chunk: int
    def __init__(self, attach_by_unix_ms: _Optional[int] = ..., from_chunk: _Optional[int] = ..., next_chunk: _Optional[int] = ...) -> None: ...

class ForkHistory(_message.Message):
    __slots__ = ("first_chunk", "last_chunk", "held_until_unix_ms")
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    HELD_UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    first_chunk: int
    last_chunk: int
    held_until_unix_ms: int
    def __init__(self, first_chunk: _Optional[int] = ..., last_chunk: _Optional[int] = ..., held_until_unix_ms: _Optional[int] = ...) -> None: ...

class DeviceMemory(_message.Message):
    __slots__ = ("device", "total_bytes", "free_bytes", "allocated_bytes", "reserved_bytes", "worker_resident_bytes", "budget_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKER_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    total_bytes: int
    free_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    worker_resident_bytes: int
    budget_bytes: int
    def __init__(self, device: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., worker_resident_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "preset", "distill", "fp8_quant", "cfg_number", "default_sampling", "cfg_t_range", "resolution", "fps", "frames_per_chunk", "window_size", "modes", "max_chunks", "unbounded_allowed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    FP8_QUANT_FIELD_NUMBER: _ClassVar[int]
    CFG_NUMBER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CFG_T_RANGE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    UNBOUNDED_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    name: str
    preset: str
    distill: bool
    fp8_quant: bool
    cfg_number: int
    default_sampling: Sampling
    cfg_t_range: _containers.RepeatedScalarFieldContainer[float]
    resolution: ResolutionLimits
    fps: int
    frames_per_chunk: int
    window_size: int
    modes: _containers.RepeatedScalarFieldContainer[GenerationMode]
    max_chunks: int
    unbounded_allowed: bool
    def __init__(self, name: _Optional[str] = ..., preset: _Optional[str] = ..., distill: _Optional[bool] = ..., fp8_quant: _Optional[bool] = ..., cfg_number: _Optional[int] = ..., default_sampling: _Optional[_Union[Sampling, _Mapping]] = ..., cfg_t_range: _Optional[_Iterable[float]] = ..., resolution: _Optional[_Union[ResolutionLimits, _Mapping]] = ..., fps: _Optional[int] = ..., frames_per_chunk: _Optional[int] = ..., window_size: _Optional[int] = ..., modes: _Optional[_Iterable[_Union[GenerationMode, str]]] = ..., max_chunks: _Optional[int] = ..., unbounded_allowed: _Optional[bool] = ...) -> None: ...

class ResolutionLimits(_message.Message):
    __slots__ = ("default_width_px", "default_height_px", "min_width_px", "min_height_px", "max_width_px", "max_height_px", "multiple_of_px", "max_pixels_per_frame")
    DEFAULT_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    MIN_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    MIN_HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    MULTIPLE_OF_PX_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    default_width_px: int
    default_height_px: int
    min_width_px: int
    min_height_px: int
    max_width_px: int
    max_height_px: int
    multiple_of_px: int
    max_pixels_per_frame: int
    def __init__(self, default_width_px: _Optional[int] = ..., default_height_px: _Optional[int] = ..., min_width_px: _Optional[int] = ..., min_height_px: _Optional[int] = ..., max_width_px: _Optional[int] = ..., max_height_px: _Optional[int] = ..., multiple_of_px: _Optional[int] = ..., max_pixels_per_frame: _Optional[int] = ...) -> None: ...
