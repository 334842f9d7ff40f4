"""`python -m engine generate`: run one session in-process and write its uint8 frames.

Example: python -m engine generate --model DIR --prompt "a red ball" --chunks 2 --out v.npy
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from engine.engine import Engine
from model.checkpoint import CheckpointError
from model.folder import load_model
from scheduler.session import SessionParams


def _prompt_at(value: str) -> tuple[int, str]:
    chunk, sep, text = value.partition(":")
    if not sep or not chunk.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected CHUNK:TEXT, got {value!r}")
    return int(chunk), text


def _generate(args: argparse.Namespace) -> int:
    try:
        model = load_model(args.model)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rc = model.config.runtime_config
    prompts = {0: args.prompt, **dict(args.prompt_at)}
    try:
        params = SessionParams(
            session_id="cli",
            prompts=tuple(sorted(prompts.items())),
            num_chunks=args.chunks,
            height=args.height or rc.video_size_h,
            width=args.width or rc.video_size_w,
            seed=args.seed,
            num_steps=args.steps,
        )
        engine = Engine(model)
        engine.open(params)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done = engine.run_until_idle()
    frames = np.concatenate([d.frames.numpy() for d in done])
    np.save(args.out, frames)
    for d in done:
        print(
            f"chunk {d.output_index}: frames {d.first_frame}..{d.first_frame + len(d.frames) - 1}"
            f" prompt v{d.prompt.version} {d.prompt.text!r}"
        )
    print(f"wrote {args.out}: {frames.shape}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="run one session in-process, write uint8 frames")
    gen.add_argument("--model", required=True, help="model folder")
    gen.add_argument("--prompt", required=True, help="prompt for chunk 0 on")
    gen.add_argument(
        "--prompt-at",
        type=_prompt_at,
        action="append",
        default=[],
        metavar="CHUNK:TEXT",
        help="prompt from this chunk on (repeatable)",
    )
    gen.add_argument("--chunks", type=int, required=True, help="chunks to generate")
    gen.add_argument("--out", required=True, help=".npy file for the (T, H, W, 3) uint8 frames")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None, help="Euler steps (default: config)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.set_defaults(handler=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
