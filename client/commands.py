"""The CLI's commands on the asyncio client: one coroutine each, returning the exit code.

Output: the session line, prompt acks and the closing summary go to stdout (for scripts);
progress, errors and notes go to stderr.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from client.aio import AsyncClient, AsyncGenerateStream, AsyncInteractStream
from client.events import STATE_NAMES, Ack, MagiError, Started
from client.exits import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCAL,
    EXIT_OK,
    EXIT_USAGE,
    exit_code,
    report,
)
from client.options import ConnectOptions, GenerateOptions
from client.progress import Progress
from client.writers import ChunkWriter, Fmp4Writer, NpyWriter, PngWriter, RawMp4Writer
from proto import video_generation_pb2 as pb

CANCEL_TIMEOUT_S = 5.0  # how long Ctrl-C waits for CancelSession before breaking the stream


def out(text: str) -> None:
    print(text, flush=True)


def err(text: str) -> None:
    print(f"magi-client: {text}", file=sys.stderr, flush=True)


# ---- generate and live -----------------------------------------------------------------------


@dataclass(frozen=True)
class StreamPlan:
    """A checked generate / live command (client.cli builds it): what to ask for and where to
    write it."""

    # None: live waits for its first prompt on stdin; attach sends none (the session has one)
    options: GenerateOptions | None
    out: Path
    raw_dir: Path | None
    raw_format: str
    chunks: int
    fields: dict  # GenerateOptions fields other than prompts (live builds it later)


async def generate(connect: ConnectOptions, plan: StreamPlan) -> int:
    async with AsyncClient(connect) as client:
        return await _run_stream(client, client.generate(plan.options), plan, feed=None)


async def attach(
    connect: ConnectOptions, plan: StreamPlan, session_id: str, from_chunk: int
) -> int:
    """Your session whose stream broke, streamed again from `from_chunk` into a new file."""
    async with AsyncClient(connect) as client:
        stream = client.attach(session_id, from_chunk)
        return await _run_stream(client, stream, plan, feed=None)


async def live(connect: ConnectOptions, plan: StreamPlan) -> int:
    lines = StdinLines(asyncio.get_running_loop())
    options = plan.options
    if options is None:  # no --prompt: the first typed line starts the video
        first = await _first_prompt(lines)
        if first is None:
            err("error: no prompt: give --prompt or type one on standard input")
            return EXIT_USAGE
        options = GenerateOptions(prompts=((0, first),), **plan.fields)
    async with AsyncClient(connect) as client:
        stream = client.interact(options)
        ending = LiveEnding()
        return await _run_stream(
            client,
            stream,
            plan,
            feed=lambda: _push_lines(stream, lines, plan.chunks, ending),
            ending=ending,
        )


@dataclass
class LiveEnding:
    by_input: bool = False  # unbounded live session cancelled because its input ended


async def _run_stream(
    client: AsyncClient,
    stream: AsyncGenerateStream | AsyncInteractStream,
    plan: StreamPlan,
    feed: Callable[[], Awaitable[None]] | None,
    ending: LiveEnding | None = None,
) -> int:
    # live: plain lines even on a terminal, since a redrawn bar would overwrite what is typed
    tty = feed is None and sys.stderr.isatty()
    progress = Progress(sys.stderr, tty, plan.chunks)
    writers: list[ChunkWriter] = []
    pusher: asyncio.Task | None = None
    sigint = SigintCancels(asyncio.current_task())
    started: Started | None = None
    next_chunk: int | None = None  # after the last chunk written
    try:
        started = await stream.start()
        out(describe(started))
        writers = open_writers(plan, started)
        if feed is not None:
            pusher = asyncio.create_task(feed())
        async for item in stream:
            if isinstance(item, Ack):
                progress.note(describe_ack(item), to=sys.stdout)
                continue
            for writer in writers:
                writer.write(item)
            progress.chunk(item)
            next_chunk = item.index + 1
    except MagiError as e:
        progress.close()
        if progress.chunks:
            out(_summary(plan, progress))
        code = report(e)
        if started is not None and stream.finished is None and not e.resume_token:
            _attach_hint(started.session_id, _grace_s(plan), next_chunk)
        return code
    except WrongEncoding as e:  # attach: the session chose its encoding when it started
        err(f"error: {e}")
        return EXIT_USAGE  # the call breaks (finally): a session with a grace waits again
    except OSError as e:
        progress.close()
        err(f"cannot write the output: {e}")
        await _cancel(client, stream)
        return EXIT_LOCAL
    except asyncio.CancelledError:
        if not sigint.fired:
            raise
        asyncio.current_task().uncancel()  # handled: later awaits must run normally
        progress.close()
        await _cancel(client, stream)
        out(f"interrupted: {_summary(plan, progress)}")
        return EXIT_INTERRUPTED
    finally:
        sigint.remove()
        if pusher is not None:
            pusher.cancel()
        _close(writers, plan, progress)
        stream.close()
    progress.close()
    return _finish(stream, plan, progress, ending)


def _grace_s(plan: StreamPlan) -> float:
    """The detach grace the command asked for (attach: none of its own to say)."""
    if plan.options is not None:
        return plan.options.detach_grace_s
    return float(plan.fields.get("detach_grace_s", 0.0))


def _attach_hint(session_id: str, grace_s: float, next_chunk: int | None) -> None:
    """The call broke before the session ended: with a grace it now waits, paused, for an
    Attach; say how to write the rest."""
    if grace_s <= 0:
        return
    start = "" if next_chunk is None else f" --from {next_chunk}"
    err(
        f"session {session_id} waits up to {grace_s:g} s for the rest to be fetched: "
        f"magi-client attach {session_id}{start} --out REST.mp4"
    )


def _close(writers: list[ChunkWriter], plan: StreamPlan, progress: Progress) -> None:
    for writer in writers:
        writer.close()
    if writers and progress.chunks == 0:
        plan.out.unlink(missing_ok=True)  # an empty .mp4 plays nowhere; leave none


def _summary(plan: StreamPlan, progress: Progress) -> str:
    if progress.chunks == 0:
        return "no chunk arrived; no video written"
    return f"partial video {plan.out} ({progress.chunks} chunks, {progress.frames} frames)"


def _finish(stream, plan: StreamPlan, progress: Progress, ending: LiveEnding | None) -> int:
    finished = stream.finished
    summary = f"{plan.out} ({progress.chunks} chunks, {progress.frames} frames)"
    if finished is None:
        err("UNKNOWN: the stream ended without its `finished` event")
        return EXIT_FAILED
    if finished.state == "FINISHED" or (
        ending and ending.by_input and finished.state == "CANCELLED"
    ):
        out(f"wrote {summary}")
        return EXIT_OK
    err(
        f"session {stream.session_id} ended {finished.state}: {finished.code.name}: "
        f"{finished.message}"
    )
    out(_summary(plan, progress))
    return exit_code(finished.code) if finished.state == "FAILED" else EXIT_FAILED


async def _cancel(client: AsyncClient, stream) -> None:
    """Cancels the session on the server, then breaks the stream (which alone would also
    cancel it, but this way the user learns the session's state)."""
    session_id = stream.session_id
    if session_id is None:
        stream.close()  # not started yet: breaking the call is all there is
        return
    try:
        state = await asyncio.wait_for(client.cancel(session_id), CANCEL_TIMEOUT_S)
        err(f"session {session_id}: {state}")
    except (MagiError, TimeoutError) as e:
        err(f"CancelSession {session_id} failed ({e}); the broken stream cancels it")
    finally:
        stream.close()


class SigintCancels:
    """Ctrl-C cancels the given task once (the task then cancels the session and closes the
    file); a second Ctrl-C during that clean-up is ignored, as it lasts at most a few
    seconds."""

    def __init__(self, task: asyncio.Task) -> None:
        self.fired = False
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGINT, self._fire)

    def _fire(self) -> None:
        if not self.fired:
            self.fired = True
            self._task.cancel()

    def remove(self) -> None:
        self._loop.remove_signal_handler(signal.SIGINT)


class WrongEncoding(ValueError):
    """--raw DIR for a session that streams fMP4 (attach: the session's start chose)."""


def open_writers(plan: StreamPlan, started: Started) -> list[ChunkWriter]:
    """Writers for the stream's encoding: generate / fork / resume asked for it (--raw); an
    attached session streams the one it started with."""
    raw = started.params.output_encoding == pb.OUTPUT_ENCODING_RAW_RGB24
    if not raw:
        if plan.raw_dir is not None:
            raise WrongEncoding(
                f"session {started.session_id} streams H.264 fMP4 (it was started without "
                "--raw): drop --raw"
            )
        return [Fmp4Writer(plan.out)]
    if plan.raw_dir is None:  # attach to a raw session without --raw: the video only
        return [RawMp4Writer(plan.out)]
    frames = PngWriter(plan.raw_dir) if plan.raw_format == "png" else NpyWriter(plan.raw_dir)
    return [RawMp4Writer(plan.out), frames]


def describe(started: Started) -> str:
    p = started.params
    chunks = p.num_chunks or "unbounded"
    queued = f", queued at {started.queue_position}" if started.queue_position else ""
    return (
        f"session {started.session_id}: {p.model} {p.width_px}x{p.height_px}, {p.fps} fps, "
        f"{chunks} chunks, {p.sampling.num_steps} steps, seed {p.seed}{queued}"
    )


def describe_ack(ack: Ack) -> str:
    if ack.accepted:
        return f"prompt v{ack.version} steers from chunk {ack.from_chunk}: {ack.text!r}"
    return f"prompt not applied ({ack.rejection}): {ack.text!r}"


# ---- live input ------------------------------------------------------------------------------


class StdinLines:
    """Standard input's lines, read by a daemon thread (a blocked read must not keep the
    process alive at exit, and asyncio cannot watch a regular file or every kind of tty)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=self._read, name="stdin-lines", daemon=True).start()

    def _read(self) -> None:
        try:
            while line := sys.stdin.readline():
                self._put(line.rstrip("\r\n"))
        finally:
            self._put(None)

    def _put(self, item: str | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the command has ended
            pass

    async def get(self) -> str | None:
        """The next line; None at end of input."""
        return await self._queue.get()


def parse_live_line(line: str) -> tuple[int | None, str] | None:
    """'text' -> (None, text): as soon as possible; '@N text' -> (N, text); blank -> None."""
    line = line.strip()
    if not line:
        return None
    head, _, rest = line.partition(" ")
    if head.startswith("@") and head[1:].isdigit() and rest.strip():
        return int(head[1:]), rest.strip()
    return None, line


async def _first_prompt(lines: StdinLines) -> str | None:
    while (line := await lines.get()) is not None:
        parsed = parse_live_line(line)
        if parsed is not None:
            return parsed[1]
    return None


async def _push_lines(
    stream: AsyncInteractStream, lines: StdinLines, chunks: int, ending: LiveEnding
) -> None:
    while (line := await lines.get()) is not None:
        parsed = parse_live_line(line)
        if parsed is None:
            continue
        try:
            await stream.push_prompt(parsed[1], from_chunk=parsed[0])
        except MagiError as e:
            err(f"prompt not sent: {e}")
            return
    try:
        if chunks == 0:  # unbounded: the end of input is the only way a pipe can end it
            ending.by_input = True
            await stream.cancel()
        else:  # the session runs on to its last chunk
            await stream.done_writing()
    except MagiError as e:
        err(f"could not end the input: {e}")


# ---- unary commands ----------------------------------------------------------------------------


async def models(connect: ConnectOptions, as_json: bool) -> int:
    async with AsyncClient(connect) as client:
        try:
            reply = await client.list_models()
        except MagiError as e:
            return report(e)
    if as_json:
        out(json_format.MessageToJson(reply))
        return EXIT_OK
    for m in reply.models:
        r = m.resolution
        default = " (default)" if m.name == reply.default_model else ""
        modes = ",".join(
            pb.GenerationMode.Name(x).removeprefix("GENERATION_MODE_").lower() for x in m.modes
        )
        out(
            f"{m.name}{default}: preset {m.preset or '-'}, {modes}, "
            f"{r.default_width_px}x{r.default_height_px} (sizes {r.min_width_px}x"
            f"{r.min_height_px}..{r.max_width_px}x{r.max_height_px}, multiples of "
            f"{r.multiple_of_px}), {m.fps} fps, {m.frames_per_chunk} frames/chunk, "
            f"{m.default_sampling.num_steps} steps, window {m.window_size}, cfg {m.cfg_number}"
            + f", chunks 1..{m.max_chunks}"
            + (" or unbounded" if m.unbounded_allowed else "")
            + (", distill" if m.distill else "")
            + (", fp8" if m.fp8_quant else "")
        )
    return EXIT_OK


async def sessions(connect: ConnectOptions, as_json: bool) -> int:
    """One line per session: id, state, owner, chunks streamed."""
    async with AsyncClient(connect) as client:
        try:
            listed = await client.list_sessions()
        except MagiError as e:
            return report(e)
    if as_json:
        out(json_format.MessageToJson(pb.ListSessionsResponse(sessions=listed)))
        return EXIT_OK
    for info in listed:
        total = info.params.num_chunks or "unbounded"
        out(
            f"{info.session_id} {STATE_NAMES.get(info.state, info.state)} owner {info.owner} "
            f"chunks {info.stats.chunks_done}/{total}"
        )
    return EXIT_OK


async def snapshot(connect: ConnectOptions, session_id: str) -> int:
    async with AsyncClient(connect) as client:
        try:
            taken = await client.snapshot(session_id)
        except MagiError as e:
            return report(e)
    out(f"snapshot {taken.token}")
    out(
        f"session {session_id} at its chunk boundary ({taken.size_bytes} bytes); "
        f"`magi-client resume` streams from chunk {taken.from_chunk}"
    )
    return EXIT_OK


async def status(connect: ConnectOptions, session_id: str, as_json: bool) -> int:
    async with AsyncClient(connect) as client:
        try:
            info = await client.get_session(session_id)
        except MagiError as e:
            return report(e)
    if as_json:
        out(json_format.MessageToJson(info))
        return EXIT_OK
    s = info.stats
    out(f"session {info.session_id}: {STATE_NAMES.get(info.state, info.state)}")
    out(
        f"  chunks {s.chunks_done}/{info.params.num_chunks or 'unbounded'}, "
        f"{s.frames_done} frames, {s.wall_time_s:.1f} s, first chunk after "
        f"{s.time_to_first_chunk_s:.1f} s"
    )
    if info.queue_position:
        out(f"  queued at {info.queue_position}")
    out(f"  prompt v{info.prompt_version}, next steerable chunk {info.next_steerable_chunk}")
    for entry in info.timeline:
        out(f"  from chunk {entry.from_chunk}: v{entry.version} {entry.text!r}")
    out(f"  {describe_fork_history(info)}")
    if info.HasField("detached"):  # its call broke: it waits, paused, for an Attach
        d = info.detached
        left_s = max(d.attach_by_unix_ms / 1000 - time.time(), 0.0)
        out(
            f"  detached: attach within {left_s:.0f} s, from chunk {d.from_chunk}..{d.next_chunk}"
            f" (magi-client attach {info.session_id} --from {d.from_chunk})"
        )
    if info.status_code or info.status_message:
        out(f"  status {info.status_code}: {info.status_message}")
    return EXIT_OK


def describe_fork_history(info: pb.SessionInfo, now_unix_s: float | None = None) -> str:
    """Where `magi-client fork SESSION --at K` can continue it now."""
    if not info.HasField("fork_history"):
        return "forkable at no chunk (none held)"
    h = info.fork_history
    text = f"forkable at chunks {h.first_chunk}..{h.last_chunk}"
    if h.held_until_unix_ms:  # ended: the server drops the history then (or sooner)
        now_unix_s = time.time() if now_unix_s is None else now_unix_s
        left_s = max(h.held_until_unix_ms / 1000 - now_unix_s, 0.0)
        text += f" for {left_s:.0f} s more"
    return text


async def cancel(connect: ConnectOptions, session_id: str) -> int:
    async with AsyncClient(connect) as client:
        try:
            state = await client.cancel(session_id)
        except MagiError as e:
            return report(e)
    out(f"session {session_id}: {state}")
    return EXIT_OK
