"""Server configuration: frozen dataclasses built once by the entry point from flags and env."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.launch import GroupConfig, WorkerConfig  # noqa: F401  (re-exported for callers)

# gRPC's default receive limit on clients; a RAW_RGB24 frame must fit in one message.
GRPC_MESSAGE_BYTES = 4 << 20
# What the server may send: an fMP4 chunk of noisy 720p content can pass 4 MiB, and a Chunk
# event cannot be split, so clients streaming large sizes raise their receive limit to this.
MAX_SEND_BYTES = 64 << 20
RAW_FRAME_OVERHEAD_BYTES = 1024  # the RawFrame fields around the pixels, generously


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; checked at the edge before anything is decoded."""

    max_width_px: int = 1280  # output width, pixels
    max_height_px: int = 1280  # output height, pixels
    # chunks per session a request may ask for; a deployment that wants longer videos raises it
    max_chunks: int = 256
    allow_unbounded: bool = False  # whether GenerateRequest.unbounded (until cancelled) is served
    max_prompt_chars: int = 2000  # characters per prompt text
    max_timeline_entries: int = 256  # entries in a request's prompt timeline
    max_image_bytes: int = 16 << 20  # encoded i2v image, bytes
    max_video_bytes: int = 64 << 20  # encoded v2v prefix video, bytes
    max_input_pixels: int = 7680 * 4320  # width x height of an input image / video frame
    max_num_steps: int = 256  # Euler steps per chunk a request may ask for
    # seconds a session may outlive its broken call (GenerateRequest.detach_grace_s); 0 = none
    max_detach_grace_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_chunks < 1 << 32:
            raise ValueError(
                f"max_chunks must be in 1..{(1 << 32) - 1}, got {self.max_chunks} (0 no longer "
                "means no cap: raise it for longer videos, or allow unbounded sessions)"
            )
        for name, value in self.__dict__.items():
            if not isinstance(value, bool) and value <= 0 and name != "max_detach_grace_s":
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 <= self.max_detach_grace_s < float("inf"):  # NaN too
            raise ValueError(
                f"max_detach_grace_s must be >= 0 seconds (0: no reattach), got "
                f"{self.max_detach_grace_s}"
            )
        if self.max_width_px % 16 or self.max_height_px % 16:
            raise ValueError("max width and height must be multiples of 16")


REFLECTION_MODES = ("auth", "open", "off")


@dataclass(frozen=True)
class Security:
    """Who may call (server/auth.py decides each call from this)."""

    tls_cert: Path | None = None  # PEM certificate chain: TLS on the gRPC and metrics ports
    tls_key: Path | None = None  # its private key
    tls_client_ca: Path | None = None  # PEM CA bundle: clients need a certificate it signed
    auth_tokens: Path | None = None  # `TOKEN PRINCIPAL` lines; callers send a bearer token
    admin_principals: tuple[str, ...] = ("admin",)  # may see, list and cancel any session
    # may read the metrics port and nothing else (admins may read it too; nobody else may)
    metrics_principals: tuple[str, ...] = ("prometheus",)
    insecure: bool = False  # no credentials, and still serve non-loopback clients
    reflection: str = "auth"  # auth: like the service; open: without credentials; off
    principal_max_sessions: int = 0  # sessions a principal may have open; 0 = no own cap
    principal_max_queued: int = 0  # its requests waiting for one of those; more are refused

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.reflection not in REFLECTION_MODES:
            raise ValueError(f"--reflection must be one of {', '.join(REFLECTION_MODES)}")
        if self.principal_max_sessions < 0 or self.principal_max_queued < 0:
            raise ValueError("--principal-max-sessions and --principal-max-queued must be >= 0")
        if self.insecure and self.credentials_configured:
            raise ValueError("--insecure is for a server without credentials; drop it")

    @property
    def credentials_configured(self) -> bool:
        return self.auth_tokens is not None or self.tls_client_ca is not None


@dataclass(frozen=True)
class ServerConfig:
    """The whole server process."""

    worker: WorkerConfig
    model_name: str  # the name clients pass as GenerateRequest.model
    host: str = "0.0.0.0"  # gRPC bind address
    port: int = 50051  # gRPC port; 0 = pick a free one
    metrics_host: str = "0.0.0.0"  # Prometheus bind address
    metrics_port: int = 9400  # Prometheus port; 0 = pick a free one
    # The HTTP port: the playground page and the WebSocket realtime API (server/web.py)
    http_host: str | None = None  # its bind address; None = the gRPC host
    http_port: int | None = None  # None = off; 0 = pick a free one
    http_origins: tuple[str, ...] = ()  # page origins besides its own that may open a WebSocket
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    grace_period_s: float = 30.0  # on SIGTERM, how long running sessions may go on
    session_ttl_s: float = 300.0  # how long an ended session stays visible to GetSession
    heartbeat_timeout_s: float = 30.0  # silence after which the worker counts as hung
    startup_timeout_s: float = 300.0  # how long a request waits for a (re)starting worker
    decode_threads: int = 2  # thread pool decoding request images and prefix videos
    decode_queue: int = 8  # decodes running or waiting; one more is RESOURCE_EXHAUSTED
    encode_threads: int = 2  # thread pool encoding output chunks (never shared with decoding)
    snapshot_dir: str | None = None  # the snapshot store: a path or fsspec URL; None = off
    snapshot_every: int = 0  # write each session to the store every N chunks; 0 = never

    def __post_init__(self) -> None:
        ports = (self.port, self.metrics_port, self.http_port or 0)
        if not all(0 <= p < 65536 for p in ports):
            raise ValueError("ports must be in 0..65535")
        if self.grace_period_s < 0 or self.session_ttl_s < 0:
            raise ValueError("grace period and session ttl must be >= 0")
        if self.snapshot_every < 0:
            raise ValueError(f"--snapshot-every must be >= 0, got {self.snapshot_every}")
        if self.snapshot_every and self.snapshot_dir is None:
            raise ValueError("--snapshot-every writes to the snapshot store: set --snapshot-dir")
        if self.decode_threads < 1 or self.encode_threads < 1:
            raise ValueError("decode_threads and encode_threads must be >= 1")
        if self.decode_queue < self.decode_threads:
            raise ValueError("decode_queue must be >= decode_threads")
        if self.heartbeat_timeout_s <= self.worker.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed the heartbeat interval")


def resolve_model(value: str, cache_dir: Path) -> tuple[str, Path, str | None]:
    """(name, folder, preset to write there first) for --model: a model folder, the embedded
    trained `toy` model (shipped in the repository's models/), or a preset with embedded random
    weights (`tiny*`), kept under cache_dir/models/<preset>."""
    from model.config import EMBEDDED, PRESETS, CheckpointError, embedded_folder

    embedded = ", ".join([*EMBEDDED, *(p for p in PRESETS if p.startswith("tiny"))])
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {value}: the folder has no config.json (not a model folder)")
        return path.resolve().name, path.resolve(), None
    if value in EMBEDDED:
        try:
            return value, embedded_folder(value), None
        except CheckpointError as e:
            raise ValueError(f"--model {value}: {e}") from e
    if value in PRESETS:
        if not value.startswith("tiny"):
            raise ValueError(
                f"--model {value}: this preset has no embedded weights; download the official "
                f"checkpoint and pass its folder (embedded: {embedded})"
            )
        folder = cache_dir / "models" / value
        return value, folder, None if (folder / "config.json").is_file() else value
    raise ValueError(
        f"--model {value!r} is neither a model folder nor a preset; presets with embedded "
        f"weights: {embedded}"
    )
