"""magi-client: generate, live, fork, attach, snapshot, resume, models, status and cancel.

Exit codes: 0 done; 2 bad arguments (found before any call); 3 the server refused (its status
code and message are printed as it gave them); 4 connection or stream failure; 1 a local
failure while writing; 130 interrupted (Ctrl-C; the session is cancelled on the server and the
output holds every chunk that arrived).

Arguments are checked and inputs read before a channel is opened, so a usage error never
reaches the server. Environment variables are read here only.

This module is the CLI's top: it imports client.commands (the calls), and both import
client.exits (the exit codes); nothing imports back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from client import commands
from client.commands import StreamPlan
from client.exits import EXIT_USAGE
from client.options import ConnectOptions, GenerateOptions, RetryPolicy, TlsOptions

DEFAULT_SERVER = "localhost:50051"


class UsageError(ValueError):
    """A bad argument found before any call; exit 2."""


# ---- arguments -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magi-client", description=__doc__.split("\n\n")[0])
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _connection_parser()
    gen = subcommands.add_parser("generate", parents=[conn], help="generate a video into a file")
    _generation_args(gen, live=False)
    live = subcommands.add_parser(
        "live",
        parents=[conn],
        help="generate while reading prompts from standard input",
        description="Each input line is pushed as a prompt as soon as it is typed; '@N text' "
        "steers from chunk N. Without --prompt the first line starts the video.",
    )
    _generation_args(live, live=True)
    fork = subcommands.add_parser(
        "fork",
        parents=[conn],
        help="continue one of your sessions from a recent chunk, into a file",
        description="The fork takes the session's size, seed and length and streams from chunk "
        "K on; its chunks equal the session's while their prompts agree. Rewind: fork, then "
        "`cancel` the session.",
    )
    fork.add_argument("session", metavar="SESSION", help="the session to continue")
    fork.add_argument(
        "--at", type=int, required=True, metavar="K", help="the chunk it continues from"
    )
    fork.add_argument("--prompt", metavar="TEXT", help="a new prompt from chunk K on")
    fork.add_argument(
        "--prompt-at",
        action="append",
        default=[],
        metavar="CHUNK:TEXT",
        help="a new prompt from chunk CHUNK (>= K) on (repeatable); none: the session's prompts",
    )
    fork.add_argument("--session-id", default="", metavar="ID", help="choose the fork's id")
    _output_args(fork)
    attach = subcommands.add_parser(
        "attach",
        parents=[conn],
        help="stream one of your sessions again after its call broke, into a file",
        description="For a session started with --detach-grace-s whose stream broke: within "
        "the grace it waits, paused, and this writes its chunks from K on (the server keeps "
        "the last 4 it sent; the rest follow live). Its encoding is the one it started with.",
    )
    attach.add_argument("session", metavar="SESSION", help="the session to stream again")
    attach.add_argument(
        "--from",
        dest="from_chunk",
        type=int,
        default=0,
        metavar="K",
        help="the first chunk to write: one the server still keeps, or the next to come "
        "(default 0; if it is no longer kept the server names those that are)",
    )
    _output_args(attach)
    snap = subcommands.add_parser(
        "snapshot",
        parents=[conn],
        help="write one of your sessions to the server's snapshot store; prints the token",
    )
    snap.add_argument("session", metavar="SESSION")
    resume = subcommands.add_parser(
        "resume",
        parents=[conn],
        help="continue a session from a snapshot token, into a file",
        description="On any replica that shares the server's snapshot store and serves the "
        "same model; it streams from the chunk `snapshot` printed, bit for bit.",
    )
    resume.add_argument("token", metavar="TOKEN")
    resume.add_argument("--session-id", default="", metavar="ID", help="choose its id")
    _output_args(resume)
    models = subcommands.add_parser("models", parents=[conn], help="list the served models")
    models.add_argument("--json", action="store_true", help="print the reply as JSON")
    sessions = subcommands.add_parser(
        "sessions", parents=[conn], help="list your sessions (an admin: everyone's)"
    )
    sessions.add_argument("--json", action="store_true", help="print the reply as JSON")
    status = subcommands.add_parser("status", parents=[conn], help="show a session")
    status.add_argument("session", metavar="SESSION")
    status.add_argument("--json", action="store_true", help="print the reply as JSON")
    cancel = subcommands.add_parser("cancel", parents=[conn], help="cancel a session")
    cancel.add_argument("session", metavar="SESSION")
    return parser


def _connection_parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    g = conn.add_argument_group("connection")
    g.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"server address (env MAGISTREAM_SERVER; default {DEFAULT_SERVER})",
    )
    g.add_argument("--tls", action="store_true", help="use TLS (implied by --ca/--cert)")
    g.add_argument("--ca", type=Path, metavar="PEM", help="CA certificates to trust")
    g.add_argument("--cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    g.add_argument("--key", type=Path, metavar="PEM", help="client certificate's private key")
    g.add_argument("--server-name", metavar="NAME", help="name to check the certificate for")
    g.add_argument("--token", help="bearer token (env MAGISTREAM_TOKEN keeps it out of ps)")
    g.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="deadline of each unary call, seconds (default 30)",
    )
    g.add_argument(
        "--deadline",
        type=float,
        metavar="S",
        help="deadline of the whole stream, seconds (default none)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=4,
        metavar="N",
        help="retries of UNAVAILABLE before the first event (default 4)",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log each call's retries")
    return conn


def _generation_args(p: argparse.ArgumentParser, live: bool) -> None:
    chunk0 = "" if live else " (or give chunk 0 in --prompt-at / --prompts)"
    p.add_argument("--prompt", metavar="TEXT", help="the prompt from chunk 0" + chunk0)
    p.add_argument(
        "--prompt-at",
        action="append",
        default=[],
        metavar="CHUNK:TEXT",
        help="a prompt from chunk CHUNK on (repeatable)",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE.json",
        help='{"0": "text", "3": "text"} or [{"chunk": 0, "text": "..."}, ...]',
    )
    _request_args(p, live)
    _output_args(p)


def _request_args(p: argparse.ArgumentParser, live: bool) -> None:
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", type=Path, metavar="FILE", help="I2V: start from this image")
    media.add_argument("--video", type=Path, metavar="FILE", help="V2V: continue this MP4")
    until = "Ctrl-C or end of input" if live else "Ctrl-C"
    length = p.add_mutually_exclusive_group(required=not live)
    length.add_argument(
        "--chunks", type=int, metavar="N", help="chunks of 24 frames, 1 or more (or --unbounded)"
    )
    length.add_argument(
        "--unbounded",
        action="store_true",
        help=f"run until {until} (the server must allow it: `models` says)",
    )
    p.add_argument("--width", type=int, default=0, metavar="W", help="pixels (model default)")
    p.add_argument("--height", type=int, default=0, metavar="H", help="pixels (model default)")
    p.add_argument("--seed", type=int, metavar="S", help="noise seed (server picks one)")
    p.add_argument("--steps", type=int, default=0, metavar="N", help="Euler steps per chunk")
    p.add_argument("--model", default="", help="a `models` name (the server's default)")
    p.add_argument("--session-id", default="", metavar="ID", help="choose the session id")
    p.add_argument(
        "--detach-grace-s",
        type=float,
        default=0.0,
        metavar="S",
        help="if the stream breaks, keep the session paused this long for `attach` "
        "(default 0: a broken stream cancels it)",
    )


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.mp4",
        help="the video; it grows chunk by chunk and plays at every point",
    )
    p.add_argument(
        "--raw",
        type=Path,
        metavar="DIR",
        help="ask for raw frames, write them to DIR and encode --out here",
    )
    p.add_argument(
        "--raw-format",
        choices=("png", "npy"),
        default="png",
        help="DIR/frame_NNNNNN.png per frame or DIR/chunk_NNNN.npy per chunk",
    )


def prepare_stream(args: argparse.Namespace, live: bool) -> StreamPlan:
    """Every local check of generate / live; raises UsageError."""
    if not args.unbounded and args.chunks is None:  # live: the group is optional for argparse
        raise UsageError("give --chunks N (1 or more), or --unbounded to run until cancelled")
    if not args.unbounded and args.chunks < 1:
        raise UsageError(
            f"--chunks must be >= 1, got {args.chunks} (or --unbounded to run until cancelled)"
        )
    chunks = 0 if args.unbounded else args.chunks
    _check_out(args.out)
    fields = dict(
        chunks=chunks,
        unbounded=args.unbounded,
        width=args.width,
        height=args.height,
        seed=args.seed,
        steps=args.steps,
        model=args.model,
        raw=args.raw is not None,
        session_id=args.session_id,
        detach_grace_s=args.detach_grace_s,
        image=_read_input(args.image, "--image"),
        video=_read_input(args.video, "--video"),
    )
    prompts = collect_prompts(args.prompt, args.prompt_at, args.prompts)
    options = None
    try:
        if prompts or not live:
            options = GenerateOptions(prompts=prompts, **fields)
        else:
            GenerateOptions(prompts=((0, "placeholder"),), **fields)  # check the rest now
    except ValueError as e:
        raise UsageError(str(e)) from None
    return StreamPlan(options, args.out, args.raw, args.raw_format, chunks, fields)


def prepare_fork(args: argparse.Namespace) -> StreamPlan:
    """Every local check of fork; raises UsageError."""
    _check_out(args.out)
    if args.at < 0:
        raise UsageError(f"--at must be >= 0, got {args.at}")
    prompts = [] if args.prompt is None else [(args.at, args.prompt)]
    prompts += collect_prompts(None, args.prompt_at, None)
    if len({c for c, _ in prompts}) < len(prompts):
        raise UsageError(f"--prompt already steers chunk {args.at}; drop one of the two")
    try:
        options = GenerateOptions.fork(
            args.session,
            args.at,
            tuple(sorted(prompts)),
            raw=args.raw is not None,
            session_id=args.session_id,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    return StreamPlan(options, args.out, args.raw, args.raw_format, 0, {})


def prepare_resume(args: argparse.Namespace) -> StreamPlan:
    """Every local check of resume; raises UsageError."""
    _check_out(args.out)
    try:
        options = GenerateOptions.resume(
            args.token, raw=args.raw is not None, session_id=args.session_id
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    return StreamPlan(options, args.out, args.raw, args.raw_format, 0, {})


def prepare_attach(args: argparse.Namespace) -> StreamPlan:
    """Every local check of attach; raises UsageError."""
    _check_out(args.out)
    if args.from_chunk < 0:
        raise UsageError(f"--from must be >= 0, got {args.from_chunk}")
    return StreamPlan(None, args.out, args.raw, args.raw_format, 0, {})


def collect_prompts(
    prompt: str | None, prompt_at: list[str], prompts_file: Path | None
) -> tuple[tuple[int, str], ...]:
    """--prompt, --prompt-at and --prompts merged into one timeline sorted by chunk."""
    entries: list[tuple[int, str, str]] = []  # (chunk, text, where it came from)
    if prompt is not None:
        entries.append((0, prompt, "--prompt"))
    for spec in prompt_at:
        chunk, sep, text = spec.partition(":")
        if not sep or not chunk.strip().isdigit():
            raise UsageError(f"--prompt-at {spec!r}: use CHUNK:TEXT, e.g. 3:the ball falls")
        entries.append((int(chunk), text, f"--prompt-at {spec!r}"))
    if prompts_file is not None:
        entries += [(c, t, str(prompts_file)) for c, t in read_prompts_file(prompts_file)]
    seen: dict[int, str] = {}
    for chunk, _, where in entries:
        if chunk in seen:
            raise UsageError(f"two prompts for chunk {chunk}: {seen[chunk]} and {where}")
        seen[chunk] = where
    return tuple((c, t) for c, t, _ in sorted(entries, key=lambda e: e[0]))


def read_prompts_file(path: Path) -> list[tuple[int, str]]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"--prompts {path}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"--prompts {path}: not JSON ({e})") from None
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list) and all(isinstance(item, dict) for item in data):
        pairs = [(item.get("chunk", item.get("from_chunk")), item.get("text")) for item in data]
    else:
        raise UsageError(
            f'--prompts {path}: give {{"CHUNK": "text", ...}} or '
            '[{"chunk": CHUNK, "text": "..."}, ...]'
        )
    out = []
    for chunk, text in pairs:
        if not str(chunk).isdigit() or not isinstance(text, str):
            raise UsageError(
                f"--prompts {path}: each entry needs a chunk number and a text, "
                f"got {chunk!r}: {text!r}"
            )
        out.append((int(chunk), text))
    return out


def _read_input(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from None


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as out.mp4")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")


def connect_from(args: argparse.Namespace) -> ConnectOptions:
    tls = None
    if args.tls or args.ca or args.cert or args.key or args.server_name:
        tls = TlsOptions(
            ca_file=args.ca, cert_file=args.cert, key_file=args.key, server_name=args.server_name
        )
    if args.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {args.retries}")
    return ConnectOptions(
        target=args.server or os.environ.get("MAGISTREAM_SERVER") or DEFAULT_SERVER,
        tls=tls,
        token=args.token or os.environ.get("MAGISTREAM_TOKEN") or None,
        unary_timeout_s=args.timeout,
        stream_timeout_s=args.deadline,
        retry=RetryPolicy(max_attempts=args.retries + 1),
    )


# ---- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    _logging(args.verbose)
    try:
        for path in (args.ca, args.cert, args.key):
            if path is not None and not path.is_file():
                raise UsageError(f"{path}: no such file")
        connect = connect_from(args)
        plan = None
        if args.command in ("generate", "live"):
            plan = prepare_stream(args, live=args.command == "live")
        if args.command == "fork":
            plan = prepare_fork(args)
        if args.command == "resume":
            plan = prepare_resume(args)
        if args.command == "attach":
            plan = prepare_attach(args)
    except (UsageError, ValueError) as e:
        print(f"magi-client: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_run(args, connect, plan))


async def _run(args: argparse.Namespace, connect: ConnectOptions, plan: StreamPlan | None) -> int:
    if args.command in ("generate", "fork", "resume"):
        return await commands.generate(connect, plan)
    if args.command == "attach":
        return await commands.attach(connect, plan, args.session, args.from_chunk)
    if args.command == "snapshot":
        return await commands.snapshot(connect, args.session)
    if args.command == "live":
        return await commands.live(connect, plan)
    if args.command == "models":
        return await commands.models(connect, args.json)
    if args.command == "status":
        return await commands.status(connect, args.session, args.json)
    if args.command == "sessions":
        return await commands.sessions(connect, args.json)
    return await commands.cancel(connect, args.session)


def _logging(verbose: bool) -> None:
    log = logging.getLogger("client")
    if not log.handlers:  # main() may run more than once in a process (tests, embedding)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("magi-client: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
