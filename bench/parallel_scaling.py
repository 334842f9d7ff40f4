"""Context-parallel scaling benchmark (issue 6): step time and bytes moved per step at world
sizes 1, 2, 4 on local CPU gloo ranks, one intra-op thread per rank.

One step is one packed DiT forward (`parallel.ulysses_forward`) of a MAGI-1 window: a clean
chunk re-forwarded for its KV (cache write) plus in-flight chunks with their look-backs. Each
world size runs twice: "cp" (Ulysses, every rank holds all weights) and "cp+shard" (the layers'
weights sharded, all-gathered per layer; model/sharding.py). Baselines in the same run: world
size 1 with one thread, and world size 1 with two threads (the same cores the two ranks get).
The model is a bench-only config (the tiny preset widened, fp32) large enough that compute
dominates; its random weights are written to a temporary folder and loaded per rank, so the
sharded runs read only their slices. Then the VAE decode of one chunk, kept on rank 0 versus
split over the ranks by tiles (`parallel.split_tiled_decode`).

    .venv/bin/python bench/parallel_scaling.py [--quick] [--rounds 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

if __name__ == "__main__":  # run as a script: the repo root (holding model/) is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import ranks
from model import parallel
from model.checkpoint import load_dit, random_dit, save_dit
from model.config import MagiConfig, get_preset
from model.dit import ChunkGroup, ChunkInput
from model.kv_cache import KVCache
from model.sharding import ShardedDiT, load_dit_shard
from model.vae import VAEConfig, random_vae

CHUNK_FRAMES = 6  # latent frames per chunk
CAPTION_TOKENS = 20
TARGET_WS2 = 0.7  # issue 6: ws 2 step time <= 0.7 x ws 1


def bench_config(quick: bool) -> MagiConfig:
    """The tiny preset widened so that the matmuls dominate a step (fp32, CPU)."""
    tiny = get_preset("tiny")
    if quick:
        return tiny
    model = dataclasses.replace(
        tiny.model_config,
        num_layers=4,
        hidden_size=512,
        ffn_hidden_size=2048,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=64,
    )
    return MagiConfig(model, tiny.runtime_config, tiny.engine_config)


@dataclass(frozen=True)
class Window:
    latent: int  # latent pixels per side (tokens per chunk: 6 x (latent / 2)^2)
    in_flight: int  # noisy chunks behind the clean one


def window_groups(config: MagiConfig, window: Window, cache: KVCache) -> list[ChunkGroup]:
    """Clean chunk 0 (written to the cache) + `in_flight` chunks seeing 2, 3, ... chunks."""
    cfg = config.model_config
    gen = torch.Generator().manual_seed(0)
    np_ = CHUNK_FRAMES * (window.latent // cfg.patch_size) ** 2
    total = window.in_flight + 1

    def chunk(g: int, t: float, k_range: tuple[int, int], cache_index=None) -> ChunkInput:
        return ChunkInput(
            latent=torch.randn(16, CHUNK_FRAMES, window.latent, window.latent, generator=gen),
            t=t,
            caption=torch.randn(CAPTION_TOKENS, cfg.caption_channels, generator=gen),
            caption_dropped=False,
            rope_frame=CHUNK_FRAMES * g,
            rope_frames_total=CHUNK_FRAMES * total,
            k_range=k_range,
            cache_index=cache_index,
        )

    chunks = [chunk(0, 0.9999, (0, np_), cache_index=0)]
    for g in range(1, total):
        back = min(g + 1, 2 + (total - 1 - g))  # the oldest in-flight chunk looks back furthest
        chunks.append(chunk(g, 0.2 * g, ((g + 1 - back) * np_, (g + 1) * np_)))
    return [ChunkGroup(chunks, cache=cache)]


def tokens(config: MagiConfig, window: Window) -> int:
    return (
        (window.in_flight + 1)
        * CHUNK_FRAMES
        * (window.latent // config.model_config.patch_size) ** 2
    )


def rank_main(
    rank: int,
    world: int,
    group: dist.ProcessGroup,
    folder: str,
    config: MagiConfig,
    window: Window,
    shard: bool,
    threads: int,
    repeats: int,
) -> dict:
    torch.set_num_threads(threads)
    if shard:
        model = load_dit_shard(folder, config, rank, world)
    else:
        model = load_dit(folder, config)
    if isinstance(model, ShardedDiT):
        held = model.param_bytes()
        param = (held.sharded, held.replicated, held.scratch)
    else:
        param = (0, sum(p.numel() * p.element_size() for p in model.parameters()), 0)
    cache = KVCache(config.model_config.num_layers)
    groups = window_groups(config, window, cache)
    times, cpu, stats = [], [], parallel.CommStats()
    for i in range(repeats + 1):  # the first call warms up
        step_stats = parallel.CommStats()
        dist.barrier(group)
        start, start_cpu = time.perf_counter(), time.process_time()
        parallel.ulysses_forward(model, groups, group, stats=step_stats)
        cpu_s = time.process_time() - start_cpu  # this rank's work (all its threads)
        dist.barrier(group)
        if i:
            times.append(time.perf_counter() - start)
            cpu.append(cpu_s)
            stats = step_stats
    return {"times": times, "cpu": cpu, "stats": stats, "param": param}


@dataclass
class Row:
    name: str
    world: int
    threads: int
    shard: bool
    median_s: float
    spread_s: float
    cpu_s: float  # CPU seconds per step of the busiest rank (median): the work per rank
    cores: float  # CPU seconds of all ranks / step time: the cores the run actually got
    activation_bytes: int  # all ranks, per step
    weight_bytes: int  # all ranks, per step
    param_bytes: tuple[int, int, int]  # rank 0: sharded, replicated, scratch


def measure(
    folder: Path,
    config: MagiConfig,
    window: Window,
    world: int,
    shard: bool,
    threads: int,
    repeats: int,
    rounds: int = 1,
) -> Row:
    """One configuration, `rounds` launches of `repeats` timed steps (pooled)."""
    runs = [
        ranks.launch(rank_main, world, str(folder), config, window, shard, threads, repeats)
        for _ in range(rounds)
    ]
    return make_row(runs, world, shard, threads)


def make_row(runs: list[list[dict]], world: int, shard: bool, threads: int) -> Row:
    """Pool the steps of every launch: rank 0's step times, each rank's CPU times."""
    times = [t for results in runs for t in results[0]["times"]]
    cpu = [[c for results in runs for c in results[r]["cpu"]] for r in range(world)]
    stats = [r["stats"] for r in runs[-1]]
    name = f"ws {world}" + (f", {threads} threads" if threads > 1 else "")
    if world > 1:
        name += ", cp+shard" if shard else ", cp"
    return Row(
        name=name,
        world=world,
        threads=threads,
        shard=shard,
        median_s=statistics.median(times),
        spread_s=max(times) - min(times),
        cpu_s=max(statistics.median(c) for c in cpu),
        cores=sum(statistics.median(c) for c in cpu) / statistics.median(times),
        activation_bytes=sum(
            s.qkv_all_to_all + s.out_all_to_all + s.output_all_gather for s in stats
        ),
        weight_bytes=sum(s.weight_all_gather for s in stats),
        param_bytes=runs[-1][0]["param"],
    )


def run(
    quick: bool, repeats: int, worlds: Sequence[int], rounds: int = 1
) -> tuple[MagiConfig, Window, list[Row]]:
    """Every configuration once per round, rounds interleaved (load from other processes on
    the machine drifts over minutes; interleaving spreads it over all configurations)."""
    config = bench_config(quick)
    window = Window(latent=8, in_flight=2) if quick else Window(latent=24, in_flight=3)
    cases = [(1, False, 1), (1, False, 2)]
    cases += [(w, shard, 1) for w in worlds if w > 1 for shard in (False, True)]
    runs: dict[tuple[int, bool, int], list[list[dict]]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_dit(random_dit(config, seed=0), folder / config.weight_subdir, num_shards=2)
        for _ in range(rounds):
            for world, shard, threads in cases:
                runs[world, shard, threads].append(
                    ranks.launch(
                        rank_main, world, str(folder), config, window, shard, threads, repeats
                    )
                )
    rows = [make_row(runs[case], *case) for case in cases]
    return config, window, rows


@dataclass(frozen=True)
class VaeCase:
    latent: tuple[int, int, int]  # (frames, h, w) latents of the video decoded per step
    tile_frames: int
    tile_px: int


def vae_case(quick: bool) -> VaeCase:
    # one 6-frame chunk at 384x384 px with the pipeline's tiles (8 tiles of 3 x 32 x 32 latents)
    return VaeCase((2, 8, 8), 8, 32) if quick else VaeCase((6, 48, 48), 12, 256)


def vae_rank_main(
    rank: int, world: int, group: dist.ProcessGroup, case: VaeCase, repeats: int
) -> dict:
    vae = random_vae(VAEConfig.tiny(), seed=1)
    z = torch.randn(1, 16, *case.latent, generator=torch.Generator().manual_seed(0))
    times, cpu = [], []
    for i in range(repeats + 1):
        dist.barrier(group)
        start, start_cpu = time.perf_counter(), time.process_time()
        video = parallel.split_tiled_decode(
            vae, z, group, tile_frames=case.tile_frames, tile_px=case.tile_px
        )
        cpu_s = time.process_time() - start_cpu
        dist.barrier(group)
        if i:
            times.append(time.perf_counter() - start)
            cpu.append(cpu_s)
    return {"times": times, "cpu": cpu, "shape": None if video is None else tuple(video.shape)}


def run_vae(quick: bool, repeats: int, worlds: Sequence[int]) -> list[tuple[int, float, float]]:
    """(world, median step s, busiest rank's CPU s) of the VAE decode of one chunk: world 1 is
    the decode kept on rank 0 (the other ranks idle), larger worlds split it by tiles."""
    case = vae_case(quick)
    rows = []
    for world in worlds:
        results = ranks.launch(vae_rank_main, world, case, repeats)
        rows.append(
            (
                world,
                statistics.median(results[0]["times"]),
                max(statistics.median(r["cpu"]) for r in results),
            )
        )
    return rows


def print_vae_table(rows: list[tuple[int, float, float]], quick: bool) -> None:
    case = vae_case(quick)
    frames, h, w = case.latent
    print(
        f"# VAE decode (tiny VAE) of a latent {frames}x{h}x{w} "
        f"({frames * 4} frames, {h * 8}x{w * 8} px), tiles {case.tile_frames} frames x "
        f"{case.tile_px} px, overlap 0.25: kept on rank 0 (ws 1) vs split by tiles"
    )
    print("| decode | step (ms) | vs rank 0 alone | CPU ms, busiest rank | vs rank 0 alone |")
    print("|---|---|---|---|---|")
    base_t, base_c = rows[0][1], rows[0][2]
    for world, t, c in rows:
        name = "rank 0 alone" if world == 1 else f"split over {world} ranks"
        print(f"| {name} | {t * 1e3:.0f} | {t / base_t:.2f}x | {c * 1e3:.0f} | {c / base_c:.2f}x |")


def print_table(config: MagiConfig, window: Window, rows: list[Row], steps: str) -> None:
    cfg = config.model_config
    print(
        f"# model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, "
        f"Hq {cfg.num_attention_heads}, G {cfg.num_query_groups}, {cfg.params_dtype}; "
        f"step = one forward of {window.in_flight + 1} chunks x "
        f"{tokens(config, window) // (window.in_flight + 1)} tokens = "
        f"{tokens(config, window)} tokens"
    )
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
        f"{torch.__version__}, gloo, median of {steps} steps (rounds x steps, 1 warm-up per "
        f"launch); load average now {os.getloadavg()[0]:.1f} (other processes: noisy numbers)"
    )
    base = rows[0].median_s
    head = (
        "| run | step (ms) | spread (ms) | vs ws 1 | CPU ms / rank | vs ws 1 | cores got | "
        "activations sent / step | weights sent / step | "
        "params per rank: sharded + replicated + scratch |"
    )
    print(head)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sharded, replicated, scratch = r.param_bytes
        print(
            f"| {r.name} | {r.median_s * 1e3:.0f} | {r.spread_s * 1e3:.0f} | "
            f"{r.median_s / base:.2f}x | {r.cpu_s * 1e3:.0f} | {r.cpu_s / rows[0].cpu_s:.2f}x | "
            f"{r.cores:.2f} | {r.activation_bytes / 1e6:.1f} MB | "
            f"{r.weight_bytes / 1e6:.1f} MB | {sharded / 1e6:.1f} + {replicated / 1e6:.1f} + "
            f"{scratch / 1e6:.1f} MB |"
        )
    ws2 = [r for r in rows if r.world == 2]
    if ws2:
        best = min(r.median_s for r in ws2) / base
        verdict = "meets" if best <= TARGET_WS2 else "misses"
        print(f"# ws 2 / ws 1 = {best:.2f} ({verdict} the <= {TARGET_WS2} target)")
        work = min(r.cpu_s for r in ws2) / rows[0].cpu_s
        print(
            f"# work per rank at ws 2 / ws 1 = {work:.2f}: the step time ratio with two idle "
            "cores (each rank busy for its CPU time, the other rank alongside)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, ws 1 and 2, 1 step")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per launch")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved launches per run")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 2)
    worlds = (1, 2) if args.quick else (1, 2, 4)
    torch.set_num_threads(1)
    config, window, rows = run(args.quick, repeats, worlds, rounds)
    print_table(config, window, rows, f"{rounds} x {repeats}")
    print_vae_table(run_vae(args.quick, repeats * rounds, worlds), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
