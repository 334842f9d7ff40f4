"""The cost of batch invariance: chunks per second of N sessions in one engine with one packed
forward for all (`batch_invariant=False`) against one forward per session (`True`, the CPU
default), interleaved A B A B after a warm-up of each; prints the median of the pairwise B/A
ratios with their range.

    .venv/bin/python bench/invariance.py                 # 32x32 and 64x64, 1 2 4 8 sessions
    .venv/bin/python bench/invariance.py --quick         # 32x32, 1 and 4 sessions, 2 rounds
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

from engine.engine import Engine  # noqa: E402
from model.folder import MagiModel, load_model, write_random  # noqa: E402
from scheduler.session import SessionParams  # noqa: E402

PROMPTS = ["a red ball rolls to the left", "a blue box falls and bounces", "two balls collide"]


def chunks_per_s(model: MagiModel, invariant: bool, n: int, chunks: int, size: int) -> float:
    engine = Engine(model, batch_invariant=invariant)
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        engine.open(SessionParams(f"s{i}", ((0, prompt),), chunks, size, size, seed=i))
    start = time.perf_counter()
    done = engine.run_until_idle()
    return len(done) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--chunks", type=int, default=3, help="chunks per session")
    parser.add_argument("--rounds", type=int, default=5, help="timed A/B pairs per row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.sessions, args.rounds = [32], [1, 4], 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(write_random(args.preset, Path(tmp) / "m", seed=0))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), preset {args.preset}, {args.chunks} chunks/session"
    )
    print(
        "| video | sessions | packed chunks/s | invariant chunks/s | invariant / packed (range) |"
    )
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for n in args.sessions:
            for invariant in (False, True):  # warm both sides
                chunks_per_s(model, invariant, n, args.chunks, size)
            a, b = [], []
            for _ in range(args.rounds):
                a.append(chunks_per_s(model, False, n, args.chunks, size))
                b.append(chunks_per_s(model, True, n, args.chunks, size))
            ratios = [y / x for x, y in zip(a, b, strict=True)]
            print(
                f"| {size}x{size} | {n} | {statistics.median(a):.2f} | {statistics.median(b):.2f}"
                f" | {statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f}) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
