"""The continuation table of MAGI-1's report (Physics-IQ style), on held-out toyworld scenes.

Each scene has 4 ground-truth chunks (96 frames, 64x64). Scored frames: 48..59 and 64..95, the
same frames for every mode: the V2V stream has no frames 61-63 (below).

- V2V: the first two chunks (frames 0..47) are the prefix; the engine continues from their end
  (it encodes the last 32 frames, 8 latent frames: one clean chunk and two latent frames
  pasted into the first generated chunk), prompted with the ground-truth captions. That chunk
  outputs its last 4 latent frames (frames 48..63), which MAGI-1's tiled decode turns into
  12 + 1 frames: a 1-latent tail tile decodes as one image. So its 13 frames are 48..59 and
  one for 60..63, and the next chunk starts at frame 64.
- I2V: only frame 0 is given; all four chunks are generated with the ground-truth captions.
- copy last frame: frame 47 repeated.
- ground truth (ceiling): the same scene simulated again from a slightly perturbed start
  (positions +-0.5 px, velocities +-2 %), the spread a second take of a real experiment has.

Below the table: V2V minus copy-last-frame and V2V minus I2V scene by scene, mean and 95 %
confidence half-width (whether a lead is more than the luck of the draw of scenes); the same
split by what moves the objects after the prefix (`continuation_kind`); and the per-frame IoU
of each mode at a few frames (where in time a mode wins or loses).

Scene events (a push, gravity switching on) sit on the scene's chunk boundaries, here frames 48
and 72, and the captions change there. The V2V session's chunks start 8 frames before its
prefix ends (MAGI-1's 32-frame prefix: one clean chunk, two pasted latent frames), at 40, 64
and 88. So its prompts can switch at frame 48, its first generated frame, but not at 72: the
caption of its frames 64-87 is the one of most of them, the scene's chunk 3, and an event at 72
is prompted 8 frames early. Where no event follows the prefix ("physics only"), the
continuation follows from the prefix alone; where one does, only the captions tell of it.

    .venv/bin/python bench/physics_table.py                  # 50 scenes, the shipped toy model
    .venv/bin/python bench/physics_table.py --scenes 4       # quick look
    .venv/bin/python bench/physics_table.py --scenes 2 --batch 2 --num-steps 4  # smoke run
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

from engine.engine import Engine  # noqa: E402
from model.folder import embedded_folder, load_model  # noqa: E402
from model.vae import video_frames_for  # noqa: E402
from scheduler.session import SessionParams  # noqa: E402
from toyworld import generate_video, video_from_spec  # noqa: E402
from toyworld.scenes import CHUNK_FRAMES, SceneSpec  # noqa: E402
from toyworld.score import (  # noqa: E402
    Scores,
    frame_ious,
    mean_scores,
    paired_difference,
    score,
)

HELD_OUT = 1_000_000  # first held-out seed; training uses seeds 0..scenes-1
CHUNKS = 4
GIVEN = 2 * CHUNK_FRAMES  # frames given to V2V
V2V_FIRST_CHUNK_FRAMES = video_frames_for(4)  # 13: frames 48..59, then one for latent 60..63
SCORED = np.r_[GIVEN : GIVEN + 12, GIVEN + 16 : CHUNKS * CHUNK_FRAMES]  # 48..59, 64..95
V2V_SCORED = np.r_[0:12, V2V_FIRST_CHUNK_FRAMES : V2V_FIRST_CHUNK_FRAMES + 32]  # of its stream
MODES = ("V2V", "I2V", "copy last frame", "ground truth (ceiling)")
COMPARISONS = (("V2V", "copy last frame"), ("V2V", "I2V"))
KINDS = ("physics only", f"event at frame {GIVEN}", f"event at frame {GIVEN + CHUNK_FRAMES}")
PER_FRAME = (48, 50, 52, 56, 64, 72, 80, 88, 95)  # frames of SCORED shown in the per-frame table
DIGITS = (3, 3, 3, 5)  # decimals per column: three IoUs, MSE
COLUMNS = "spatial IoU ↑ | spatiotemporal IoU ↑ | weighted spatial IoU ↑ | MSE ↓"


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


def continuation_kind(spec: SceneSpec) -> str:
    """What moves the objects after the prefix: physics alone, or an event (push, gravity
    switch) at the first scored frame or one chunk later; one of KINDS."""
    frames = sorted(e.chunk * CHUNK_FRAMES for e in spec.events)
    after = [f for f in frames if f >= GIVEN]
    return "physics only" if not after else f"event at frame {after[0]}"


def generate(engine: Engine, params: list[SessionParams]) -> dict[str, list[np.ndarray]]:
    """Run all sessions batched in one engine; uint8 frames per session id, per chunk."""
    for p in params:
        engine.open(p)
    frames: dict[str, list[np.ndarray]] = {p.session_id: [] for p in params}
    for done in engine.run_until_idle():
        frames[done.session_id].append(done.frames.numpy())
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped toy)")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument(
        "--first-seed", type=int, default=HELD_OUT, help="held-out scene seeds start here"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10, help="sessions per engine run")
    parser.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="Euler steps per chunk (default: the model's); fewer for a smoke run: the table "
        "then shows the sampler cut short, not the model",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model or embedded_folder("toy"))
    size = model.config.runtime_config.video_size_h
    if args.first_seed < HELD_OUT:
        raise SystemExit(f"--first-seed must be >= {HELD_OUT}: lower seeds are training scenes")
    videos = [generate_video(args.first_seed + i, CHUNKS, size) for i in range(args.scenes)]
    start = time.perf_counter()
    rows: dict[str, list[Scores]] = {m: [] for m in MODES}
    kinds = [continuation_kind(v.spec) for v in videos]
    per_frame: dict[str, list[np.ndarray]] = {m: [] for m in MODES}
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
                    num_steps=args.num_steps,
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
                    num_steps=args.num_steps,
                )
            )
        out = generate(Engine(model), params)
        for i, v in batch:
            colours = [o.colour for o in v.spec.objects]
            truth = v.frames[SCORED]
            v2v_chunks = out[f"v2v{i}"]
            if len(v2v_chunks[0]) != V2V_FIRST_CHUNK_FRAMES:
                raise RuntimeError(
                    f"v2v chunk 0 has {len(v2v_chunks[0])} frames, not {V2V_FIRST_CHUNK_FRAMES}"
                )
            v2v = np.concatenate(v2v_chunks)[V2V_SCORED]
            i2v = np.concatenate(out[f"i2v{i}"])[SCORED]
            copy = np.repeat(v.frames[GIVEN - 1 : GIVEN], len(truth), axis=0)
            again = video_from_spec(perturbed(v.spec, np.random.default_rng(i))).frames[SCORED]
            for mode, frames in zip(MODES, (v2v, i2v, copy, again), strict=True):
                rows[mode].append(score(frames, truth, colours))
                per_frame[mode].append(frame_ious(frames, truth, colours))
        print(f"  {min(b + args.batch, len(videos))}/{len(videos)} scenes", file=sys.stderr)
    elapsed = time.perf_counter() - start
    steps = "" if args.num_steps is None else f", {args.num_steps} steps per chunk"
    print(
        f"# physics table: {args.scenes} held-out scenes (seeds {args.first_seed}..), 64x64, "
        f"frames 48-59 and 64-95 scored{steps}; {elapsed:.0f} s on "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"| mode | {COLUMNS} |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        m = mean_scores(rows[mode])
        print(
            f"| {mode} | {m.spatial_iou:.3f} | {m.spatiotemporal_iou:.3f} | "
            f"{m.weighted_spatial_iou:.3f} | {m.mse:.5f} |"
        )
    print_differences(rows)
    print_differences_by_kind(rows, kinds)
    print_per_frame(per_frame)


def print_differences(rows: dict[str, list[Scores]]) -> None:
    print(
        "\nper-scene differences, mean ± 95 % confidence half-width "
        "(the first mode leads where an IoU difference is > 0 and the MSE difference < 0):\n"
    )
    print(f"| difference | {COLUMNS} |")
    print("|---|---|---|---|---|")
    for a, b in COMPARISONS:
        print(f"| {a} − {b} | {difference_cells(rows[a], rows[b])} |")


def print_differences_by_kind(rows: dict[str, list[Scores]], kinds: list[str]) -> None:
    print("\nthe same, by what moves the objects after the prefix:\n")
    print(f"| difference | scenes | n | {COLUMNS} |")
    print("|---|---|---|---|---|---|---|")
    for a, b in COMPARISONS:
        for kind in KINDS:
            chosen = [i for i, k in enumerate(kinds) if k == kind]
            cells = difference_cells([rows[a][i] for i in chosen], [rows[b][i] for i in chosen])
            print(f"| {a} − {b} | {kind} | {len(chosen)} | {cells} |")


def difference_cells(a: list[Scores], b: list[Scores]) -> str:
    """The four columns of a - b, mean ± 95 % half-width; dashes below 2 scenes."""
    if len(a) < 2:
        return " | ".join(["–"] * len(DIGITS))
    d = paired_difference(a, b)
    return " | ".join(
        f"{m:+.{digits}f} ± {h:.{digits}f}"
        for m, h, digits in zip(d.mean.as_row(), d.half_width.as_row(), DIGITS, strict=True)
    )


def print_per_frame(per_frame: dict[str, list[np.ndarray]]) -> None:
    print("\nper-frame IoU of the object masks, mean over scenes:\n")
    columns = [int(np.flatnonzero(SCORED == f)[0]) for f in PER_FRAME]
    print("| mode | " + " | ".join(f"frame {f}" for f in PER_FRAME) + " |")
    print("|---" * (len(PER_FRAME) + 1) + "|")
    for mode in MODES:
        curve = np.mean(per_frame[mode], axis=0)[columns]
        print(f"| {mode} | " + " | ".join(f"{v:.2f}" for v in curve) + " |")


if __name__ == "__main__":
    main()
