"""python -m train --out models/toy [--dit-steps N ...]

Trains the toy world model (VAE, then DiT, then the VAE decoder on its own) on toyworld scenes
and writes the model folder in the official layout. Resumable: the same command after a stop
goes on from the last save, and a larger --dit-steps or --decoder-steps continues a finished
run. --vae-from FOLDER trains the DiT alone on a finished folder's VAE; --dit-from FOLDER trains
a finished folder's VAE decoder on (phase 4), keeping its DiT and encoder. See docs/toyworld.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from train.toy import TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="model folder to write (models/toy)")
    defaults = TrainConfig(out=Path("."))
    counts = ("scenes", "vae_steps", "vae_batch", "dit_steps", "dit_batch", "decoder_steps")
    for name in (*counts, "decoder_batch", "threads", "seed"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    floats = ("vae_lr", "dit_lr", "decoder_lr", "decoder_object_weight", "decoder_latent_noise")
    for name in floats:
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name)
        )
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="a finished model folder: take its VAE and scale factor and train the DiT only "
        "(phase 3 of that folder's run; see docs/toyworld.md)",
    )
    parser.add_argument(
        "--dit-from",
        type=Path,
        default=None,
        help="a finished model folder: keep its DiT, encoder and scale factor and train its "
        "VAE decoder on for --decoder-steps (phase 4; see docs/toyworld.md)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    config.out = Path(args.out)
    state = train(config)
    print(
        f"done: {state.seconds:.0f} s, VAE PSNR {state.decoder_psnr:.2f} dB, scale factor "
        f"{state.scale_factor:.4f}; folder {config.out}, loss plot {config.out}/train/loss.png"
    )


if __name__ == "__main__":
    main()
