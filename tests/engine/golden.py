"""A fixed set of requests whose outputs are recorded in `golden.npz`, so that refactors of the
engine can prove they change no output bit.

`python -m tests.engine.golden --write` records the set with the code of the checkout; the test
(test_golden.py) regenerates it and compares. The set covers t2v, i2v and v2v, cfg 3 and the
distilled one-forward path, a prompt switch, an unbounded session, a guidance override, and
sessions batched together while joining at different steps.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).with_name("golden.npz")
SIZE = 64  # pixels; latent 8x8, 96 DiT tokens per chunk


def _frames(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, SIZE, SIZE, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen, device="cpu")


@dataclass(frozen=True)
class Request:
    """One session of the set, in the engine's terms."""

    sid: str
    prompts: tuple[tuple[int, str], ...]
    num_chunks: int | None  # None: unbounded, cancelled once `take` chunks are out
    seed: int
    mode: str = "t2v"
    image_seed: int | None = None  # i2v start image
    video_frames: int = 0  # v2v prefix video length
    text_scales: tuple[float, ...] | None = None
    take: int = 2  # unbounded sessions: chunks recorded before the cancel
    join_step: int = 0  # batched case: engine step at which the session is opened


SWITCH = ((0, "a red ball rolls"), (1, "the ball turns blue"))

# case name -> (preset, requests run together in one engine)
CASES: dict[str, tuple[str, tuple[Request, ...]]] = {
    "t2v_cfg3_switch": ("tiny", (Request("t2v", SWITCH, 3, seed=1),)),
    "i2v_cfg3": ("tiny", (Request("i2v", ((0, "a cat"),), 2, seed=2, mode="i2v", image_seed=0),)),
    "v2v_cfg3": ("tiny", (Request("v2v", ((0, "more"),), 2, seed=3, mode="v2v", video_frames=40),)),
    "t2v_cfg3_scales": (
        "tiny",
        (Request("s", ((0, "a box"),), 2, seed=4, text_scales=(2.0, 2.0, 2.0, 1.0, 1.0)),),
    ),
    "unbounded_cfg3": ("tiny", (Request("u", ((0, "forever"),), None, seed=5, take=2),)),
    "t2v_distill_switch": ("tiny_distill", (Request("d", SWITCH, 3, seed=6),)),
    "i2v_distill": (
        "tiny_distill",
        (Request("di", ((0, "a dog"),), 2, seed=7, mode="i2v", image_seed=1),),
    ),
    "batched_cfg3": (
        "tiny",
        (
            Request("a", ((0, "a red ball rolls"),), 3, seed=1),
            Request("b", SWITCH, 2, seed=2, join_step=3),
            Request("c", ((0, "a cat"),), 2, seed=3, mode="i2v", image_seed=0, join_step=5),
            Request("v", ((0, "more"),), 2, seed=4, mode="v2v", video_frames=40, join_step=6),
        ),
    ),
    "batched_distill": (
        "tiny_distill",
        (
            Request("a", SWITCH, 3, seed=1),
            Request("b", ((0, "a box"),), 2, seed=2, join_step=2),
        ),
    ),
}


Chunks = dict[str, list[tuple[np.ndarray, np.ndarray]]]  # sid -> (frames, latent) per chunk


def run_case(model, requests: tuple[Request, ...]) -> Chunks:
    """Every session's output chunks in order: (uint8 frames, fp32 clean latent)."""
    from engine.engine import Engine
    from scheduler.session import SessionParams

    engine = Engine(model)
    out: Chunks = {r.sid: [] for r in requests}
    pending = sorted(requests, key=lambda r: r.join_step)
    live: dict[str, Request] = {}
    step = 0
    while pending or engine.scheduler.has_work():
        while pending and pending[0].join_step <= step:
            r = pending.pop(0)
            engine.open(
                SessionParams(
                    r.sid,
                    r.prompts,
                    r.num_chunks,
                    SIZE,
                    SIZE,
                    seed=r.seed,
                    mode=r.mode,
                    image=None if r.image_seed is None else _frames(1, r.image_seed)[0].numpy(),
                    video=_frames(r.video_frames, 9).numpy() if r.video_frames else None,
                    text_scales=r.text_scales,
                )
            )
            live[r.sid] = r
        for d in engine.step():
            engine.consumed(d.session_id)
            out[d.session_id].append((d.frames.numpy().copy(), d.latent.numpy().copy()))
            r = live[d.session_id]
            if r.num_chunks is None and len(out[d.session_id]) >= r.take:
                engine.cancel(d.session_id)
        step += 1
    return out


def run_all(models: dict[str, object]) -> dict[str, np.ndarray]:
    """The whole set as flat arrays: `case/sid/i/frames` and `case/sid/i/latent`."""
    flat = {}
    for case, (preset, requests) in CASES.items():
        for sid, chunks in run_case(models[preset], requests).items():
            for i, (frames, latent) in enumerate(chunks):
                flat[f"{case}/{sid}/{i}/frames"] = frames
                flat[f"{case}/{sid}/{i}/latent"] = latent
    return flat


def machine() -> str:
    """What decides the float rounding paths: CPU vendor and the ISA torch dispatches to."""
    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{vendor}/{torch.backends.cpu.get_cpu_capability()}/{platform.machine()}"


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def main() -> None:
    import tempfile

    from model.folder import load_model, write_random

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"record {GOLDEN.name}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            p: load_model(write_random(p, Path(tmp) / p, seed=0)) for p in ("tiny", "tiny_distill")
        }
        flat = run_all(models)
    if args.write:
        # Latents are stored whole (small); frames as digests plus their sum, which the test
        # compares exactly on the recording machine's float paths and within 1 level elsewhere.
        stored = {k: v for k, v in flat.items() if k.endswith("/latent")}
        for k, v in flat.items():
            if k.endswith("/frames"):
                stored[k + ".sha256"] = np.array(digest(v))
                stored[k + ".sum"] = np.array(int(v.astype(np.int64).sum()))
                stored[k + ".shape"] = np.array(v.shape)
        stored["machine"] = np.array(machine())
        np.savez_compressed(GOLDEN, **stored)
        print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes, {len(flat) // 2} chunks)")


if __name__ == "__main__":
    main()
