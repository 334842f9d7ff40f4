"""DiT forward benchmark (issue 2): FLOP floor, CPU forward time, checkpoint-loading memory.

1. The FLOP floor of one forward, counted from the weight shapes (magi1-reference.md §10), for
   the official 4.5B and 24B presets: the yardstick for any GPU measurement.
2. The tiny DiT's forward time over MAGI-1 windows (key ranges of §3.13), as achieved GFLOP/s
   and as a ratio against a plain matmul of the model's fc1 shape timed in the same run.
3. Peak RSS of `load_dit` in a fresh process, per byte of weights on disk.

    .venv/bin/python bench/model_forward.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch

if __name__ == "__main__":  # run as a script: the repo root (holding model/) is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_dit, random_dit, save_dit
from model.config import MagiConfig, ModelConfig, get_preset
from model.dit import ChunkGroup, ChunkInput, VideoDiT
from model.kv_cache import KVCache

VAE_STRIDE = 8  # video pixels per latent pixel (spatial)
CHUNK_LATENT_FRAMES = 6  # latent frames per chunk (runtime_config.chunk_width)
CAPTION_TOKENS = 100  # valid T5 tokens per chunk, the typical prompt length §10.3 assumes
H100_BF16_FLOPS = 990e12  # dense bf16 peak of one H100 SXM, the §10 yardstick
WELL_UNDER_MS = 50.0  # "well under 100 ms" means at most half of it
LOAD_RATIO_TARGET = 1.2  # peak RSS increase of a load / weight bytes
WARMUP = 3  # untimed calls per case: first-call allocations and kernel selection
MIN_RUNS = 5  # timed calls per case even past the time budget
LOAD_SHARDS = 2  # safetensors files of the measured checkpoint

# (query tokens, key tokens, caption tokens) of one chunk in a forward
ChunkTokens = tuple[float, float, float]
# where the chunk that finished last is in a window forward (see window_key_ranges)
History = Literal["none", "cache", "clean"]


# ---------------------------------------------------------------------------------------------
# 1. FLOP counter (magi1-reference.md §10)


def gemm_weights_per_layer(cfg: ModelConfig) -> int:
    """Weights every query token multiplies in one layer: q, qx, k, v, proj, fc1, fc2."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    q = cfg.num_attention_heads * cfg.kv_channels
    kv = cfg.num_query_groups * cfg.kv_channels
    fc1_out = 2 * f if cfg.gated_linear_unit else f  # SwiGLU: gate and up halves
    # proj reads the [self | cross] attention outputs side by side, hence 2q inputs
    return 2 * d * q + 2 * d * kv + 2 * q * d + d * fc1_out + f * d


def forward_flops(cfg: ModelConfig, chunks: Sequence[ChunkTokens]) -> dict[str, float]:
    """FLOPs of one DiT forward over `chunks`: {"gemm", "attention", "total"}.

    GEMM: 2 x the token-wise weights per query token per layer. Attention: 4 Nq Nk (Hq hd) per
    layer (2 for QK^T, 2 for PV; no causal halving, attention inside a chunk is full), for
    self-attention over the chunk's key range and cross-attention over its caption tokens.
    Ignored, each < 0.1 % at 720x720 (§10.2): patch embedding, final linear, timestep and adaLN
    MLPs, the per-caption-token projections (y_proj_xattn, linear_kv_xattn), norms, RoPE,
    softmax and the other elementwise work."""
    layers = cfg.num_layers
    width = cfg.num_attention_heads * cfg.kv_channels  # Hq * hd
    queries = sum(q for q, _, _ in chunks)
    gemm = 2.0 * gemm_weights_per_layer(cfg) * layers * queries
    pairs = sum(q * (k + cap) for q, k, cap in chunks)  # self and cross scores alike
    attention = 4.0 * width * layers * pairs
    return {"gemm": gemm, "attention": attention, "total": gemm + attention}


def chunk_tokens(cfg: ModelConfig, height: int, width: int) -> int:
    """Tokens of one chunk of a `height` x `width` video (§10.1: 720x720 -> 12 150)."""
    hp = height // VAE_STRIDE // cfg.patch_size
    wp = width // VAE_STRIDE // cfg.patch_size
    return CHUNK_LATENT_FRAMES // cfg.t_patch_size * hp * wp


def window_key_ranges(
    in_flight: int,
    history: History = "none",
    noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2),
    clean_chunk_kvrange: int = 1,
) -> list[tuple[int, int]]:
    """Key range of each chunk in the forward, oldest first, in chunks of its group's key
    sequence (cached chunks ++ the forward's chunks).

    The in-flight chunks sit at stages in_flight-1 .. 0 (the oldest is furthest along); with
    window 4 a chunk's stage is its step quartile, which picks its look-back (§3.13). The
    chunk that finished last is "none": not there yet (fill phase); "cache": read from the KV
    cache in front; "clean": re-forwarded in front for its KV (look-back 1). With "clean" the
    key counts are 1, 2, 3, 4, 5 chunks: the full steady-state window."""
    if not 1 <= in_flight <= len(noise2clean_kvrange):
        raise ValueError(f"in_flight must be 1..{len(noise2clean_kvrange)}, got {in_flight}")
    if history not in ("none", "cache", "clean"):
        raise ValueError(f"history must be none, cache or clean, got {history!r}")
    lookbacks = [noise2clean_kvrange[stage] for stage in reversed(range(in_flight))]
    first = 0 if history == "none" else 1  # key-sequence index of the oldest in-flight chunk
    ranges = [(max(0, g + 1 - back), g + 1) for g, back in enumerate(lookbacks, start=first)]
    if history == "clean":
        ranges.insert(0, (max(0, 1 - clean_chunk_kvrange), 1))
    return ranges


def window_flops(
    cfg: ModelConfig, height: int, width: int, in_flight: int, history: History
) -> dict[str, float]:
    np_ = chunk_tokens(cfg, height, width)
    ranges = window_key_ranges(in_flight, history)
    return forward_flops(cfg, [(np_, (k1 - k0) * np_, CAPTION_TOKENS) for k0, k1 in ranges])


def print_floor() -> None:
    """The §10 figures from the counter, and the full-window forward an H100 run must beat."""
    print("FLOP floor (counted from the weight shapes, magi1-reference.md §10), 720x720:")
    for name in ("4.5B_base", "24B_base"):
        cfg = get_preset(name).model_config
        np_ = chunk_tokens(cfg, 720, 720)
        per_token = 2 * gemm_weights_per_layer(cfg) * cfg.num_layers
        per_k = forward_flops(cfg, [(np_, np_, 0)])["attention"]
        # steady state: 4 in flight over the cached clean chunk, k = 2..5, mean 3.5
        avg = window_flops(cfg, 720, 720, 4, "cache")["total"] / 4
        full = window_flops(cfg, 720, 720, 4, "clean")["total"]
        print(
            f"  {name:9s} Np={np_}: GEMM {per_token / 1e9:.2f} GFLOP/token = "
            f"{per_token * np_ / 1e12:.1f} TFLOP/chunk; attention {per_k / 1e12:.1f} TFLOP x k; "
            f"chunk at k=3.5 {avg / 1e12:.0f} TFLOP; full window (4 + clean) "
            f"{full / 1e12:.0f} TFLOP = {full / H100_BF16_FLOPS:.2f} s at 990 TFLOP/s"
        )


# ---------------------------------------------------------------------------------------------
# 2. Forward timing on this machine


@dataclass(frozen=True)
class Case:
    size: int  # video height = width, pixels
    in_flight: int  # noisy chunks in the forward
    history: History  # where the last finished chunk is (see window_key_ranges)
    dtype: torch.dtype  # params dtype of the DiT

    @property
    def name(self) -> str:
        return str(self.in_flight) + ("" if self.history == "none" else f"+{self.history}")


def _chunk(config: MagiConfig, size: int, g: int, frames: int, gen: torch.Generator) -> ChunkInput:
    """Chunk `g` of a window; t and the caption do not change the cost, so they are arbitrary."""
    latent = size // VAE_STRIDE
    return ChunkInput(
        latent=torch.randn(16, CHUNK_LATENT_FRAMES, latent, latent, generator=gen),
        t=0.5,
        caption=torch.randn(CAPTION_TOKENS, config.model_config.caption_channels, generator=gen),
        caption_dropped=False,
        rope_frame=CHUNK_LATENT_FRAMES * g,
        rope_frames_total=frames,
        k_range=(0, 0),
    )


def build_window(model: VideoDiT, config: MagiConfig, case: Case) -> ChunkGroup:
    """One session's window as one group. For "cache" the clean chunk's KV is written by its
    own forward first (untimed), as the steady state's sub-step 0 does."""
    gen = torch.Generator().manual_seed(0)
    np_ = chunk_tokens(config.model_config, case.size, case.size)
    ranges = window_key_ranges(case.in_flight, case.history)
    n_total = case.in_flight + (case.history != "none")
    frames = CHUNK_LATENT_FRAMES * n_total
    first = n_total - len(ranges)  # chunks in the cache, in front of the forward's
    chunks = [_chunk(config, case.size, first + i, frames, gen) for i in range(len(ranges))]
    for chunk, (k0, k1) in zip(chunks, ranges, strict=True):
        chunk.k_range = (k0 * np_, k1 * np_)
    if case.history == "clean":
        chunks[0].t = config.runtime_config.clean_t
    if case.history != "cache":
        return ChunkGroup(chunks)
    clean = _chunk(config, case.size, 0, frames, gen)
    clean.t, clean.k_range, clean.cache_index = config.runtime_config.clean_t, (0, np_), 0
    cache = KVCache(config.model_config.num_layers)
    model([ChunkGroup([clean], cache=cache)])
    return ChunkGroup(chunks, cache=cache, cached_chunks=[0])


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_median_ms(
    fn: Callable[[], object], base: Callable[[], object], warmup: int, runs: int, budget_s: float
) -> tuple[float, float]:
    """Median ms of `fn` and of `base`, timed alternately: another process loading this
    machine slows both alike, so their ratio holds. Stops after `runs` pairs or `budget_s`
    (at least MIN_RUNS pairs)."""
    for _ in range(warmup):
        fn()
        base()
    a, b = [], []
    deadline = time.perf_counter() + budget_s
    while len(a) < runs and (len(a) < MIN_RUNS or time.perf_counter() < deadline):
        a.append(_seconds(fn))
        b.append(_seconds(base))
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def matmul(
    m: int, k: int, n: int, dtype: torch.dtype, reps: int = 1
) -> tuple[Callable[[], object], float]:
    """`reps` plain (m, k) @ (k, n) products back to back, and their FLOPs. Several products
    per sample so the first one's cold caches (after a forward) do not dominate."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)

    def run() -> None:
        for _ in range(reps):
            torch.matmul(a, b)

    return run, 2.0 * m * k * n * reps


def tiny_dit(dtype: torch.dtype) -> tuple[MagiConfig, VideoDiT]:
    """The tiny preset with random weights; bf16 gets the fp32 promotions `load_dit` applies."""
    config = get_preset("tiny")
    if dtype == torch.bfloat16:
        model_cfg = replace(config.model_config, params_dtype="torch.bfloat16")
        config = replace(config, model_config=model_cfg)
    return config, random_dit(config, seed=0).promote_high_precision()


@dataclass(frozen=True)
class Timing:
    case: Case
    tokens: int  # query tokens in the forward
    ms: float  # median wall time of one forward
    flops: float  # forward_flops total
    matmul_gflops: float  # baseline: (tokens, D) @ (D, F) in the same dtype, same run

    @property
    def gflops(self) -> float:
        return self.flops / self.ms / 1e6

    @property
    def ratio(self) -> float:
        return self.gflops / self.matmul_gflops


def time_case(
    model: VideoDiT, config: MagiConfig, case: Case, runs: int, budget_s: float
) -> Timing:
    cfg = config.model_config
    group = build_window(model, config, case)
    flops = window_flops(cfg, case.size, case.size, case.in_flight, case.history)["total"]
    tokens = chunk_tokens(cfg, case.size, case.size) * len(group.chunks)
    # baseline: the model's biggest GEMM (fc1) at the forward's token count
    base, base_flops = matmul(tokens, cfg.hidden_size, cfg.ffn_hidden_size, case.dtype, 5)
    ms, base_ms = paired_median_ms(partial(model, [group]), base, WARMUP, runs, budget_s)
    return Timing(case, tokens, ms, flops, base_flops / base_ms / 1e6)


def format_row(r: Timing) -> str:
    c = r.case
    return (
        f"| {c.size}x{c.size} | {str(c.dtype).removeprefix('torch.')} | {c.name} "
        f"| {r.tokens} | {r.ms:.2f} | {r.flops / 1e6:.0f} | {r.gflops:.1f} "
        f"| {r.matmul_gflops:.0f} | {r.ratio:.2f}x |"
    )


def run_timing(cases: Sequence[Case], runs: int, budget_s: float) -> list[Timing]:
    """Time every case, printing its table row as soon as it is measured."""
    tiny = get_preset("tiny").model_config
    print(
        f"\ntiny DiT forward ({tiny.num_layers} layers, hidden {tiny.hidden_size}, "
        f"{CAPTION_TOKENS} caption tokens per chunk), median of <= {runs} runs in <= "
        f"{budget_s:.0f} s per case; baseline: a plain matmul of the fc1 shape at the same "
        "token count, timed alternately with the forward"
    )
    print(
        "| video | dtype | chunks | tokens | ms/forward | MFLOP | GFLOP/s "
        "| matmul GFLOP/s | model/matmul |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    models = {dtype: tiny_dit(dtype) for dtype in {c.dtype for c in cases}}
    rows = []
    for case in cases:
        config, model = models[case.dtype]
        rows.append(time_case(model, config, case, runs, budget_s))
        print(format_row(rows[-1]), flush=True)
    return rows


def print_verdict(rows: Sequence[Timing]) -> None:
    print(
        f"load average {os.getloadavg()[0]:.2f} now: other processes on this machine slow "
        "both the forward and the matmul, so trust the ratio column over the ms column"
    )
    full = next(r for r in rows if r.case == Case(64, 4, "clean", torch.float32))
    verdict = "yes" if full.ms <= WELL_UNDER_MS else "NO"
    print(
        f"full-window tiny forward (64x64, 4 in flight + clean, fp32): {full.ms:.1f} ms = "
        f"{full.ratio:.2f}x the fc1 matmul's GFLOP/s; well under 100 ms "
        f"(<= {WELL_UNDER_MS:.0f} ms): {verdict}"
    )


# ---------------------------------------------------------------------------------------------
# 3. Loading memory


def load_config() -> MagiConfig:
    """A bf16 DiT of ~200 MB: big enough that allocator noise is < 1 % of the weights."""
    model = ModelConfig(
        num_layers=6,
        hidden_size=1024,
        ffn_hidden_size=4096,
        num_attention_heads=8,
        num_query_groups=8,
        kv_channels=128,
    )
    tiny = get_preset("tiny")
    return MagiConfig(model, tiny.runtime_config, tiny.engine_config)


def write_load_folder(folder: Path, config: MagiConfig) -> int:
    """config.json plus the DiT in 2 shards, as the official 4.5B and 24B are released (§3.15;
    the loader's peak grows with the shard size). Returns the weight bytes."""
    config.to_json(folder / "config.json")
    model = random_dit(config, seed=0)
    save_dit(
        model, folder / config.runtime_config.load / config.weight_subdir, num_shards=LOAD_SHARDS
    )
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _status_kib() -> dict[str, int]:
    """The memory lines of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, ...) in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[name] = int(value.split()[0])
    return out


def _sample_peaks(peaks: dict[str, int], stop: threading.Event) -> None:
    """Track the peak anonymous and file-backed RSS. VmHWM gives only their sum; the split
    shows whether a peak is copies of the weights or mapped file pages."""
    while not stop.is_set():
        now = _status_kib()
        for name in ("RssAnon", "RssFile"):
            peaks[name] = max(peaks.get(name, 0), now[name])
        stop.wait(0.001)


def load_child(folder: Path) -> None:
    """In a fresh process: reset the peak RSS after the imports, load, print JSON (KiB)."""
    config = MagiConfig.from_json(folder / "config.json")
    gc.collect()
    # "5" resets VmHWM to the current RSS, so the peak seen is the load's, not the imports'
    Path("/proc/self/clear_refs").write_text("5")
    before, peaks, stop = _status_kib(), {}, threading.Event()
    sampler = threading.Thread(target=_sample_peaks, args=(peaks, stop))
    sampler.start()
    model = load_dit(folder, config)
    stop.set()
    sampler.join()
    after = _status_kib()
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "before_kib": before["VmRSS"],
        "peak_kib": after["VmHWM"],
        "after_kib": after["VmRSS"],
        "peak_anon_kib": peaks["RssAnon"] - before["RssAnon"],
        "peak_file_kib": peaks["RssFile"] - before["RssFile"],
    }
    print(json.dumps(result))


@dataclass(frozen=True)
class LoadMemory:
    weight_bytes: int  # tensor bytes in the safetensors files
    params: int  # parameters of the loaded DiT
    before_kib: int  # RSS after the imports, the baseline
    peak_kib: int  # VmHWM after load_dit
    after_kib: int  # RSS after load_dit
    peak_anon_kib: int  # sampled peak of RssAnon over the load, minus its baseline
    peak_file_kib: int  # the same for RssFile (mapped file pages)

    @property
    def peak_increase(self) -> int:
        return (self.peak_kib - self.before_kib) * 1024

    @property
    def ratio(self) -> float:
        return self.peak_increase / self.weight_bytes


def measure_load() -> LoadMemory:
    with tempfile.TemporaryDirectory(prefix="magistream-bench-") as tmp:
        weight_bytes = write_load_folder(Path(tmp), load_config())
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--load-child", tmp],
            capture_output=True,
            text=True,
            check=True,
        )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return LoadMemory(weight_bytes=weight_bytes, **child)


def print_load(r: LoadMemory) -> None:
    verdict = "ok" if r.ratio <= LOAD_RATIO_TARGET else "OVER TARGET"
    print(
        f"\nloading memory (load_dit, fresh process, {LOAD_SHARDS} bf16 shards): weights "
        f"{r.weight_bytes / 2**20:.1f} MiB ({r.params / 1e6:.0f} M params), RSS after imports "
        f"{r.before_kib / 1024:.0f} MiB, peak increase {r.peak_increase / 2**20:.1f} MiB, "
        f"increase after load {(r.after_kib - r.before_kib) / 1024:.1f} MiB; sampled peaks "
        f"over the load: anonymous +{r.peak_anon_kib / 1024:.1f} MiB, file-backed (mapped "
        f"shard pages) +{r.peak_file_kib / 1024:.1f} MiB\n"
        f"peak_increase/weights = {r.ratio:.3f} (target <= {LOAD_RATIO_TARGET}): {verdict}"
    )


# ---------------------------------------------------------------------------------------------


def print_machine() -> None:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fp32 64x64 only, fewer runs (<20 s)")
    parser.add_argument("--load-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        load_child(args.load_child)
        return 0

    print_machine()
    print_floor()
    sizes = (64,) if args.quick else (64, 128)
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    runs, budget_s = (20, 1.0) if args.quick else (50, 3.0)
    # fill phase 1..4 in flight, then the steady state's two forwards (§3.13)
    windows = [(1, "none"), (2, "none"), (3, "none"), (4, "none"), (4, "cache"), (4, "clean")]
    cases = [Case(s, n, h, d) for d in dtypes for s in sizes for n, h in windows]
    print_verdict(run_timing(cases, runs, budget_s))
    print_load(measure_load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
