"""`python -m model write-random | check | keys`: the model folder commands."""

from __future__ import annotations

import argparse
import sys

from model.checkpoint import CheckpointError, build_dit_meta
from model.config import PRESETS, get_preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser(
        "write-random", help="write a model folder with deterministic random weights"
    )
    w.add_argument("--preset", required=True, choices=list(PRESETS))
    w.add_argument("--out", required=True, help="folder to write")
    w.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="load a model folder and print what it holds")
    c.add_argument("folder")
    k = sub.add_parser("keys", help="state-dict keys and shapes of a preset's DiT (meta device)")
    k.add_argument("--preset", required=True, choices=list(PRESETS))
    args = parser.parse_args(argv)

    if args.command == "write-random":
        from model.folder import write_random

        print(write_random(args.preset, args.out, args.seed))
    elif args.command == "check":
        from model.folder import describe, load_model

        try:
            model = load_model(args.folder)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print("\n".join(describe(model)))
    else:
        model = build_dit_meta(get_preset(args.preset))
        for key, tensor in model.state_dict().items():
            print(f"{key}\t{','.join(str(s) for s in tensor.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
