"""Engine steps per second with N unbounded sessions in one engine, the window full: best of
several repeats, so a noisy machine shows its quiet moments. Times the checkout it is run from
(the current directory), so bench/ab.py can time an older revision with it too:

    .venv/bin/python bench/engine_steps.py --size 32 --sessions 1,8
    .venv/bin/python bench/ab.py --base 5659e57 -- $PWD/bench/engine_steps.py --size 32
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout being timed, not necessarily this file's

import torch  # noqa: E402

from model.folder import load_model, write_random  # noqa: E402
from scheduler.session import SessionParams  # noqa: E402

try:
    from engine.engine import Engine  # noqa: E402
except ImportError:  # a revision before the engine/ package (issue 17)
    from scheduler.engine import Engine  # noqa: E402


def consume(engine, session_id: str) -> None:
    if hasattr(engine, "consumed"):
        engine.consumed(session_id)
    else:  # before issue 17 the scheduler held the outputs
        engine.scheduler.pop_output(session_id)


def steps_per_s(model, sessions: int, size: int, steps: int) -> float:
    engine = Engine(model)
    for i in range(sessions):
        engine.open(SessionParams(f"s{i}", ((0, "a red ball"),), None, size, size, seed=i))
    for _ in range(4):  # fill the window
        for done in engine.step():
            consume(engine, done.session_id)
    start = time.perf_counter()
    for _ in range(steps):
        for done in engine.step():
            consume(engine, done.session_id)
    return steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="video side, pixels")
    parser.add_argument("--sessions", default="1,8")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"machine: {platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; tiny preset, {args.size}x{args.size}, cfg 3"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(write_random("tiny", Path(tmp) / "tiny", seed=0))
        print("sessions | steps/s (best of repeats)")
        for n in (int(x) for x in args.sessions.split(",")):
            best = max(steps_per_s(model, n, args.size, args.steps) for _ in range(args.repeats))
            print(f"{n} | {best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
