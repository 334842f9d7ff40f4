"""The continuation table of MAGI-1's report (Physics-IQ style), on held-out toyworld scenes.

Each scene has 4 ground-truth chunks (96 frames, 64x64). Scored frames: 48..95 (chunks 2-3).

- V2V: the first two chunks (frames 0..47) are the prefix; the engine continues from their end
  (it encodes the last 32 frames), prompted with the ground-truth captions.
- I2V: only frame 0 is given; all four chunks are generated with the ground-truth captions.
- copy last frame: frame 47 repeated.
- ground truth (ceiling): the same scene simulated again from a slightly perturbed start
  (positions +-0.5 px, velocities +-2 %), the spread a second take of a real experiment has.

    .venv/bin/python bench/physics_table.py                  # 50 scenes, the shipped toy model
    .venv/bin/python bench/physics_table.py --scenes 4       # quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.folder import embedded_folder, load_model  # noqa: E402
from model.toyworld import generate_video, video_from_spec  # noqa: E402
from model.toyworld.scenes import CHUNK_FRAMES, SceneSpec  # noqa: E402
from model.toyworld.score import Scores, mean_scores, score  # noqa: E402
from scheduler.engine import Engine  # noqa: E402
from scheduler.session import SessionParams  # noqa: E402

HELD_OUT = 1_000_000  # first held-out seed; training uses seeds 0..scenes-1
CHUNKS = 4
GIVEN = 2 * CHUNK_FRAMES  # frames given to V2V
SCORED = slice(GIVEN, CHUNKS * CHUNK_FRAMES)
MODES = ("V2V", "I2V", "copy last frame", "ground truth (ceiling)")


def perturbed(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    objects = tuple(
        dataclasses.replace(
            o,
            position=tuple(p + float(rng.uniform(-0.5, 0.5)) for p in o.position),
            velocity=tuple(v * float(rng.uniform(0.98, 1.02)) for v in o.velocity),
        )
        for o in spec.objects
    )
    return dataclasses.replace(spec, objects=objects)


def generate(engine: Engine, params: list[SessionParams]) -> dict[str, np.ndarray]:
    """Run all sessions batched in one engine; uint8 frames per session id."""
    for p in params:
        engine.open(p)
    frames: dict[str, list[np.ndarray]] = {p.session_id: [] for p in params}
    for done in engine.run_until_idle():
        frames[done.session_id].append(done.frames.numpy())
    return {sid: np.concatenate(parts) for sid, parts in frames.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped toy)")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10, help="sessions per engine run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model or embedded_folder("toy"))
    size = model.config.runtime_config.video_size_h
    videos = [generate_video(HELD_OUT + i, CHUNKS, size) for i in range(args.scenes)]
    start = time.perf_counter()
    rows: dict[str, list[Scores]] = {m: [] for m in MODES}
    for b in range(0, len(videos), args.batch):
        batch = list(enumerate(videos))[b : b + args.batch]
        params = []
        for i, v in batch:
            caps = v.captions
            params.append(
                SessionParams(
                    f"v2v{i}",
                    ((0, caps[2]), (1, caps[3])),
                    3,  # the first generated chunk starts inside the prefix's last chunk
                    size,
                    size,
                    seed=i,
                    mode="v2v",
                    video=torch.from_numpy(v.frames[:GIVEN]),
                )
            )
            params.append(
                SessionParams(
                    f"i2v{i}",
                    tuple(enumerate(caps)),
                    CHUNKS,
                    size,
                    size,
                    seed=i,
                    mode="i2v",
                    image=torch.from_numpy(v.frames[0]),
                )
            )
        out = generate(Engine(model), params)
        for i, v in batch:
            colours = [o.colour for o in v.spec.objects]
            truth = v.frames[SCORED]
            n = truth.shape[0]
            v2v = out[f"v2v{i}"][:n]
            i2v = out[f"i2v{i}"][SCORED]
            copy = np.repeat(v.frames[GIVEN - 1 : GIVEN], n, axis=0)
            again = video_from_spec(perturbed(v.spec, np.random.default_rng(i))).frames[SCORED]
            for mode, frames in zip(MODES, (v2v, i2v, copy, again), strict=True):
                rows[mode].append(score(frames, truth, colours))
        print(f"  {min(b + args.batch, len(videos))}/{len(videos)} scenes", file=sys.stderr)
    elapsed = time.perf_counter() - start
    print(
        f"# physics table: {args.scenes} held-out scenes (seeds {HELD_OUT}..), 64x64, "
        f"frames 48-95 scored; {elapsed:.0f} s on {platform.processor() or platform.machine()}"
    )
    print("| mode | spatial IoU ↑ | spatiotemporal IoU ↑ | weighted spatial IoU ↑ | MSE ↓ |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        m = mean_scores(rows[mode])
        print(
            f"| {mode} | {m.spatial_iou:.3f} | {m.spatiotemporal_iou:.3f} | "
            f"{m.weighted_spatial_iou:.3f} | {m.mse:.5f} |"
        )


if __name__ == "__main__":
    main()
