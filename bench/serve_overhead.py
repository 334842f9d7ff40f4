"""What the service adds on top of the engine: K concurrent streams through a real magi-server
(gRPC, worker process, fMP4 encoding) against the same sessions run directly on the in-process
engine, in one run; plus the server's memory across many sessions run back to back.

    .venv/bin/python bench/serve_overhead.py            # 1, 4, 8 streams; 200 sessions for RSS
    .venv/bin/python bench/serve_overhead.py --quick    # 1 and 4 streams; 40 sessions
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import AsyncClient  # noqa: E402
from engine.engine import Engine  # noqa: E402
from model.folder import load_model  # noqa: E402
from scheduler.session import SessionParams  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

SIZE = 64


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def in_process(model, n: int, chunks: int, steps: int) -> tuple[float, float]:
    """Frames per second and mean time to first chunk with n sessions in one engine."""
    engine = Engine(model)
    start = time.perf_counter()
    for i in range(n):
        engine.open(
            SessionParams(
                f"s{i}", ((0, "a red ball"),), chunks, SIZE, SIZE, seed=i, num_steps=steps
            )
        )
    first: dict[str, float] = {}
    frames = 0
    while engine.scheduler.has_work():
        for done in engine.step():
            engine.consumed(done.session_id)
            first.setdefault(done.session_id, time.perf_counter() - start)
            frames += len(done.frames)
    total = time.perf_counter() - start
    return frames / total, sum(first.values()) / len(first)


async def through_server(target: str, n: int, chunks: int, steps: int) -> tuple[float, float]:
    async with AsyncClient(target) as client:
        start = time.perf_counter()

        async def one(i: int) -> tuple[int, float]:
            stream = client.generate(
                "a red ball", chunks=chunks, width=SIZE, height=SIZE, steps=steps, seed=i
            )
            frames, first = 0, None
            async for chunk in stream:
                first = first or time.perf_counter() - start
                frames += chunk.frame_count
            return frames, first

        results = await asyncio.gather(*(one(i) for i in range(n)))
        total = time.perf_counter() - start
    return sum(f for f, _ in results) / total, sum(t for _, t in results) / n


async def back_to_back(target: str, sessions: int, pids: list[int]) -> list[list[float]]:
    samples = []
    async with AsyncClient(target) as client:
        for i in range(sessions):
            async for _ in client.generate(
                "a red ball", chunks=1, width=SIZE, height=SIZE, steps=4, seed=i
            ):
                pass
            if i % max(1, sessions // 10) == 0 or i == sessions - 1:
                samples.append([rss_mib(p) for p in pids])
    return samples


def start_server(tmp: Path, threads: int) -> ServerProcess:
    """A tiny-model server with its cache under tmp: `threads` torch threads, the server's
    default encode threads (2), the fastest x264 preset. `with` waits until it listens."""
    return ServerProcess(
        tmp,
        *("--torch-threads", str(threads), "--encode-threads", "2"),
        model="tiny",
        stop_timeout_s=60,
    )


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with start_server(Path(tmp), args.threads) as server:
            target = server.address
            await through_server(target, 1, 1, args.steps)  # waits for the worker; warm-up
            model = load_model(server.cache / "models" / "tiny")
            in_process(model, 1, 1, args.steps)  # warm-up
            print(f"\n{SIZE}x{SIZE}, {args.chunks} chunks per stream, {args.steps} steps, fMP4")
            print(
                "streams | in-process frames/s | server frames/s | server/in-process | "
                "first chunk in-process s | server s | ratio"
            )
            for n in (int(x) for x in args.streams.split(",")):
                local_fps, local_first = in_process(model, n, args.chunks, args.steps)
                served_fps, served_first = await through_server(target, n, args.chunks, args.steps)
                print(
                    f"{n:7d} | {local_fps:19.1f} | {served_fps:15.1f} | "
                    f"{served_fps / local_fps:16.2f}x | {local_first:24.3f} | "
                    f"{served_first:8.3f} | {served_first / local_first:.2f}x"
                )
            pids = [server.pid, server.worker_pid()]
            samples = await back_to_back(target, args.sessions, pids)
            for who, column in zip(["server", "worker"], zip(*samples, strict=True), strict=False):
                lo, hi = min(column[1:] or column), max(column[1:] or column)
                print(
                    f"{who} RSS over {args.sessions} sessions back to back: "
                    f"{column[0]:.0f} MiB after the first, {lo:.0f}..{hi:.0f} MiB after that "
                    f"(spread {100 * (hi - lo) / hi:.1f}%)"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.sessions = "1,4", 40
    torch.set_num_threads(args.threads)
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
