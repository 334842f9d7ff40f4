"""The GPU check (issue 22): one command that fits a short GPU lease (under 8 minutes on one
H100 or H200) and prints markdown tables ready for BENCHMARKS.md. docs/gpu.md says how to run it
on a lent machine and what each row means.

    python3 bench/gpu_check.py                                  # on a GPU (auto device)
    .venv/bin/python bench/gpu_check.py --quick --device cpu    # every part at tiny sizes (CI)

Parts, in the order they run (the most valuable first; each case is guarded and time-boxed, so
a failure or an overrun is a row saying so and the run goes on):
  1. correctness: the tiny DiT's forward on the device against the CPU (fp32 < 1e-4 relative;
     bf16 no further from the fp32 reference than the CPU's own bf16 run is), a whole generation
     on both, and a streamed generation through a real `magi-server --device` and `magi-client`;
  2. the 4.5B shape with random weights made on the device: one engine step with the window
     full, 480x480 and 720x720, cfg 3 and distill 8 steps: time, achieved TFLOP/s and MFU over
     the FLOP floor `forward_flops` counts, peak memory;
  3. (runs last) batching at 480x480, distill 8 steps: 1, 2, 4, 8 sessions in one engine
     against one session alone, interleaved A B A B, median of the pairwise ratios;
  4. one 4.5B distill 480x480 session with fp8 weights (and bf16 beside it): time to first
     chunk and the steady chunk period against the real-time target of 1.0 s per chunk;
  5. (CUDA only, after 3) --compile off against on (model/compile.py) for that session's
     steps: stages alternating after warming both, median ratio, the first compiled stage.
`--quick` shrinks the 4.5B parts to the tiny presets and small videos; the code path is the
same. Full numbers go to $OUT/gpu_check.json (default ./gpu-check-out).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: the repo root (holding model/) is not on sys.path
    sys.path.insert(0, str(ROOT))

from bench.model_forward import (  # noqa: E402
    CAPTION_TOKENS,
    Case,
    build_window,
    chunk_tokens,
    forward_flops,
    tiny_dit,
    window_flops,
)
from engine.engine import ChunkDone, Engine  # noqa: E402
from model.attention import SdpaBackend  # noqa: E402
from model.checkpoint import build_dit_meta, random_dit  # noqa: E402
from model.compile import compile_dit, eager  # noqa: E402
from model.config import MagiConfig, get_preset  # noqa: E402
from model.dit import ChunkGroup, VideoDiT  # noqa: E402
from model.folder import MagiModel, load_model, write_random  # noqa: E402
from model.text import SpecialTokens, TextEncoder, write_special_tokens  # noqa: E402
from model.tiny_t5 import write_tiny_t5  # noqa: E402
from model.vae import VAEConfig, ViTVAE  # noqa: E402
from scheduler.scheduler import SchedulerConfig  # noqa: E402
from scheduler.session import SessionParams  # noqa: E402

PROMPT = "a red ball rolls to the left"
REALTIME_PERIOD_S = 1.0  # a chunk is 24 frames = 1 s of video at 24 fps
FP32_BOUND = 1e-4  # relative error of an fp32 forward on the device against the CPU
BF16_FACTOR = 2.0  # bf16 on the device may be this much further from fp32 than the CPU's bf16
GENERATION_BOUND = 1e-3  # latents after a whole generation: the forward's error compounds
FRAME_BOUND = 0.5  # mean |difference| of uint8 frames, levels
PEAKS_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 of the SXM parts (same chip)
WEIGHT_STD = 0.02  # random matrices, as model.checkpoint.init_random_ draws them
VECTOR_STD = 0.1  # random norms (stored gamma - 1) and biases, likewise
FP8_SPREAD = 112.0  # random e4m3 weights ~ N(0, 112^2): a quarter of the e4m3 range
WARMUP = 1  # untimed full-window steps after the window fills (kernel choice, allocator)
REPS = 3  # timed full-window steps at most
ROUNDS = 3  # counted batching rounds at most, after a warm-up round
PERIODS = 3  # chunk periods timed per real-time session at most
COMPILE_GUESS_S = 60.0  # inductor's first compile of the three graphs (a guess, to skip early)

# The MAGI-1 VAE's shape, the diffusers converter's values (magi1-reference.md §5.1: the
# official ddconfig lives in the checkpoint). Random weights, so only the decode's cost is real.
MAGI_VAE = VAEConfig(
    embed_dim=1024,
    depth=24,
    num_heads=16,
    mlp_ratio=4.0,
    patch_size=8,
    patch_length=4,
    video_size=256,
    video_length=16,
    z_chans=16,
    qkv_bias=True,
    with_cls_token=True,
    ln_in_attn=True,
)


@dataclass(frozen=True)
class Scale:
    """The sizes one run uses: the real ones, or tiny ones with the same code path (--quick)."""

    name: str
    presets: dict[str, str]  # "cfg3" / "distill" / "fp8" -> preset
    sizes: tuple[int, ...]  # video sides of part 2; part 3 and 4 use the first
    sessions: tuple[int, ...]  # part 3's session counts
    vae: VAEConfig
    budgets: dict[str, float]  # seconds per part at most
    cfg3_steps: int = 4  # one stage per step: every step past the fill is a full window
    distill_steps: int = 8  # distill-8: two steps per stage (full window, then from the cache)


FULL = Scale(
    name="4.5B",
    presets={"cfg3": "4.5B_base", "distill": "4.5B_distill", "fp8": "4.5B_distill_quant"},
    sizes=(480, 720),
    sessions=(1, 2, 4, 8),
    vae=MAGI_VAE,
    budgets={
        "forward": 40,
        "server": 90,
        "step": 170,
        "realtime": 70,
        "batching": 150,
        "compile": 150,
    },
)
QUICK = Scale(
    name="tiny",
    presets={"cfg3": "tiny", "distill": "tiny_distill", "fp8": "tiny_distill_quant"},
    sizes=(32,),
    sessions=(1, 2),
    vae=VAEConfig.tiny(),
    budgets={
        "forward": 20,
        "server": 90,
        "step": 20,
        "realtime": 20,
        "batching": 20,
        "compile": 90,  # compiling takes as long for the tiny model
    },
)


# ---------------------------------------------------------------------------------------------
# Results


class Skipped(Exception):
    """A case left out to keep the run inside its time budget (a row says so)."""


@dataclass
class Table:
    """One part's markdown table; a failed case is a row holding its error."""

    key: str  # part id in the JSON and the headings
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: list[dict] = field(default_factory=list)  # every measured number, for the JSON
    failed: bool = False  # a row errored or missed its bound

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])
        print(f"  {' | '.join(self.rows[-1])}", flush=True)

    def problem(self, case: str, what: str) -> None:
        self.add(case, what, *([""] * (len(self.columns) - 2)))

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines)


def verdict(ok: bool, table: Table) -> str:
    if not ok:
        table.failed = True
    return "ok" if ok else "FAIL"


@dataclass
class Check:
    """Everything the parts share: the device, the sizes, the clock and the deadlines."""

    device: torch.device
    scale: Scale
    peak_tflops: float | None
    tmp: Path
    out: Path
    deadline: float  # time.monotonic() by which the whole run ends
    started: float = field(default_factory=time.monotonic)
    tables: list[Table] = field(default_factory=list)
    rate: float | None = None  # best DiT FLOP/s measured so far, for cost estimates
    cpu_frames: list[np.ndarray] | None = None  # part 1's CPU generation, for the server's
    # part 1's video side (64; 32 in --quick, where the CPU runs both sides)
    check_size: int = 64
    _tiny_folder: Path | None = None
    _assets: Assets | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def tiny_folder(self) -> Path:
        if self._tiny_folder is None:
            self._tiny_folder = write_random("tiny", self.tmp / "tiny", seed=0)
        return self._tiny_folder

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        self.sync()
        if self.cuda:
            torch.cuda.empty_cache()

    def mark(self) -> object:
        """A point on the device's own timeline: a CUDA event (the work is asynchronous), or
        the host clock on the CPU."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: object, end: object) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def mfu(self, flops_per_s: float) -> str:
        if self.peak_tflops is None:
            return "n/a"
        return f"{100 * flops_per_s / 1e12 / self.peak_tflops:.1f} %"


def run_part(check: Check, table: Table, budget_s: float, body: Callable[[float], None]) -> None:
    """Run one part with its budget (never past the run's deadline); an exception the part
    did not catch per case becomes a row."""
    check.tables.append(table)
    print(f"[{check.elapsed():6.1f} s] {table.title}", flush=True)
    part_deadline = time.monotonic() + min(budget_s, max(check.left(), 0.0))
    try:
        body(part_deadline)
    except Skipped as e:
        table.problem("(part)", f"skipped: {e}")
    except Exception as e:  # noqa: BLE001 - the run goes on; the row holds the error
        table.failed = True
        table.problem("(part)", f"error: {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
    finally:
        check.free()
    write_outputs(check)


@contextmanager
def case(check: Check, table: Table, name: str) -> Iterator[None]:
    """One row's work: an error or a skip becomes the row, and the run goes on."""
    try:
        yield
    except Skipped as e:
        table.problem(name, f"skipped: {e}")
    except Exception as e:  # noqa: BLE001
        table.failed = True
        table.problem(name, f"error: {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
    finally:
        check.free()


def write_outputs(check: Check) -> None:
    """The JSON and the markdown so far, rewritten after every part (a killed run keeps what
    it measured)."""
    check.out.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": machine(check),
        "parts": {
            t.key: {
                "title": t.title,
                "columns": t.columns,
                "rows": t.rows,
                "notes": t.notes,
                "raw": t.raw,
            }
            for t in check.tables
        },
    }
    (check.out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (check.out / "gpu_check.md").write_text(report(check) + "\n")


def machine(check: Check) -> dict[str, object]:
    info: dict[str, object] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": str(check.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "scale": check.scale.name,
        "peak_tflops": check.peak_tflops,
    }
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        info |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        }
    return info


def report(check: Check) -> str:
    m = machine(check)
    where = m.get("gpu", platform.processor() or platform.machine())
    head = [
        f"## GPU check: {where} ({m['device']}), {m['scale']} scale",
        "",
        f"`{m['command']}`; torch {m['torch']}"
        + (f", CUDA {m['cuda']}, sm {m['capability']}" if check.cuda else "")
        + f"; {m['date']}; {check.elapsed():.0f} s"
        + (f"; MFU against {check.peak_tflops:g} TFLOP/s" if check.peak_tflops else ""),
    ]
    return "\n\n".join(["\n".join(head), *(t.markdown() for t in check.tables)])


# ---------------------------------------------------------------------------------------------
# Models with random weights made on the device


@torch.no_grad()
def fill_random_(
    module: nn.Module,
    seed: int,
    vector_std: float = VECTOR_STD,
    layernorm_gain_one: bool = False,
) -> None:
    """Random weights drawn where the module lives (a 9 GB DiT never passes through the
    host): N(0, 0.02^2) matrices, N(0, vector_std^2) vectors, the official RoPE bands, and for
    fp8 linears e4m3 weights over a quarter of the e4m3 range with the scale that makes them
    N(0, 0.02^2) again (activation scales 1)."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    gains = set()
    if layernorm_gain_one:
        gains = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    for name, p in module.named_parameters():
        if name.endswith("rope.bands"):
            n = p.numel()
            steps = torch.arange(n, dtype=torch.float32, device=device) / n
            p.copy_(1.0 / 10000**steps)
        elif p.dtype == torch.float8_e4m3fn:
            w = torch.randn(p.shape, generator=gen, device=device) * FP8_SPREAD
            p.copy_(w.clamp(-448, 448).to(p.dtype))
        elif name.endswith("weight_scale"):
            p.fill_(WEIGHT_STD / FP8_SPREAD)
        elif name.endswith(("input_scale", "smooth_scale")):
            p.fill_(1.0)
        else:
            std = WEIGHT_STD if p.dim() >= 2 else vector_std
            values = torch.randn(p.shape, generator=gen, device=device) * std
            p.copy_(values + 1 if id(p) in gains else values)


def device_dit(config: MagiConfig, device: torch.device, seed: int = 0) -> VideoDiT:
    """The DiT built on meta, allocated on `device` and filled there; then the fp32 islands,
    as `load_dit` gives them (§3.12)."""
    dit = build_dit_meta(config).to_empty(device=device)
    fill_random_(dit, seed)
    dit.requires_grad_(False)
    return dit.promote_high_precision().eval()


@dataclass
class Assets:
    """What a MagiModel needs besides its DiT, shared by the presets of one scale: a small T5 of
    the caption width on the CPU (the 4.5B configs' t5_device), special tokens, and a VAE of the
    MAGI-1 shape on the device in the DiT's dtype (as load_model loads it)."""

    folder: Path
    vae: ViTVAE
    text: TextEncoder
    tokens: SpecialTokens


def make_assets(check: Check) -> Assets:
    if check._assets is None:
        cfg = get_preset(check.scale.presets["distill"]).model_config
        folder = check.tmp / f"assets-{check.scale.name}"
        write_tiny_t5(folder / "t5", d_model=cfg.caption_channels, seed=2)
        tokens = write_special_tokens(folder / "special_tokens.npz", cfg.caption_channels, seed=3)
        with torch.device("meta"):
            vae = ViTVAE(check.scale.vae)
        vae = vae.to_empty(device=check.device)
        fill_random_(vae, seed=1, vector_std=WEIGHT_STD, layernorm_gain_one=True)
        check._assets = Assets(
            folder,
            vae.to(cfg.dtype).eval(),
            TextEncoder(folder / "t5"),
            SpecialTokens.load(tokens),
        )
    return check._assets


def bench_model(check: Check, variant: str) -> MagiModel:
    config = get_preset(check.scale.presets[variant])
    assets = make_assets(check)
    dit = device_dit(config, check.device)
    return MagiModel(assets.folder, config, dit, assets.vae, assets.text, assets.tokens)


def vae_words(scale: Scale) -> str:
    if scale.vae == MAGI_VAE:
        return "the MAGI-1 VAE's shape (reference §5.1) with random weights"
    return "the tiny VAE"


def scheduler_config() -> SchedulerConfig:
    # admission by memory is not what is measured: every session runs at once
    return SchedulerConfig(memory_budget_bytes=1 << 50, max_chunk_slots=1 << 16, max_queued=64)


# ---------------------------------------------------------------------------------------------
# Measuring engine steps


@dataclass
class Forward:
    """One DiT forward seen by the probe."""

    start: object  # marks on the device's timeline
    end: object
    flops: float  # forward_flops of its chunks: the floor
    chunk_slots: int
    has_clean: bool  # a clean chunk re-forwarded for its KV: the window is full


class DitProbe:
    """Hooks on the DiT the engine calls: each forward's FLOP floor (from its chunks' query,
    key and caption token counts) and its time on the device's clock. Nothing in the engine
    changes: what is timed is what the server runs."""

    def __init__(self, check: Check, model: MagiModel) -> None:
        self.check = check
        self.cfg = model.config.model_config
        self.clean_t = model.config.runtime_config.clean_t
        self.forwards: list[Forward] = []
        self._open: tuple[object, float, int, bool] | None = None
        self._hooks = [
            model.dit.register_forward_pre_hook(self._pre),
            model.dit.register_forward_hook(self._post),
        ]

    def _pre(self, module: nn.Module, args: tuple) -> None:
        groups: list[ChunkGroup] = args[0]
        p, pt = self.cfg.patch_size, self.cfg.t_patch_size
        chunks, clean = [], False
        for group in groups:
            for c in group.chunks:
                _, t, h, w = c.latent.shape
                k0, k1 = c.k_range
                chunks.append((t // pt * (h // p) * (w // p), k1 - k0, c.caption.shape[0]))
                clean |= c.t == self.clean_t
        self._open = (
            self.check.mark(),
            forward_flops(self.cfg, chunks)["total"],
            len(chunks),
            clean,
        )

    def _post(self, module: nn.Module, args: tuple, output: object) -> None:
        start, flops, slots, clean = self._open
        self.forwards.append(Forward(start, self.check.mark(), flops, slots, clean))

    def take(self) -> list[Forward]:
        out, self.forwards = self.forwards, []
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def step(check: Check, engine: Engine) -> tuple[list[ChunkDone], float]:
    """One engine step, its outputs consumed; ms on the device's timeline."""
    start = check.mark()
    done = engine.step()
    end = check.mark()
    for d in done:
        engine.consumed(d.session_id)
    return done, check.ms(start, end)


def open_sessions(
    engine: Engine, n: int, size: int, steps: int, prefix: str = "s", chunks: int | None = None
) -> None:
    for i in range(n):
        engine.open(
            SessionParams(
                f"{prefix}{i}", ((0, PROMPT),), chunks, size, size, seed=i, num_steps=steps
            )
        )


def full_window_flops(cfg, size: int, cfg3: bool) -> float:
    """The floor of one steady-state step with the clean chunk in it, one session: the
    window's forward (cfg 3: twice, text and null) plus the self-only chunks (cfg 3: four
    uncond; distill: the nearly-clean copy). For estimates; the probe counts exactly."""
    np_ = chunk_tokens(cfg, size, size)
    window = window_flops(cfg, size, size, 4, "clean")["total"]
    alone = forward_flops(cfg, [(np_, np_, CAPTION_TOKENS)])["total"]
    return 2 * window + 4 * alone if cfg3 else window + alone


def guard(check: Check, flops: float, deadline: float, what: str) -> None:
    """Skip a case whose FLOPs at the best rate seen so far would not end by the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise Skipped("the part's time budget is spent")
    if check.rate is not None and flops / check.rate > left:
        raise Skipped(
            f"{what} needs ~{flops / check.rate:.0f} s at the rate seen, {left:.0f} s left"
        )


# ---------------------------------------------------------------------------------------------
# 1. Correctness


def relative(got: Tensor, want: Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm())


def velocities(model: VideoDiT, group: ChunkGroup, device: torch.device) -> Tensor:
    moved = ChunkGroup(
        [
            dataclasses.replace(c, latent=c.latent.to(device), caption=c.caption.to(device))
            for c in group.chunks
        ]
    )
    out = model([moved])
    return torch.cat([v.flatten() for per_group in out for v in per_group]).cpu()


def part_correctness(check: Check, deadline: float) -> None:
    table = check.tables[-1]
    dev = str(check.device)
    size = check.check_size
    with case(check, table, "DiT forward, fp32"):
        config = get_preset("tiny")
        cpu_dit = random_dit(config, seed=0).promote_high_precision()
        dev_dit = copy.deepcopy(cpu_dit).to(check.device)
        group = build_window(cpu_dit, config, Case(size, 4, "clean", torch.float32))
        rel = relative(velocities(dev_dit, group, check.device), velocities(cpu_dit, group, "cpu"))
        table.raw.append({"case": "forward_fp32", "relative": rel})
        table.add(
            f"DiT forward, fp32 (tiny, 4 in flight + clean, {size}x{size})",
            f"{dev} vs cpu",
            f"{rel:.1e}",
            f"< {FP32_BOUND:.0e}",
            verdict(rel < FP32_BOUND, table),
        )
    with case(check, table, "DiT forward, bf16"):
        config16, cpu16 = tiny_dit(torch.bfloat16)
        reference = VideoDiT(get_preset("tiny"))  # fp32 math over the same bf16-rounded weights
        reference.load_state_dict({k: v.float() for k, v in cpu16.state_dict().items()})
        reference.requires_grad_(False).eval()
        dev16 = copy.deepcopy(cpu16).to(check.device)
        group = build_window(cpu16, config16, Case(size, 4, "clean", torch.bfloat16))
        want = velocities(reference, group, "cpu")
        e_cpu = relative(velocities(cpu16, group, "cpu"), want)
        e_dev = relative(velocities(dev16, group, check.device), want)
        table.raw.append({"case": "forward_bf16", "device_vs_fp32": e_dev, "cpu_vs_fp32": e_cpu})
        table.add(
            f"DiT forward, bf16 against fp32 math (tiny, {size}x{size})",
            f"{dev} {e_dev:.1e}, cpu {e_cpu:.1e}",
            f"{e_dev:.1e}",
            f"<= {BF16_FACTOR:g} x cpu's",
            verdict(e_dev <= BF16_FACTOR * e_cpu, table),
        )
    with case(check, table, "attention"):
        attention_rows(check, table)
    with case(check, table, "whole generation"):
        folder = check.tiny_folder()
        params = SessionParams("g", ((0, PROMPT),), 2, size, size, seed=0)
        runs = {}
        for where in ("cpu", check.device):
            engine = Engine(load_model(folder, device=where))
            engine.open(params)
            runs[str(where)] = engine.run_until_idle()
        cpu, got = runs["cpu"], runs[dev]
        check.cpu_frames = [d.frames.numpy() for d in cpu]
        rel = relative(
            torch.cat([d.latent.flatten().cpu() for d in got]),
            torch.cat([d.latent.flatten() for d in cpu]),
        )
        diff = frame_diff([d.frames.numpy() for d in got], check.cpu_frames)
        table.raw.append({"case": "generation", "latent_relative": rel, "frames_mean_abs": diff})
        table.add(
            f"whole generation (tiny, cfg 3, 2 chunks, {size}x{size}): latents",
            f"{dev} vs cpu",
            f"{rel:.1e}",
            f"< {GENERATION_BOUND:.0e}",
            verdict(rel < GENERATION_BOUND, table),
        )
        table.add(
            "whole generation: uint8 frames, mean abs difference",
            f"{dev} vs cpu",
            f"{diff:.3f}",
            f"<= {FRAME_BOUND} levels",
            verdict(diff <= FRAME_BOUND, table),
        )


def attention_rows(check: Check, table: Table) -> None:
    """Which route the attention takes on this device (varlen flash, SDPA with enable_gqa, or
    SDPA with KV heads repeated), as notes; on CUDA with varlen also a row: the varlen call and
    the per-shape SDPA calls (bf16) against fp32 math, over a window's overlapping key ranges."""
    backend, dev = SdpaBackend(), check.device
    varlen = False
    for name in ("tiny", "4.5B_distill"):
        m = get_preset(name).model_config
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(64, m.num_attention_heads, m.kv_channels, device=dev, dtype=dtype)
            k = torch.randn(64, m.num_query_groups, m.kv_channels, device=dev, dtype=dtype)
            route = backend.path(q, k, k)
            varlen |= route.startswith("varlen")
            table.raw.append(
                {"case": "attention_path", "preset": name, "dtype": str(dtype), "path": route}
            )
            table.notes.append(f"attention on {dev}, {name} heads, {dtype}: {route}")
    if not varlen:
        table.notes.append(f"varlen attention: not taken on {dev} (CUDA sm80+ bf16 only)")
        return
    m = get_preset("4.5B_distill").model_config
    q = torch.randn(4096, m.num_attention_heads, m.kv_channels, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(2, 5120, m.num_query_groups, m.kv_channels, device=dev, dtype=q.dtype)
    n = 1024  # tokens per chunk: 4 chunks in flight behind one cached, look-back 2..5 chunks
    q_ranges = [(i * n, (i + 1) * n) for i in range(4)]
    k_ranges = [(max(0, i + 1 - back) * n, (i + 2) * n) for i, back in enumerate((2, 3, 4, 5))]
    per_shape = SdpaBackend(use_varlen=False)
    want = per_shape.ranged(q.float(), kv[0].float(), kv[1].float(), q_ranges, k_ranges)
    times = {}
    for name, b in (("varlen", backend), ("sdpa", per_shape)):
        plan = b.plan(q_ranges, k_ranges, dev)
        b.attend(q, kv[0], kv[1], plan)  # warm-up
        start = check.mark()
        for _ in range(5):
            got = b.attend(q, kv[0], kv[1], plan)
        end = check.mark()
        times[name] = (check.ms(start, end) / 5, relative(got, want))
    (t_var, e_var), (t_sdpa, e_sdpa) = times["varlen"], times["sdpa"]
    table.raw.append({"case": "attention_varlen", "varlen": times["varlen"], "sdpa": times["sdpa"]})
    table.add(
        "attention: varlen call vs per-shape SDPA, bf16 against fp32 (4.5B heads, 4 chunks)",
        f"{dev} varlen {e_var:.1e}, sdpa {e_sdpa:.1e}",
        f"{e_var:.1e}",
        f"<= {BF16_FACTOR:g} x sdpa's",
        verdict(e_var <= BF16_FACTOR * e_sdpa, table),
    )
    table.notes.append(f"attention per layer call: varlen {t_var:.2f} ms, sdpa {t_sdpa:.2f} ms")


def frame_diff(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=True)):
        shapes = ([g.shape for g in got], [w.shape for w in want])
        raise AssertionError(f"chunks differ in number or shape: {shapes}")
    a = np.concatenate([g.astype(np.int16).ravel() for g in got])
    b = np.concatenate([w.astype(np.int16).ravel() for w in want])
    return float(np.abs(a - b).mean())


def part_server(check: Check, deadline: float) -> None:
    """A real `magi-server --device` (its own worker process) and `magi-client generate` as a
    user runs them; raw frames back, compared with part 1's CPU engine run of the same request."""
    from tests.serverproc import ServerProcess

    table = check.tables[-1]
    dev = "cuda" if check.cuda else "cpu"
    size = str(check.check_size)
    name = f"magi-server --device {dev} + magi-client generate (tiny, 2 chunks, {size}x{size})"
    with case(check, table, name):
        folder = check.tiny_folder()
        tmp = check.tmp / "server"
        raw, out = tmp / "raw", tmp / "out.mp4"
        # the carried wheels (PYTHONPATH) must reach the server's and the client's processes
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        left = max(deadline - time.monotonic(), 1.0)
        server = ServerProcess(tmp, "--device", dev, model=folder, env=env, start_timeout_s=left)
        try:
            server.wait_serving()
            started = time.monotonic()
            client = subprocess.run(
                [sys.executable, "-m", "client", "generate", "--server", server.address]
                + ["--prompt", PROMPT, "--chunks", "2", "--seed", "0", "--width", size]
                + ["--height", size, "--out", str(out), "--raw", str(raw), "--raw-format", "npy"],
                cwd=ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=max(deadline - time.monotonic(), 1.0),
            )
            wall = time.monotonic() - started
            logs = server.logs()
        finally:
            server.stop()
            shutil.copy(server.log_path, check.out / "server.log")
        if client.returncode:
            raise RuntimeError(f"magi-client exited {client.returncode}: {client.stderr[-400:]}")
        if f"device={dev}" not in logs:
            raise RuntimeError(f"the worker did not log device={dev} (server.log in $OUT)")
        frames = [np.load(p) for p in sorted(raw.glob("chunk_*.npy"))]
        diff = frame_diff(frames, check.cpu_frames or [])
        mp4 = out.stat().st_size
        table.raw.append({"case": "server", "wall_s": wall, "frames_mean_abs": diff, "mp4": mp4})
        table.add(
            name,
            f"{len(frames)} chunks in {wall:.1f} s, {mp4} B mp4",
            f"{diff:.3f}",
            f"frames vs the CPU engine <= {FRAME_BOUND} levels",
            verdict(diff <= FRAME_BOUND and mp4 > 0, table),
        )


# ---------------------------------------------------------------------------------------------
# 2. One engine step of the 4.5B shape


def part_step(check: Check, deadline: float) -> None:
    table = check.tables[-1]
    scale = check.scale
    # the distill model first: its numbers feed the real-time question
    for variant, steps, label in (
        ("distill", scale.distill_steps, f"distill, {scale.distill_steps} steps"),
        ("cfg3", scale.cfg3_steps, "cfg 3"),
    ):
        model = None
        for size in scale.sizes:
            with case(check, table, f"{size}x{size} {label}"):
                cfg = get_preset(scale.presets[variant]).model_config
                # fill (~steps/2 full steps) + warm-up + the timed steps, of which at least one
                flops = full_window_flops(cfg, size, variant == "cfg3")
                guard(check, flops * (steps / 2 + WARMUP + 1), deadline, f"{size}x{size} {label}")
                if model is None:
                    model = bench_model(check, variant)
                step_case(check, table, model, size, steps, label, deadline)
        del model
        check.free()
    table.notes += [
        f"Random weights made on the device (no checkpoint), {vae_words(scale)} for decode, a "
        "small T5 of the caption width on the CPU (the prompt is encoded before timing).",
        "One session, window full: 4 chunks in flight plus the clean chunk re-forwarded for its "
        "KV (cfg 3: text and null branches over it, 4 uncond chunks; distill: the nearly-clean "
        f"copy). cfg 3 runs a {scale.cfg3_steps}-step grid so every step is a full window; a "
        "step's cost does not depend on the step count.",
        "step ms: the whole engine step (assemble, DiT, Euler, decode when a chunk finishes) on "
        "the device's clock (CUDA events), median of the timed steps after a warm-up; DiT ms: the "
        "forward alone. TFLOP/s = the floor (`forward_flops` of the forward's chunks) / DiT ms.",
        "peak GiB: torch.cuda.max_memory_allocated over the timed steps, weights included.",
    ]


def step_case(
    check: Check,
    table: Table,
    model: MagiModel,
    size: int,
    steps: int,
    label: str,
    deadline: float,
) -> None:
    # decodes within the step (no side stream), so the step's device time includes them
    engine = Engine(model, scheduler_config(), overlap_decode=False)
    probe = DitProbe(check, model)
    try:
        model.text.encode(PROMPT)  # cached by text, as the server's encoder is
        open_sessions(engine, 1, size, steps)
        for _ in range(steps):  # the first chunk's whole grid: then the window is full
            step(check, engine)
        probe.take()
        if check.cuda:
            torch.cuda.reset_peak_memory_stats(check.device)
        full: list[tuple[float, Forward]] = []
        others: list[tuple[float, Forward]] = []  # distill's steps reading the clean chunk's KV
        for _ in range(2 * (WARMUP + REPS) * max(1, steps // 4)):  # full steps come every stage
            if len(full) >= WARMUP + REPS:
                break
            _, ms = step(check, engine)
            (forward,) = probe.take()
            (full if forward.has_clean else others).append((ms, forward))
            if len(full) > WARMUP and time.monotonic() > deadline:
                break
        if not full:
            raise AssertionError(f"no full-window step (clean chunk re-forwarded) in {steps} steps")
        peak = torch.cuda.max_memory_allocated(check.device) if check.cuda else 0
    finally:
        probe.close()
        engine.cancel("s0")
    timed = full[WARMUP:] or full
    step_ms = statistics.median(ms for ms, _ in timed)
    dit_ms = statistics.median(check.ms(f.start, f.end) for _, f in timed)
    forward = timed[0][1]
    rate = forward.flops / (dit_ms / 1e3)
    check.rate = max(check.rate or 0.0, rate)
    table.raw.append(
        {
            "size": size,
            "variant": label,
            "step_ms": [ms for ms, _ in timed],
            "dit_ms": [check.ms(f.start, f.end) for _, f in timed],
            "cache_step_ms": [ms for ms, _ in others],
            "flops": forward.flops,
            "chunk_slots": forward.chunk_slots,
            "peak_bytes": peak,
        }
    )
    table.add(
        f"{size}x{size}",
        label,
        forward.chunk_slots,
        f"{step_ms:.1f}",
        f"{dit_ms:.1f}",
        f"{forward.flops / 1e12:.3g}",
        f"{rate / 1e12:.3g}",
        check.mfu(rate),
        f"{peak / 2**30:.1f}" if check.cuda else "n/a",
        len(timed),
    )


# ---------------------------------------------------------------------------------------------
# 4. Time to first chunk and chunk period of one distill session


def part_realtime(check: Check, deadline: float) -> None:
    table = check.tables[-1]
    scale = check.scale
    size, steps = scale.sizes[0], scale.distill_steps
    for variant, label in (("fp8", "fp8 (layers 1..L-2)"), ("distill", "bf16")):
        with case(check, table, label):
            cfg = get_preset(scale.presets[variant]).model_config
            # a warm-up session's first chunk and the timed one's (each a fill: ~steps / 2 full
            # steps), then PERIODS stages of steps / 4 full steps
            flops = full_window_flops(cfg, size, False) * (steps + PERIODS * steps / 4)
            guard(check, flops, deadline, label)
            model = bench_model(check, variant)
            try:
                realtime_case(check, table, model, size, steps, label, deadline)
            finally:
                del model
    table.notes += [
        f"One session at {size}x{size}, distill {steps} steps (a chunk finishes every "
        f"{steps // 4} steps); a warm-up session's first chunk first, then a new session: first "
        "chunk = from open to its decoded frames on the host; period = median time between "
        "chunks after it. Real time: a chunk (24 frames, 1 s of video) per <= 1.0 s.",
        "The prompt's T5 encode is not in the first chunk's time (the real T5-XXL runs on the "
        f"CPU; its cost is the host's); the VAE is {vae_words(scale)}.",
    ]


def realtime_case(
    check: Check, table: Table, model: MagiModel, size: int, steps: int, label: str, deadline: float
) -> None:
    engine = Engine(model, scheduler_config())
    probe = DitProbe(check, model)
    try:
        model.text.encode(PROMPT)
        open_sessions(engine, 1, size, steps, prefix="warm")
        while not step(check, engine)[0]:
            pass
        engine.cancel("warm0")
        check.sync()
        probe.take()
        started = time.perf_counter()
        open_sessions(engine, 1, size, steps, prefix="rt")
        arrivals: list[float] = []
        pending: list[ChunkDone] = []
        while len(arrivals) < 1 + PERIODS:
            # as the worker does (--overlap-decode auto): a step's chunks are decoded on a side
            # stream beside the next step and read once that step is enqueued
            done, _ = step(check, engine)
            for d in pending:
                _ = d.frames  # waits for the copy to the host
                arrivals.append(time.perf_counter())
            pending = done
            if len(arrivals) >= 2 and time.monotonic() > deadline:
                break
        dit_s = sum(check.ms(f.start, f.end) for f in probe.take()) / 1e3
    finally:
        probe.close()
        engine.cancel("rt0")
    first = arrivals[0] - started
    periods = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    if not periods:
        raise Skipped(f"only the first chunk ({first:.2f} s) inside the budget")
    period = statistics.median(periods)
    share = dit_s / (arrivals[-1] - started)
    table.raw.append(
        {"variant": label, "first_chunk_s": first, "periods_s": periods, "dit_share": share}
    )
    meets = period <= REALTIME_PERIOD_S
    table.add(
        label,
        f"{first:.2f}",
        f"{period:.3f}",
        len(periods),
        f"{100 * share:.0f} %",
        f"<= {REALTIME_PERIOD_S:.1f} s",
        "yes" if meets else f"no ({period / REALTIME_PERIOD_S:.2f}x)",
    )


# ---------------------------------------------------------------------------------------------
# 3. Batching


def stage_ms(check: Check, engine: Engine, steps_per_stage: int) -> tuple[float, int]:
    """One stage of every session (each finishes one chunk): ms and the chunks out."""
    total, chunks = 0.0, 0
    for _ in range(steps_per_stage):
        done, ms = step(check, engine)
        total += ms
        chunks += len(done)
    return total, chunks


def part_batching(check: Check, deadline: float) -> None:
    table = check.tables[-1]
    scale = check.scale
    size, steps = scale.sizes[0], scale.distill_steps
    per_stage = steps // 4
    cfg = get_preset(scale.presets["distill"]).model_config
    one = full_window_flops(cfg, size, False)
    guard(check, one * steps, deadline, "the one-session baseline")
    model = bench_model(check, "distill")
    model.text.encode(PROMPT)
    alone = Engine(model, scheduler_config())  # B: one session alone, kept warm throughout
    open_sessions(alone, 1, size, steps, prefix="alone")
    for _ in range(steps):
        step(check, alone)
    try:
        for n in scale.sessions:
            with case(check, table, str(n)):
                # fill ~steps/2 full steps of n sessions, then >= 2 rounds of A and B stages
                guard(check, one * (n * steps / 2 + 2 * (n + 1) * per_stage), deadline, f"{n}")
                batching_case(check, table, model, alone, n, size, steps, deadline)
    finally:
        alone.cancel("alone0")
        del model, alone
    table.notes += [
        f"{size}x{size}, distill {steps} steps, window full. A: n sessions in one engine (one "
        "batched forward per step); B: one session alone, the rate n sessions get one after "
        "another. A and B stages (every session finishes one chunk) alternate, A B A B, after a "
        "warm-up round; the ratio is the median of the pairwise n * t_B / t_A (min..max).",
    ]


def batching_case(
    check: Check,
    table: Table,
    model: MagiModel,
    alone: Engine,
    n: int,
    size: int,
    steps: int,
    deadline: float,
) -> None:
    per_stage = steps // 4
    engine = Engine(model, scheduler_config())
    pairs: list[tuple[float, float]] = []
    try:
        open_sessions(engine, n, size, steps)
        for _ in range(steps):
            step(check, engine)
        for round_ in range(1 + ROUNDS):
            a, a_chunks = stage_ms(check, engine, per_stage)
            b, _ = stage_ms(check, alone, per_stage)
            if a_chunks != n:
                raise AssertionError(f"a stage of {n} sessions gave {a_chunks} chunks")
            if round_:
                pairs.append((a, b))
                if time.monotonic() > deadline:
                    break
    finally:
        for i in range(n):
            engine.cancel(f"s{i}")
    ratios = [n * b / a for a, b in pairs]
    a_ms = statistics.median(a for a, _ in pairs)
    b_ms = statistics.median(b for _, b in pairs)
    table.raw.append({"sessions": n, "pairs_ms": pairs, "ratios": ratios})
    table.add(
        n,
        f"{n / a_ms * 1e3:.3g}",
        f"{1 / b_ms * 1e3:.3g}",
        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})",
        f"{a_ms / per_stage:.1f}",
        len(pairs),
    )


# ---------------------------------------------------------------------------------------------
# 5. --compile off against on


def part_compile(check: Check, deadline: float) -> None:
    table = check.tables[-1]
    scale = check.scale
    size, steps = scale.sizes[0], scale.distill_steps
    label = f"{size}x{size} distill, {steps} steps"
    with case(check, table, label):
        cfg = get_preset(scale.presets["distill"]).model_config
        # the fill (~steps/2 full steps), a warm-up stage of each and >= 2 pairs, and compiling
        flops = full_window_flops(cfg, size, False) * (steps / 2 + 6 * steps / 4)
        guard(check, flops, deadline - COMPILE_GUESS_S, label)
        model = bench_model(check, "distill")
        try:
            compile_case(check, table, model, size, steps, deadline)
        finally:
            del model
    table.notes += [
        f"One distill session at {size}x{size}, window full, through the real Engine; a stage "
        f"= {steps // 4} steps (the full window, then the step from the clean chunk's cache): "
        "two token counts, one graph per piece (dynamic shapes). After the fill, one eager stage, "
        "then `compile_dit(dit, 'on')` (inductor, default mode); first compiled stage = its "
        "host time, compiling included. After a warm-up compiled stage, eager and compiled "
        "stages alternate; eager/compiled is the median of the pairwise ratios (min..max), > 1 "
        "when compiling helps. recompiles: graphs compiled during the timed stages (0 expected). "
        "compiled vs eager: relative L2 of one full-window forward's velocities.",
    ]


def compile_case(
    check: Check, table: Table, model: MagiModel, size: int, steps: int, deadline: float
) -> None:
    from torch._dynamo.utils import counters  # imports the compiler: CUDA runs only

    per_stage = steps // 4
    engine = Engine(model, scheduler_config(), overlap_decode=False)
    pairs: list[tuple[float, float]] = []
    try:
        model.text.encode(PROMPT)
        open_sessions(engine, 1, size, steps)
        for _ in range(steps + per_stage):  # the first chunk's grid, then an eager stage
            step(check, engine)
        compile_dit(model.dit, "on")
        check.sync()
        started = time.perf_counter()
        stage_ms(check, engine, per_stage)
        check.sync()
        first_s = time.perf_counter() - started
        stage_ms(check, engine, per_stage)  # warm-up of the compiled pieces
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(2 * ROUNDS):
            with eager(model.dit):
                off, _ = stage_ms(check, engine, per_stage)
            on, _ = stage_ms(check, engine, per_stage)
            pairs.append((off, on))
            if len(pairs) >= 2 and time.monotonic() > deadline:
                break
        recompiles = counters["stats"]["unique_graphs"] - graphs
    finally:
        engine.cancel("s0")
    diff = compiled_vs_eager(check, model, size)
    ratios = [off / on for off, on in pairs]
    off_ms = statistics.median(off for off, _ in pairs)
    on_ms = statistics.median(on for _, on in pairs)
    table.raw.append(
        {
            "size": size,
            "pairs_ms": pairs,
            "ratios": ratios,
            "first_compiled_stage_s": first_s,
            "recompiles": recompiles,
            "compiled_vs_eager": diff,
        }
    )
    table.add(
        f"{size}x{size}",
        f"{off_ms:.1f}",
        f"{on_ms:.1f}",
        f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}..{max(ratios):.3f})",
        f"{first_s:.1f}",
        f"{recompiles} ({verdict(recompiles == 0, table)})",
        f"{diff:.2e}",
        len(pairs),
    )


def compiled_vs_eager(check: Check, model: MagiModel, size: int) -> float:
    """One full-window forward of the compiled model against the same model run eager."""
    config = model.config
    group = build_window(model.dit, config, Case(size, 4, "clean", config.model_config.dtype))
    for c in group.chunks:
        c.step_size = 0.25 if config.engine_config.distill else None
    got = velocities(model.dit, group, check.device)
    with eager(model.dit):
        want = velocities(model.dit, group, check.device)
    return relative(got, want)


# ---------------------------------------------------------------------------------------------


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS_TFLOPS.items() if k in name), None)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {setting}: torch {torch.__version__} sees no CUDA device")
    return torch.device(setting)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when there), cuda[:N], cpu")
    parser.add_argument("--quick", action="store_true", help="tiny presets and sizes (CI smoke)")
    parser.add_argument(
        "--parts",
        default="1,2,4,3,5",
        help="parts to run, in this order (1 = both correctness; 5 runs on CUDA only)",
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole run, seconds")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (else by name)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    parser.add_argument("--out", type=Path, help="output folder (default $OUT or ./gpu-check-out)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    out = args.out or Path(os.environ.get("OUT") or "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    scale = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="magistream-gpu-check-") as tmp:
        check = Check(
            device=device,
            scale=scale,
            peak_tflops=peak_tflops(device, args.peak_tflops),
            tmp=Path(tmp),
            out=out,
            deadline=time.monotonic() + args.budget_s,
            check_size=32 if args.quick else 64,
        )
        print(json.dumps(machine(check)), flush=True)
        budgets = scale.budgets
        parts = {
            "1": [
                (
                    Table(
                        "correctness",
                        f"1. Correctness: {device} against the CPU",
                        ["check", "devices", "measured", "bound", "verdict"],
                    ),
                    budgets["forward"],
                    lambda d: part_correctness(check, d),
                ),
                (
                    Table(
                        "server",
                        "1. Correctness: a streamed generation through the real server",
                        ["run", "what came back", "measured", "bound", "verdict"],
                    ),
                    budgets["server"],
                    lambda d: part_server(check, d),
                ),
            ],
            "2": [
                (
                    Table(
                        "step",
                        f"2. One engine step, {scale.name} shape, random weights on the device",
                        [
                            "video",
                            "variant",
                            "chunk slots",
                            "step ms",
                            "DiT ms",
                            "floor TFLOP",
                            "TFLOP/s",
                            "MFU",
                            "peak GiB",
                            "timed steps",
                        ],
                    ),
                    budgets["step"],
                    lambda d: part_step(check, d),
                )
            ],
            "4": [
                (
                    Table(
                        "realtime",
                        f"4. Real time: one {scale.name} distill session at "
                        f"{scale.sizes[0]}x{scale.sizes[0]}",
                        [
                            "DiT weights",
                            "first chunk s",
                            "chunk period s",
                            "periods",
                            "DiT share",
                            "target",
                            "real time",
                        ],
                    ),
                    budgets["realtime"],
                    lambda d: part_realtime(check, d),
                )
            ],
            "3": [
                (
                    Table(
                        "batching",
                        f"3. Batching at {scale.sizes[0]}x{scale.sizes[0]}, {scale.name} distill",
                        [
                            "sessions",
                            "batched chunks/s",
                            "sequential chunks/s",
                            "batched/sequential",
                            "step ms",
                            "rounds",
                        ],
                    ),
                    budgets["batching"],
                    lambda d: part_batching(check, d),
                )
            ],
            "5": [
                (
                    Table(
                        "compile",
                        f"5. --compile off against on, {scale.name} distill",
                        [
                            "video",
                            "eager stage ms",
                            "compiled stage ms",
                            "eager/compiled",
                            "first compiled stage s",
                            "recompiles",
                            "compiled vs eager",
                            "pairs",
                        ],
                    ),
                    budgets["compile"],
                    lambda d: part_compile(check, d),
                )
            ],
        }
        for key in args.parts.split(","):
            if key.strip() not in parts:
                parser.error(f"--parts: unknown part {key!r}; known: 1, 2, 3, 4, 5")
            if key.strip() == "5" and not check.cuda:
                # inductor's CPU code is not what a GPU server runs; tests/model/test_compile.py
                # checks the compiled pieces on the CPU
                print("5. --compile off against on: not run, the compile A/B runs on CUDA only")
                continue
            for table, budget, body in parts[key.strip()]:
                run_part(check, table, budget, body)
        write_outputs(check)
        print("\n" + report(check), flush=True)
        print(f"\nfull numbers: {check.out / 'gpu_check.json'}")
        return 1 if any(t.failed for t in check.tables) else 0


if __name__ == "__main__":
    sys.exit(main())
