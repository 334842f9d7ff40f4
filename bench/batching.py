"""Cross-session batching: chunks per second with N sessions in one engine against the same N
sessions run one after another, measured in the same run (a ratio), plus where a step's time
goes and the memory of one unbounded session over 50 chunks.

    .venv/bin/python bench/batching.py                # tiny preset, 1 2 4 8 sessions
    .venv/bin/python bench/batching.py --quick        # 1 and 4 sessions, fewer chunks
"""

from __future__ import annotations

import argparse
import platform
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


def session(i: int, chunks: int | None, size: int) -> SessionParams:
    return SessionParams(f"s{i}", ((0, PROMPTS[i % len(PROMPTS)]),), chunks, size, size, seed=i)


def run_sequential(model: MagiModel, n: int, chunks: int, size: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        engine = Engine(model)
        engine.open(session(i, chunks, size))
        engine.run_until_idle()
    return time.perf_counter() - start


def run_batched(model: MagiModel, n: int, chunks: int, size: int) -> tuple[float, dict[str, float]]:
    engine = Engine(model)
    for i in range(n):
        engine.open(session(i, chunks, size))
    split = dict.fromkeys(["dit_s", "decode_s", "schedule_s", "assemble_s"], 0.0)
    slots, steps = 0, 0
    start = time.perf_counter()
    while engine.scheduler.has_work():
        for done in engine.step():
            engine.consumed(done.session_id)
        if engine.last_step is not None:
            steps += 1
            slots += engine.last_step.chunk_slots
            for key in split:
                split[key] += getattr(engine.last_step, key)
    total = time.perf_counter() - start
    split["steps"], split["slots_per_step"] = steps, slots / max(steps, 1)
    return total, split


def unbounded_memory(model: MagiModel, chunks: int, size: int) -> tuple[list[int], int]:
    """KV + latent bytes sampled after each stage's first sub-step, once the window is full."""
    engine = Engine(model)
    s = engine.open(session(0, None, size))
    samples = []
    dps = s.window.spec.steps_per_stage
    while s.chunks_out < chunks:
        engine.step()
        while s.unconsumed:
            engine.consumed(s.session_id)
        if s.forwards_served % dps == 1 and s.forwards_served > dps * (
            s.window.spec.window_size + 1
        ):
            samples.append(engine.used_bytes(s.session_id))
    return samples, s.estimated_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: write the tiny preset)")
    parser.add_argument("--sessions", default="1,2,4,8")
    parser.add_argument("--chunks", type=int, default=3, help="chunks per session")
    parser.add_argument("--sizes", default="32,64", help="video sides to run, pixels")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-chunks", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.chunks, args.memory_chunks, args.sizes = "1,4", 2, 12, "32"
    torch.set_num_threads(args.threads)
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or write_random("tiny", Path(tmp) / "tiny", seed=0)
        model = load_model(folder)
        rc = model.config.runtime_config
        for size in (int(x) for x in args.sizes.split(",")):
            run_batched(model, 1, 1, size)  # warm-up: caches, allocator
            print(
                f"\n{size}x{size}, {args.chunks} chunks per session, {rc.num_steps} steps, "
                f"cfg {rc.cfg_number}"
            )
            print(
                "sessions | sequential chunks/s | batched chunks/s | batched/sequential | "
                "step split dit/decode/assemble/schedule ms | slots/step"
            )
            for n in (int(x) for x in args.sessions.split(",")):
                seq_s = run_sequential(model, n, args.chunks, size)
                bat_s, split = run_batched(model, n, args.chunks, size)
                chunks = n * args.chunks
                keys = ("dit_s", "decode_s", "assemble_s", "schedule_s")
                per_step = [1000 * split[k] / split["steps"] for k in keys]
                print(
                    f"{n:8d} | {chunks / seq_s:19.2f} | {chunks / bat_s:16.2f} | "
                    f"{seq_s / bat_s:17.2f}x | {' / '.join(f'{v:.1f}' for v in per_step):>38} | "
                    f"{split['slots_per_step']:.1f}"
                )
        size = int(args.sizes.split(",")[-1])
        samples, reserved = unbounded_memory(model, args.memory_chunks, size)
        spread = (max(samples) - min(samples)) / max(samples)
        print(
            f"\nunbounded session at {size}x{size} over {args.memory_chunks} chunks: KV+latents "
            f"{min(samples) / 2**10:.0f}..{max(samples) / 2**10:.0f} KiB after the window filled "
            f"(spread {100 * spread:.1f}%, admission reserved {reserved / 2**10:.0f} KiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
