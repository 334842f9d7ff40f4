"""`python -m scheduler`: inspect the MAGI-1 window (torch-free).

Example: python -m scheduler plan --chunks 4 --window 4 --steps 16
(`python -m engine generate` runs one session in-process.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scheduler.window import ForwardPlan, PlannedChunk, Window, WindowSpec

_PLAN_HELP = """\
Print one line per forward of a finite session:
  step <n> stage <i> sub <j>: c<index>:k<grid index>/d<denoise step>/L<level>/kv[<first>,<end>) ...
followed by "+clean c<i>" when the just-finished chunk is re-forwarded for its KV.
Chunk indices count the prefix chunks. With --prefix-chunks the first line is
"extract prefix: c<index>:clean/kv[<first>,<end>) ...", the v2v forward that computes the
prefix KV. It is not a denoising forward, so the "step" lines number
dps * (chunks + window - 1 - prefix), the official forward count."""


def _format_chunk(chunk: PlannedChunk) -> str:
    return (
        f"c{chunk.chunk_index}:k{chunk.grid_index}/d{chunk.denoise_step}/L{chunk.stage_level}"
        f"/kv[{chunk.kv_first_chunk},{chunk.kv_end_chunk})"
    )


def format_plan(plan: ForwardPlan) -> str:
    """One human-readable line for a forward (the `plan` subcommand's output format)."""
    if plan.prefix_extraction:
        prefix = " ".join(
            f"c{c.chunk_index}:clean/kv[{c.kv_first_chunk},{c.kv_end_chunk})" for c in plan.chunks
        )
        return f"extract prefix: {prefix}"
    chunks = " ".join(_format_chunk(c) for c in plan.chunks)
    line = f"step {plan.step} stage {plan.stage} sub {plan.sub_step}: {chunks}"
    if plan.clean_chunk is not None:
        line += f" +clean c{plan.clean_chunk}"
    return line


def _plan(args: argparse.Namespace) -> int:
    try:
        spec = WindowSpec(
            num_steps=args.steps,
            window_size=args.window,
            num_chunks=args.chunks,
            prefix_chunks=args.prefix_chunks,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    window = Window(spec)
    while (plan := window.next_forward()) is not None:
        print(format_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scheduler", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser(
        "plan",
        help="print the forwards of a finite session",
        description=_PLAN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--chunks", type=int, required=True, help="total chunks, prefix included")
    plan.add_argument("--window", type=int, default=4, help="chunks in flight (default 4)")
    plan.add_argument("--steps", type=int, default=64, help="Euler steps per chunk (default 64)")
    plan.add_argument(
        "--prefix-chunks", type=int, default=0, help="v2v clean prefix chunks (default 0)"
    )
    plan.set_defaults(handler=_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
