"""What a caller sets: how to connect, how to retry, and what to generate.

Plain frozen dataclasses so the sync and asyncio clients, the CLI and the tests build requests
from the same values (client.requests turns them into proto messages).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The server's rule for client-chosen ids (proto: GenerateRequest.session_id).
SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE before a call's first response; never after it.

    A stream that already streamed is not restarted: that would silently start a second session
    with fresh noise, and the caller would get a video spliced from two runs. It is resumed
    instead when the server ends it with a resume token (a replica draining on SIGTERM): the
    snapshot continues the same session bit for bit, so the video stays one run.
    """

    max_attempts: int = 5  # tries in all, the first included; 1 = no retry
    initial_backoff_s: float = 0.5  # wait before the second try, seconds
    max_backoff_s: float = 8.0  # cap on one wait, seconds
    multiplier: float = 2.0  # each wait is this times the previous one
    # +- this fraction of each wait is drawn at random, so clients that lost the same server
    # do not come back in lockstep
    jitter: float = 0.2
    # how long a stream that ended with a resume token keeps trying to resume, seconds, with
    # the backoff above but no cap on attempts (a drained replica refuses until its
    # replacement is up); 0 = never resume on its own (MagiError.resume_token says how)
    resume_for_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("need multiplier >= 1 and 0 <= jitter < 1")
        if not 0 <= self.resume_for_s < float("inf"):
            raise ValueError(f"resume_for_s must be >= 0 seconds, got {self.resume_for_s}")

    def delays_s(
        self, rand: Callable[[], float] = random.random, unbounded: bool = False
    ) -> Iterator[float]:
        """The wait before each retry, seconds: max_attempts - 1 values, then exhausted
        (`unbounded`: without end, for a caller that stops on a clock instead)."""
        base = self.initial_backoff_s
        tries = itertools.count() if unbounded else range(self.max_attempts - 1)
        for _ in tries:
            yield base * (1 + self.jitter * (2 * rand() - 1))
            base = min(base * self.multiplier, self.max_backoff_s)


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel; every file is PEM. No TlsOptions at all = plaintext."""

    ca_file: Path | None = None  # roots to trust; None = the system's roots
    cert_file: Path | None = None  # client certificate for mutual TLS (needs key_file)
    key_file: Path | None = None  # the client certificate's private key
    server_name: str | None = None  # name to check the server's certificate against

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")


@dataclass(frozen=True)
class ConnectOptions:
    """Where the server is and how every call to it is made."""

    target: str  # HOST:PORT, or any gRPC target string
    tls: TlsOptions | None = None  # None = plaintext
    token: str | None = None  # sent as `authorization: Bearer <token>` on every call
    unary_timeout_s: float = 30.0  # deadline of each unary call, seconds
    # deadline of a whole stream, seconds, retries included; None = none, since a long
    # (or unbounded) video may stream for hours
    stream_timeout_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # receive limit, bytes: an fMP4 chunk of a large, noisy video can pass gRPC's 4 MiB default
    max_receive_bytes: int = 64 << 20
    # where resumes go (a stream broken with a resume token is continued there); None = the
    # same target, which behind a router (deploy/nginx) reaches another replica. The stream's
    # unary calls (push_prompt, cancel, status) still go to `target`.
    resume_target: str | None = None

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target is empty; give HOST:PORT")
        if self.unary_timeout_s <= 0 or (self.stream_timeout_s or 1) <= 0:
            raise ValueError("timeouts must be > 0 seconds")


@dataclass(frozen=True)
class GenerateOptions:
    """One session's request. Zero / None / empty means "the server's default" as in the proto.

    Checks here are the ones that need no server (shape of the timeline, exclusive inputs); the
    server checks the rest (sizes, step counts) and its INVALID_ARGUMENT says what to change.
    """

    # (from_chunk, text): the first at chunk 0, from_chunk strictly increasing
    prompts: tuple[tuple[int, str], ...]
    chunks: int = 1  # num_chunks, 1 or more (at most the server's ModelInfo.max_chunks)
    width: int = 0  # pixels; 0 = model default
    height: int = 0  # pixels; 0 = model default
    seed: int | None = None  # None = the server picks one (reported in Started.params)
    steps: int = 0  # Euler steps per chunk; 0 = model default
    model: str = ""  # a ListModels name; empty = the server's default
    image: bytes | None = None  # I2V: a JPEG or PNG
    video: bytes | None = None  # V2V: an MP4 to continue
    raw: bool = False  # RAW_RGB24 frames instead of server-encoded fragmented MP4
    session_id: str = ""  # client-chosen id; empty = the server assigns one
    # run until cancelled instead of `chunks` chunks (chunks is then 0: leave it at its
    # default); refused unless the server allows it (ModelInfo.unbounded_allowed)
    unbounded: bool = False
    # Fork: continue your session `fork_of` from its chunk `fork_at`; the new session takes the
    # source's size, seed, sampling, mode and length (leave those at their defaults), and
    # `prompts` are its own from fork_at on (empty: the source's). `GenerateOptions.fork(...)`
    fork_of: str = ""
    fork_at: int = 0
    # seconds the session outlives a broken call, paused, for `attach` to resume it; 0 = a
    # broken call cancels it (at most the server's --max-detach-grace-s)
    detach_grace_s: float = 0.0
    # Resume: a `snapshot(...)` token; the session continues from its snapshot with the
    # snapshot's settings and prompts (leave the rest at their defaults).
    # `GenerateOptions.resume(token)`
    resume_token: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple((int(c), str(t)) for c, t in self.prompts))
        if not 0 <= self.detach_grace_s < float("inf"):
            raise ValueError(f"detach_grace_s must be >= 0 seconds, got {self.detach_grace_s}")
        if self.fork_of and self.resume_token:
            raise ValueError("a session forks or resumes, not both")
        if self.fork_of or self.resume_token:
            self._check_fork()
            return
        if self.unbounded:
            if self.chunks not in (0, 1):
                raise ValueError(
                    f"an unbounded session runs until cancelled; drop chunks={self.chunks} "
                    "or unbounded=True"
                )
            object.__setattr__(self, "chunks", 0)
        elif self.chunks < 1:
            raise ValueError(
                f"chunks must be >= 1, got {self.chunks} (or unbounded=True to run until cancelled)"
            )
        check_timeline(self.prompts, self.chunks)
        for name in ("width", "height", "steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise ValueError(f"seed must be in 0..2**64-1, got {self.seed}")
        if self.image is not None and self.video is not None:
            raise ValueError("give an image (I2V) or a video (V2V), not both")
        if self.session_id and not SESSION_ID.fullmatch(self.session_id):
            raise ValueError("session_id must be 1-64 characters of [A-Za-z0-9._-]")

    def _check_fork(self) -> None:
        """A fork or a resume: the settings are the source's (the snapshot's)."""
        what = "a fork" if self.fork_of else "a resume"
        if self.resume_token and self.prompts:
            raise ValueError("a resume keeps its snapshot's prompts; push new ones once it runs")
        if self.fork_of and not SESSION_ID.fullmatch(self.fork_of):
            raise ValueError("fork_of must be a session id: 1-64 characters of [A-Za-z0-9._-]")
        if self.fork_at < 0:
            raise ValueError(f"fork_at must be >= 0, got {self.fork_at}")
        inherited = dict(width=0, height=0, seed=None, steps=0, image=None, video=None)
        inherited.update(unbounded=False)
        given = [k for k, v in inherited.items() if getattr(self, k) != v]
        if self.chunks not in (0, 1):
            given.insert(0, "chunks")
        if given:
            raise ValueError(
                f"{what} takes its source's size, seed, sampling, mode and length; drop {given[0]}"
            )
        object.__setattr__(self, "chunks", 0)
        previous = self.fork_at - 1
        for chunk, text in self.prompts:
            if chunk <= previous:
                raise ValueError(
                    f"a fork's prompts start at its chunk {self.fork_at} and increase; "
                    f"got chunk {chunk}"
                )
            if not text.strip():
                raise ValueError(f"the prompt at chunk {chunk} is empty")
            previous = chunk
        if self.session_id and not SESSION_ID.fullmatch(self.session_id):
            raise ValueError("session_id must be 1-64 characters of [A-Za-z0-9._-]")

    @classmethod
    def fork(
        cls, source: str, at_chunk: int, prompts: tuple[tuple[int, str], ...] = (), **fields
    ) -> GenerateOptions:
        """Continue your session `source` from chunk `at_chunk`, with its own prompts from there
        (none: the source's). Rewind = fork, then cancel the source."""
        return cls(prompts=prompts, fork_of=source, fork_at=at_chunk, **fields)

    @classmethod
    def resume(cls, token: str, **fields) -> GenerateOptions:
        """Continue a session from its snapshot (`snapshot(...)`'s token), on any replica that
        shares the server's snapshot store; it streams from the token's `from_chunk` on."""
        return cls(prompts=(), resume_token=token, **fields)

    @classmethod
    def of(cls, prompt: str, **fields) -> GenerateOptions:
        """One prompt for the whole video: `GenerateOptions.of("a red ball rolls", chunks=4)`."""
        return cls(prompts=((0, prompt),), **fields)


def check_timeline(prompts: tuple[tuple[int, str], ...], chunks: int) -> None:
    if not prompts:
        raise ValueError("give a prompt (it steers the video from chunk 0)")
    if prompts[0][0] != 0:
        raise ValueError(f"the first prompt must start at chunk 0, not {prompts[0][0]}")
    previous = -1
    for chunk, text in prompts:
        if chunk <= previous:
            raise ValueError(f"prompt chunks must increase: {chunk} comes after {previous}")
        if chunks and chunk >= chunks:
            raise ValueError(f"a prompt at chunk {chunk} is past the last chunk ({chunks - 1})")
        if not text.strip():
            raise ValueError(f"the prompt at chunk {chunk} is empty")
        previous = chunk


def connect_options(target: ConnectOptions | str) -> ConnectOptions:
    """A bare target string means plaintext with every other default."""
    return target if isinstance(target, ConnectOptions) else ConnectOptions(target=target)


def generate_options(options: GenerateOptions | str, fields: dict) -> GenerateOptions:
    """What `generate(...)` / `interact(...)` accept: GenerateOptions, or a prompt and fields."""
    if isinstance(options, GenerateOptions):
        if fields:
            raise TypeError("pass either GenerateOptions or a prompt with keyword fields")
        return options
    return GenerateOptions.of(options, **fields)
