"""Weight sharding on top of Ulysses CP (model/sharding.py): every rank loads only its slice of
the transformer layers from the safetensors files, the sharded forward (per-layer all-gather of
weights) equals the single-process forward, and broken folders raise CheckpointError.

The multi-rank tests share one launch of 4 ranks (`four_ranks`): a spawned rank costs ~2 s of
CPU to start, the forwards a fraction of that. Two-rank worlds run in a process group of its
first two ranks, which the sharded forward sees as it sees any group: its size and its rank."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from engine import ranks
from model import parallel
from model.checkpoint import INDEX_FILE, CheckpointError, load_dit, random_dit, save_dit
from model.config import MagiConfig, get_preset
from model.dit import ChunkGroup, VideoDiT
from model.folder import CONFIG_FILE, read_config, write_random
from model.kv_cache import KVCache
from model.sharding import ShardedDiT, is_sharded_key, load_dit_shard, sharded_bytes_total
from tests.model.test_kv_cache import clean_chunk, window_chunks
from tests.model.test_parallel import NP, lone_chunk

# one pytest-xdist worker runs the module, so the shared launch happens once per suite run
pytestmark = pytest.mark.xdist_group("model_sharding")


def _distill(chunks, config):
    if config.engine_config.distill:
        for c in chunks:
            c.step_size = 0.25
    return chunks


def two_forwards(rank: int, world: int, group, folder: Path, shard: bool = True) -> dict:
    """As test_parallel's: forward 1 writes chunk 0 to the cache (plus a lone chunk whose shape
    makes the split uneven), forward 2 reads it. The model is this rank's shard of `folder`
    (`shard`), else the whole model."""
    config = read_config(folder)
    if group is None or not shard:
        model = load_dit(folder, config)
    else:
        model = load_dit_shard(folder, config, rank, world)
    gen = torch.Generator().manual_seed(7)
    cache = KVCache(num_layers=config.model_config.num_layers)
    first = [
        ChunkGroup(
            _distill(
                [clean_chunk(gen, NP, cache_index=0)] + window_chunks(gen, NP, offset_chunks=1),
                config,
            ),
            cache=cache,
        ),
        ChunkGroup(_distill([lone_chunk(gen)], config)),
    ]
    stats = parallel.CommStats()
    out1 = parallel.ulysses_forward(model, first, group, stats=stats)
    second = [
        ChunkGroup(
            _distill(window_chunks(gen, NP, offset_chunks=1), config),
            cache=cache,
            cached_chunks=[0],
        )
    ]
    out2 = parallel.ulysses_forward(model, second, group)
    return {
        "out1": out1,
        "out2": out2,
        "cache_shape": tuple(cache.read(0, [0]).shape),
        "stats": stats,
        "bytes": model.param_bytes() if isinstance(model, ShardedDiT) else None,
    }


def assert_matches(got: dict, want: dict) -> None:
    for key in ("out1", "out2"):
        for g_group, w_group in zip(got[key], want[key], strict=True):
            for g, w in zip(g_group, w_group, strict=True):
                assert g.shape == w.shape
                assert float((g - w).abs().max()) < 1e-5


def every_case(rank: int, world: int, group, folders: dict[str, Path]) -> dict:
    """One rank of the shared launch: the sharded forwards of the `tiny` folder on the first 2
    ranks and on all 4, of the fp8 folder on 2, and the bf16 folder's unsharded and sharded
    forwards on 2. Each case's result on the ranks of its group."""
    # every rank takes part in creating the group, member or not (torch.distributed's rule)
    first_two = dist.new_group([0, 1])
    cases = {
        ("tiny", 2): (folders["tiny"], first_two, True),
        ("tiny", 4): (folders["tiny"], group, True),
        ("fp8", 2): (folders["fp8"], first_two, True),
        ("bf16 unsharded", 2): (folders["bf16"], first_two, False),
        ("bf16", 2): (folders["bf16"], first_two, True),
    }
    return {
        (name, n): two_forwards(rank, n, g, folder, shard)
        for (name, n), (folder, g, shard) in cases.items()
        if rank < n
    }


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory) -> Path:
    """The `tiny` model in bf16 (the norms promoted to fp32 on load)."""
    folder = tmp_path_factory.mktemp("bf16")
    tiny = get_preset("tiny")
    model = dataclasses.replace(tiny.model_config, params_dtype="torch.bfloat16")
    config = MagiConfig(model, tiny.runtime_config, tiny.engine_config)
    config.to_json(folder / CONFIG_FILE)
    save_dit(random_dit(config, seed=0), folder / config.weight_subdir, num_shards=2)
    return folder


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory) -> Path:
    """tiny_distill_quant: an fp8 middle layer (e4m3 and fp32 flat vectors) next to two
    dense ones, so two scratch kinds and several dtypes per layer."""
    return write_random("tiny_distill_quant", tmp_path_factory.mktemp("fp8") / "quant", seed=0)


@pytest.fixture(scope="module")
def four_ranks(tiny_folder, fp8_folder, bf16_folder) -> dict:
    """(case, world) -> every rank's result of that case, from one 4-rank launch."""
    folders = {"tiny": tiny_folder, "fp8": fp8_folder, "bf16": bf16_folder}
    per_rank = ranks.launch(every_case, 4, folders)
    return {case: [r[case] for r in per_rank if case in r] for case in per_rank[0]}


def check_ranks(folder: Path, results_by_world: dict[int, list[dict]]) -> None:
    config = read_config(folder)
    want = two_forwards(0, 1, None, folder)
    sharded_total, replicated_total = sharded_bytes_total(config)
    groups = config.model_config.num_query_groups
    for world, results in results_by_world.items():
        assert len(results) == world
        for rank, got in enumerate(results):
            assert_matches(got, want)
            assert got["cache_shape"][1] == groups // world, (world, rank)
            b = got["bytes"]
            # each rank holds ~1/N of the sharded parameters (padding: < N elements per vector)
            assert b.sharded == pytest.approx(sharded_total / world, rel=0.10), (world, rank)
            assert b.replicated == replicated_total
            # ... and read no more than that from the files
            assert b.read_from_disk <= b.sharded + b.replicated
            assert b.read_from_disk < sharded_total / world * 1.1 + replicated_total
            # weights sent: its slices of every layer, once to each of the other N - 1 ranks
            assert got["stats"].weight_all_gather == b.sharded * (world - 1)
        # the activation traffic is that of the unsharded CP forward
        tiny = config.model_config
        sent = sum(r["stats"].qkv_all_to_all + r["stats"].out_all_to_all for r in results)
        per_layer = parallel.qkv_bytes_per_layer(
            570, tiny.num_attention_heads, tiny.num_query_groups, tiny.kv_channels, world, 4
        )
        if config.model_config.dtype == torch.float32:
            assert sent == tiny.num_layers * per_layer


def test_sharded_two_and_four_ranks_equal_one_rank(tiny_folder, four_ranks):
    check_ranks(tiny_folder, {n: four_ranks["tiny", n] for n in (2, 4)})


def test_sharded_fp8_layers_equal_one_rank(fp8_folder, four_ranks):
    """tiny_distill_quant (`fp8_folder`): two scratch kinds and several dtypes per layer."""
    check_ranks(fp8_folder, {2: four_ranks["fp8", 2]})


def test_bf16_sharded_forward_is_bitwise_the_unsharded_one(bf16_folder, four_ranks):
    """bf16 weights with the norms promoted to fp32 on load (two flat vectors per layer, the
    norms converted while reading): gathering weights changes no arithmetic, so the sharded
    forward equals the unsharded context-parallel forward bit for bit."""
    config = read_config(bf16_folder)
    part = load_dit_shard(bf16_folder, config, 1, 2)
    assert [s.dtype for s in part.layouts[0].specs] == [torch.bfloat16, torch.float32]
    full = four_ranks["bf16 unsharded", 2]
    sharded = four_ranks["bf16", 2]
    assert len(full) == len(sharded) == 2
    for got, want in zip(sharded, full, strict=True):
        for key in ("out1", "out2"):
            for g_group, w_group in zip(got[key], want[key], strict=True):
                for g, w in zip(g_group, w_group, strict=True):
                    assert torch.equal(g, w)


def test_each_rank_loads_its_slice_in_process(tiny_folder):
    """No process group needed to load: the N slices of each flat vector tile it exactly and
    hold the file's values; the per-rank bytes are ~1/N of the sharded total."""
    config = read_config(tiny_folder)
    full = load_dit(tiny_folder, config)
    state = full.state_dict()
    sharded_total, replicated_total = sharded_bytes_total(config)
    assert sharded_total > 4 * replicated_total  # the layers dominate even at tiny size
    for world in (2, 3, 4):
        ranks = [load_dit_shard(tiny_folder, config, r, world) for r in range(world)]
        for r, part in enumerate(ranks):
            b = part.param_bytes()
            assert abs(b.sharded - sharded_total / world) <= 0.10 * sharded_total / world, r
            assert b.replicated == replicated_total
            # replicated parameters are the file's
            for key, value in part.dit.state_dict().items():
                if not is_sharded_key(key):
                    assert torch.equal(value, state[key]), key
                else:
                    assert value.is_meta, key
        # concatenating the ranks' slices gives back every layer's parameters
        for i, layout in enumerate(ranks[0].layouts):
            for s, spec in enumerate(layout.specs):
                flat = torch.cat([part.shards[i][s] for part in ranks])
                assert flat.numel() == spec.padded
                for name, shape, off in zip(spec.names, spec.shapes, spec.offsets, strict=True):
                    want = state[f"videodit_blocks.layers.{i}.{name}"]
                    got = flat[off : off + want.numel()].view(shape)
                    assert torch.equal(got, want), (world, i, name)
                assert not flat[spec.numel :].any()  # padding


def test_world_size_one_is_the_plain_model(tiny_folder):
    config = read_config(tiny_folder)
    model = load_dit_shard(tiny_folder, config, 0, 1)
    assert isinstance(model, VideoDiT)
    gen = torch.Generator().manual_seed(3)
    groups = [ChunkGroup([lone_chunk(gen)])]
    assert torch.equal(
        parallel.ulysses_forward(model, groups)[0][0], load_dit(tiny_folder, config)(groups)[0][0]
    )
    with pytest.raises(ValueError, match="rank"):
        load_dit_shard(tiny_folder, config, 2, 2)


def test_sharded_model_needs_its_world_size(tiny_folder):
    config = read_config(tiny_folder)
    part = load_dit_shard(tiny_folder, config, 0, 2)
    gen = torch.Generator().manual_seed(3)
    with pytest.raises(ValueError, match="sharded for 2 ranks"):
        parallel.ulysses_forward(part, [ChunkGroup([lone_chunk(gen)])])


def _copy(folder: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    weights = dst / read_config(dst).weight_subdir
    index = json.loads((weights / INDEX_FILE).read_text())
    return dst, weights, index


def _rewrite(weights: Path, shard: str, change) -> None:
    tensors = load_file(str(weights / shard))
    change(tensors)
    save_file(tensors, str(weights / shard), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "missing keys"),
        ("unexpected", "unexpected keys"),
        ("shape", "wrong shapes"),
        ("not_in_shard", "not in the shard"),
        ("truncated", "truncated"),
    ],
)
def test_broken_folders_raise_checkpoint_error(tiny_folder, tmp_path, breakage, message):
    folder, weights, index = _copy(tiny_folder, tmp_path)
    config = read_config(folder)
    key = "videodit_blocks.layers.1.mlp.linear_fc1.weight"
    shard = index["weight_map"][key]
    if breakage == "missing":
        _rewrite(weights, shard, lambda t: t.pop(key))
        del index["weight_map"][key]
    elif breakage == "unexpected":
        _rewrite(weights, shard, lambda t: t.update(extra=torch.zeros(3)))
        index["weight_map"]["extra"] = shard
    elif breakage == "shape":
        _rewrite(weights, shard, lambda t: t.update({key: t[key][:-1].clone()}))
    elif breakage == "not_in_shard":
        _rewrite(weights, shard, lambda t: t.pop(key))
    elif breakage == "truncated":
        last = sorted(set(index["weight_map"].values()))[-1]
        path = weights / last
        path.write_bytes(path.read_bytes()[:-1000])
    (weights / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        for rank in range(2):  # the broken bytes may sit in either rank's slice
            load_dit_shard(folder, config, rank, 2)
