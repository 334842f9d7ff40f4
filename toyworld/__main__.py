"""python -m toyworld sample --seed S --chunks N --out FILE.mp4

`sample` writes FILE.mp4 (H.264, 24 fps) and FILE.json (captions per chunk, the scene spec,
contacts). `bench` times dataset generation. `strip` makes a PNG of frames of a video. `still`
draws one object at rest as a PNG: the start image of an i2v session (`make run` uses it).
Training the toy model on these scenes: `python -m train` (train/toy.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .plot import frame_strip, write_png
from .scenes import PALETTE, ObjectSpec
from .video import ToyVideo, generate_video, still_frame


def write_mp4(frames: np.ndarray, path: Path, fps: int, crf: int = 12) -> None:
    """uint8 (T, H, W, 3) RGB; H and W even (yuv420p). Low crf: small colour blobs smear."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": str(crf)}
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def describe(video: ToyVideo) -> dict:
    return {
        "fps": video.fps,
        "num_frames": int(video.frames.shape[0]),
        "chunks": [
            {"chunk": k, "frames": [video.chunk(k).start, video.chunk(k).stop], "caption": c}
            for k, c in enumerate(video.captions)
        ],
        "spec": dataclasses.asdict(video.spec),
        "contacts": [dataclasses.asdict(c) for c in video.contacts],
    }


def _sample(args: argparse.Namespace) -> None:
    video = generate_video(args.seed, args.chunks, args.size, args.antialias)
    out = Path(args.out)
    write_mp4(video.frames, out, video.fps)
    out.with_suffix(".json").write_text(json.dumps(describe(video), indent=2) + "\n")
    if args.npz:  # masks and positions for scoring
        np.savez_compressed(
            out.with_suffix(".npz"),
            frames=video.frames,
            masks=video.masks,
            positions=video.positions,
            velocities=video.velocities,
        )
    for k, caption in enumerate(video.captions):
        print(f"chunk {k}: {caption}")


def _bench(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    for seed in range(args.scenes):
        generate_video(seed, args.chunks, args.size, args.antialias)
    elapsed = time.perf_counter() - start
    print(
        f"{args.scenes} scenes x {args.chunks} chunks at {args.size}px: {elapsed:.2f} s "
        f"({1000 * elapsed / args.scenes:.1f} ms/scene)"
    )


def _still(args: argparse.Namespace) -> None:
    thing = ObjectSpec(args.shape, args.colour, args.object_size, (args.x, args.y))
    write_png(args.out, still_frame(thing, args.size))
    print(f"wrote {args.out}: a {args.colour} {args.shape} at ({args.x}, {args.y})")


def _strip(args: argparse.Namespace) -> None:
    with av.open(args.video) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    strip = frame_strip(frames, args.frames)
    if args.scale > 1:
        strip = strip.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
    write_png(args.out, strip)
    print(
        f"wrote {args.out}: {args.frames} of {len(frames)} frames, "
        f"{strip.shape[1]}x{strip.shape[0]} px"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="write one scene as MP4 + JSON captions")
    sample.add_argument("--seed", type=int, required=True)
    sample.add_argument("--chunks", type=int, default=3)
    sample.add_argument("--out", required=True, help="FILE.mp4; FILE.json is written beside it")
    sample.add_argument("--npz", action="store_true", help="also write FILE.npz (masks etc.)")
    bench = sub.add_parser("bench", help="time generating a dataset")
    bench.add_argument("--scenes", type=int, default=200)
    bench.add_argument("--chunks", type=int, default=2)
    for p in (sample, bench):
        p.add_argument("--size", type=int, default=64, help="frame side, px (multiple of 16)")
        p.add_argument("--antialias", action="store_true")
    still = sub.add_parser("still", help="a PNG of one object at rest (an i2v start image)")
    still.add_argument("--out", required=True, help="FILE.png")
    still.add_argument("--colour", default="red", choices=sorted(PALETTE))
    still.add_argument("--shape", default="ball", choices=["ball", "box"])
    still.add_argument("--object-size", type=float, default=12.0, help="diameter or side, px")
    still.add_argument("--x", type=float, default=32.0, help="centre, px from the left")
    still.add_argument("--y", type=float, default=32.0, help="centre, px from the top")
    still.add_argument("--size", type=int, default=64, help="frame side, px")
    strip = sub.add_parser("strip", help="a PNG of evenly spaced frames of a video")
    strip.add_argument("--video", required=True)
    strip.add_argument("--out", required=True, help="FILE.png")
    strip.add_argument("--frames", type=int, default=8)
    strip.add_argument("--scale", type=int, default=2, help="pixel repeat (64 px frames are small)")
    args = parser.parse_args(argv)
    commands = {"sample": _sample, "bench": _bench, "still": _still, "strip": _strip}
    commands[args.command](args)


if __name__ == "__main__":
    main()
