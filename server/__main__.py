"""`magi-server` (`python -m server`): the gRPC video-generation server.

Every flag also reads an environment variable, MAGISTREAM_<FLAG> (for example
MAGISTREAM_MAX_SESSIONS for --max-sessions); a flag on the command line wins. The worker-group
flags --nnodes, --node-rank, --master-addr and --master-port also read torch.distributed's
standard NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT when their MAGISTREAM_ variable is not
set. This is the only module that reads the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import Security, ServerConfig
    from server.encode import VideoEncoding
    from server.validation import ServedModel

_FLAGS: tuple[tuple[str, Callable[[str], object], object, str], ...] = (
    ("--model", str, "toy", "a model folder, or an embedded model: toy (trained), tiny* (random)"),
    ("--host", str, "0.0.0.0", "gRPC bind address"),
    ("--port", int, 50051, "gRPC port; 0 = pick a free one (printed as 'listening on H:P')"),
    ("--metrics-host", str, "0.0.0.0", "Prometheus bind address"),
    ("--metrics-port", int, 9400, "Prometheus port; 0 = pick one (printed as 'metrics on H:P')"),
    (
        "--http-port",
        int,
        -1,
        "HTTP port of the playground page and the WebSocket realtime API (/v1/realtime); -1 = "
        "off, 0 = pick one (printed as 'http on H:P')",
    ),
    ("--http-host", str, "", "HTTP bind address; empty = the gRPC --host"),
    (
        "--http-origins",
        str,
        "",
        "comma-separated page origins (https://app.example) besides the server's own that may "
        "open the realtime WebSocket",
    ),
    (
        "--device",
        str,
        "auto",
        "where the engine runs: auto (cuda:<local rank> when CUDA is there, else cpu), cpu, "
        "cuda or cuda:N",
    ),
    ("--world-size", int, 1, "worker ranks in the group, all nodes together (one per GPU)"),
    ("--nnodes", int, 1, "hosts the group spans; each runs world-size / nnodes ranks"),
    ("--node-rank", int, 0, "this host's index; 0 runs rank 0 and serves, others followers"),
    ("--master-addr", str, "127.0.0.1", "host of node 0, where the ranks meet"),
    ("--master-port", int, 0, "rendezvous port on node 0; 0 = a free one (one host only)"),
    (
        "--group-timeout-s",
        float,
        60.0,
        "collective timeout of the group: how long a lost or hung rank can stall the others",
    ),
    (
        "--group-join-timeout-s",
        float,
        600.0,
        "how long ranks wait for each other to start and to load the model",
    ),
    ("--max-sessions", int, 8, "sessions generating at once"),
    ("--queue-size", int, 16, "sessions waiting for admission; one more is refused"),
    (
        "--memory-budget-mb",
        int,
        0,
        "KV cache + latent memory of all sessions, MiB; 0 = on CUDA the free memory after "
        "loading less --memory-reserve-mb, on CPU 8192; on CUDA a set budget is capped by that",
    ),
    (
        "--memory-reserve-mb",
        int,
        2048,
        "CUDA: device memory kept back from admission (activations, VAE decode), MiB",
    ),
    ("--max-chunk-slots", int, 512, "chunk slots per forward (CFG branches count)"),
    ("--max-width", int, 1280, "largest output width, pixels"),
    ("--max-height", int, 1280, "largest output height, pixels"),
    ("--max-chunks", int, 256, "most chunks a session may ask for (1 or more)"),
    ("--allow-unbounded", int, 0, "1: serve GenerateRequest.unbounded (runs until cancelled)"),
    ("--max-prompt-chars", int, 2000, "longest prompt, characters"),
    ("--max-image-bytes", int, 16 << 20, "largest i2v image, bytes"),
    ("--max-video-bytes", int, 64 << 20, "largest v2v prefix video, bytes"),
    (
        "--max-pixels",
        int,
        7680 * 4320,
        "largest input image / video frame, pixels (checked from the header before decoding)",
    ),
    ("--tls-cert", str, "", "PEM certificate chain: serve TLS on the gRPC and metrics ports"),
    ("--tls-key", str, "", "PEM private key of --tls-cert"),
    (
        "--tls-client-ca",
        str,
        "",
        "PEM CA bundle: mutual TLS, clients need a certificate it signed (its common name is "
        "the principal)",
    ),
    (
        "--auth-tokens",
        str,
        "",
        "file of `TOKEN PRINCIPAL` lines; callers send `authorization: Bearer TOKEN` (reloaded "
        "when it changes and on SIGHUP, like the certificates)",
    ),
    ("--admin-principals", str, "admin", "comma-separated principals that control every session"),
    (
        "--metrics-principals",
        str,
        "prometheus",
        "comma-separated principals that may read the metrics port and call nothing else "
        "(admins may read it too)",
    ),
    (
        "--insecure",
        int,
        0,
        "1: with no credentials configured, serve every address (default: loopback only)",
    ),
    ("--reflection", str, "auth", "server reflection: auth (needs credentials), open or off"),
    ("--principal-max-sessions", int, 0, "sessions one principal may have open; 0 = no cap"),
    ("--principal-max-queued", int, 0, "a principal's requests waiting beyond those; more refused"),
    ("--grace-period-s", float, 30.0, "on SIGTERM, how long running sessions may finish"),
    ("--session-ttl-s", float, 300.0, "how long GetSession shows an ended session"),
    (
        "--max-detach-grace-s",
        float,
        300.0,
        "longest GenerateRequest.detach_grace_s: how long a session may wait paused for Attach "
        "after its call broke (0: no reattach)",
    ),
    ("--heartbeat-timeout-s", float, 30.0, "worker silence after which it is replaced"),
    (
        "--neg-prompt",
        int,
        0,
        "1: the null caption of the unconditional branches starts with the negative-prompt "
        "special tokens (the reference's NEG_PROMPT)",
    ),
    (
        "--batch-invariant",
        str,
        "auto",
        "on: a session's frames are bit-identical whatever runs beside it (one forward per "
        "session); off: one packed forward for all; auto: on for the CPU, off for CUDA",
    ),
    (
        "--overlap-decode",
        str,
        "auto",
        "on: a step's chunks are VAE-decoded on a side CUDA stream while the next step runs "
        "(their frames are sent once it is enqueued); off: decoded within their step; auto: on "
        "for CUDA, off for the CPU",
    ),
    (
        "--compile",
        str,
        "off",
        "on: torch.compile the DiT layers' token-wise parts (inductor; the first steps of each "
        "shape compile, seconds to minutes); off: eager",
    ),
    (
        "--snapshot-dir",
        str,
        "",
        "where SnapshotSession writes and resume reads snapshots: a directory (shared by the "
        "replicas) or an fsspec URL; empty = snapshots off",
    ),
    (
        "--snapshot-every",
        int,
        0,
        "write each session to the snapshot store every N streamed chunks, so that a killed "
        "worker's sessions can be resumed from there; 0 = only on SnapshotSession and drain",
    ),
    ("--fork-history", int, 8, "chunks back a session can be forked at (0: no forks)"),
    ("--fork-ttl-s", float, 120.0, "how long after its end a session can still be forked"),
    ("--torch-threads", int, 1, "torch intra-op threads in the worker; 0 = torch's default"),
    ("--decode-threads", int, 2, "threads decoding request images and prefix videos"),
    ("--decode-queue", int, 8, "image/video decodes running or waiting; more are refused"),
    ("--encode-threads", int, 2, "threads encoding output chunks (separate from decoding)"),
    ("--x264-preset", str, "veryfast", "libx264 preset for FMP4_H264 output"),
    ("--x264-crf", int, 23, "libx264 constant rate factor (0-51)"),
    ("--cache", str, "~/.cache/magistream", "where embedded models are written"),
    ("--log-level", str, "info", "debug, info, warning or error"),
)


# torch.distributed's own variables (torchrun, Kubernetes manifests), read after MAGISTREAM_*.
_STANDARD_ENV = {
    "--nnodes": "NNODES",
    "--node-rank": "NODE_RANK",
    "--master-addr": "MASTER_ADDR",
    "--master-port": "MASTER_PORT",
}


def env_name(flag: str) -> str:
    return "MAGISTREAM_" + flag.lstrip("-").upper().replace("-", "_")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magi-server", description=__doc__.split("\n")[0])
    for flag, kind, default, help_text in _FLAGS:
        name = env_name(flag)
        names = [name, _STANDARD_ENV[flag]] if flag in _STANDARD_ENV else [name]
        value = next((env[n] for n in names if n in env), default)
        # argparse converts a string default with `type`, so a bad env value is reported
        # like a bad flag ("argument --port: invalid int value").
        parser.add_argument(
            flag,
            type=kind,
            default=value,
            help=f"{help_text} [env {' or '.join(names)}; default {default}]",
        )
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser(env).parse_args(argv)
    # Models are local folders; never let transformers reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    import uvloop

    from engine import logs
    from server import memory
    from server.app import serve
    from server.auth import Credentials

    try:
        config, model, encoding = _configure(args)
        credentials = Credentials(config.security)  # every credential file read and checked
    except ValueError as e:
        print(f"magi-server: {e}", file=sys.stderr)
        return 2
    logs.configure(args.log_level)
    # before any request: large buffers are mapped on their own, and unmapped when freed (only
    # here, in the serving process: tests call main() in theirs to check the flags)
    memory.configure()
    return uvloop.run(serve(config, model, encoding, credentials, sys.stdout))


def _configure(args: argparse.Namespace) -> tuple[ServerConfig, ServedModel, VideoEncoding]:
    from model.config import check_head_split, get_preset, read_config
    from server.config import GroupConfig, Limits, ServerConfig, WorkerConfig, resolve_model
    from server.encode import VideoEncoding
    from server.validation import ServedModel

    name, folder, write_preset = resolve_model(args.model, Path(args.cache).expanduser())
    try:
        magi = get_preset(write_preset) if write_preset else read_config(folder)
    except Exception as e:  # CheckpointError or a malformed config.json
        raise ValueError(f"--model {args.model}: {e}") from e
    rc = magi.runtime_config
    if rc.video_size_w > args.max_width or rc.video_size_h > args.max_height:
        raise ValueError(
            f"the model's default size {rc.video_size_w}x{rc.video_size_h} exceeds "
            f"--max-width/--max-height {args.max_width}x{args.max_height}"
        )
    group = GroupConfig(
        world_size=args.world_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        timeout_s=args.group_timeout_s,
        join_timeout_s=args.group_join_timeout_s,
    )
    mc = magi.model_config
    try:  # Ulysses splits the heads over the ranks
        check_head_split(mc.num_attention_heads, mc.num_query_groups, group.world_size)
    except ValueError as e:
        raise ValueError(f"--world-size {group.world_size}: {e}") from e
    limits = Limits(
        max_width_px=args.max_width,
        max_height_px=args.max_height,
        max_chunks=args.max_chunks,
        allow_unbounded=bool(args.allow_unbounded),
        max_prompt_chars=args.max_prompt_chars,
        max_image_bytes=args.max_image_bytes,
        max_video_bytes=args.max_video_bytes,
        max_input_pixels=args.max_pixels,
        max_detach_grace_s=args.max_detach_grace_s,
    )
    worker = WorkerConfig(
        model_folder=folder,
        write_preset=write_preset,
        # 0 = chosen by the worker from its device (engine.process.admission_budget)
        memory_budget_bytes=(args.memory_budget_mb << 20) or None,
        memory_reserve_bytes=args.memory_reserve_mb << 20,
        max_sessions=args.max_sessions,
        queue_size=args.queue_size,
        max_chunk_slots=args.max_chunk_slots,
        torch_threads=args.torch_threads,
        neg_prompt=bool(args.neg_prompt),
        device=args.device,
        batch_invariant=args.batch_invariant,
        overlap_decode=args.overlap_decode,
        compile=args.compile,
        fork_history=args.fork_history,
        fork_ttl_s=args.fork_ttl_s,
        log_level=args.log_level,
        group=group,
    )
    config = ServerConfig(
        security=_security(args),
        worker=worker,
        model_name=name,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        http_host=args.http_host or None,
        http_port=args.http_port if args.http_port >= 0 else None,
        http_origins=tuple(o.strip() for o in args.http_origins.split(",") if o.strip()),
        limits=limits,
        grace_period_s=args.grace_period_s,
        session_ttl_s=args.session_ttl_s,
        snapshot_dir=args.snapshot_dir or None,
        snapshot_every=args.snapshot_every,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
        decode_threads=args.decode_threads,
        decode_queue=args.decode_queue,
        encode_threads=args.encode_threads,
    )
    return config, ServedModel(name, magi), VideoEncoding(args.x264_preset, args.x264_crf)


def _security(args: argparse.Namespace) -> Security:
    from server.config import Security

    def path(value: str) -> Path | None:
        return Path(value).expanduser() if value else None

    def names(value: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in value.split(",") if p.strip())

    return Security(
        tls_cert=path(args.tls_cert),
        tls_key=path(args.tls_key),
        tls_client_ca=path(args.tls_client_ca),
        auth_tokens=path(args.auth_tokens),
        admin_principals=names(args.admin_principals),
        metrics_principals=names(args.metrics_principals),
        insecure=bool(args.insecure),
        reflection=args.reflection,
        principal_max_sessions=args.principal_max_sessions,
        principal_max_queued=args.principal_max_queued,
    )


if __name__ == "__main__":
    sys.exit(main())
