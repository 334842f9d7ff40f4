"""Time to fork: the first chunk of a fork (at a recent chunk of a finished session) against the
first chunk of a new session of the same request, in one engine, interleaved A B A B after a
warm-up of each; and the fork history's memory per session, measured here and derived from
shapes for MAGI-1 4.5B.

    .venv/bin/python bench/fork.py                 # tiny preset, 32x32 and 64x64, 5 rounds
    .venv/bin/python bench/fork.py --quick         # 32x32, 2 rounds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import snapshot  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.runner import LATENT_CHANNELS  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.folder import MagiModel, load_model, write_random  # noqa: E402
from scheduler.session import ForkSource, SessionParams  # noqa: E402

PROMPT = "a red ball rolls to the left"


def request(sid: str, size: int, chunks: int, fork: ForkSource | None = None) -> SessionParams:
    prompts = () if fork else ((0, PROMPT),)
    return SessionParams(sid, prompts, chunks, size, size, seed=1, fork=fork)


def first_chunk_s(engine: Engine, params: SessionParams) -> float:
    """Open it and step until its first chunk is out; the rest of it is cancelled."""
    start = time.perf_counter()
    engine.open(params)
    while True:
        done = [d for d in engine.step() if d.session_id == params.session_id]
        for d in done:
            engine.consumed(d.session_id)
        if done:
            elapsed = time.perf_counter() - start
            engine.cancel(params.session_id)
            engine.scheduler.forget(params.session_id)
            return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--folder", type=Path, help="a model folder instead (models/toy)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--chunks", type=int, default=8, help="chunks of the source session")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = [32], 2
    torch.set_num_threads(args.threads)
    if args.folder is not None:
        model: MagiModel = load_model(args.folder)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = load_model(write_random(args.preset, Path(tmp) / "m", seed=0))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), model {args.folder or args.preset}"
    )
    print(
        "| video | new session: first chunk s | fork at chunk 5: first chunk s |"
        " fork / new (range) | fork history reserved | held after the source ended |"
    )
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        engine = Engine(model)
        source = engine.open(request("source", size, args.chunks))
        engine.run_until_idle()
        engine.scheduler.forget("source")  # ended: forkable for fork_ttl_s
        held = engine.runner.marks_bytes()
        at = ForkSource("source", 5)
        ids = iter(range(10**6))

        def first(fork: ForkSource | None, engine=engine, size=size, ids=ids) -> float:
            sid = f"{'f' if fork else 'n'}{next(ids)}"
            return first_chunk_s(engine, request(sid, size, args.chunks, fork))

        first(None), first(at)  # warm both
        a, b = [], []
        for _ in range(args.rounds):
            a.append(first(None))
            b.append(first(at))
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        print(
            f"| {size}x{size} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f}) | "
            f"{source.history_bytes / 2**10:.0f} KiB | {held / 2**10:.0f} KiB |",
            flush=True,
        )
    # snapshots: the newest fork point as a file (engine/snapshot.py), written and resumed
    print("\n| video | snapshot bytes | encode ms | decode + open ms |")
    print("|---|---|---|---|")
    for size in args.sizes:
        engine = Engine(model)
        engine.open(request("s", size, args.chunks))
        for _ in range(5 * engine.scheduler.get("s").window.spec.steps_per_stage):
            engine.step()
        encode_ms, open_ms = [], []
        for i in range(args.rounds):
            t0 = time.perf_counter()
            data = snapshot.encode(engine.snapshot("s"))
            t1 = time.perf_counter()
            other = Engine(model)
            other._fingerprint = engine.fingerprint  # (the same model: skip hashing its files)
            other.open(SessionParams(f"r{i}", (), None, size, size, resume=data))
            t2 = time.perf_counter()
            encode_ms.append(1e3 * (t1 - t0))
            open_ms.append(1e3 * (t2 - t1))
        print(
            f"| {size}x{size} | {len(data)} | {statistics.median(encode_ms):.2f} | "
            f"{statistics.median(open_ms):.2f} |"
        )
    # from shapes: MAGI-1 4.5B, window 4 (no KV at a fork point), 8 fork points of 5 latents
    rc = get_preset("4.5B_distill").runtime_config
    for side in (480, 720):
        latent = LATENT_CHANNELS * rc.chunk_width * (side // 8) ** 2 * 4
        history = 8 * (rc.window_size + 1) * latent
        one = rc.window_size * latent  # the chunks in flight and the one awaiting re-forward
        print(
            f"# 4.5B at {side}x{side}: one latent {latent / 2**20:.1f} MiB, fork history "
            f"(8 points x {rc.window_size + 1} latents) {history / 2**20:.0f} MiB; a snapshot "
            f"(one point: {rc.window_size} latents, the prefix if any) {one / 2**20:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
