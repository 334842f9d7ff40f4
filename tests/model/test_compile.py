"""model/compile.py: the compiled token-wise pieces give the eager forward's velocities for any
packing, without a recompile when the token count changes."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import random_dit, save_dit
from model.compile import compile_dit, eager, is_compiled
from model.config import CONFIG_FILE, get_preset
from model.dit import ChunkGroup, ChunkInput, VideoDiT
from model.sharding import ShardedDiT, load_dit_shard


def packing(chunks: int, hp: int, wp: int, caption: int, seed: int) -> list[ChunkGroup]:
    """One session's window of `chunks` chunks (2 latent frames of hp x wp patches each) and a
    lone uncond chunk: token and caption counts change with the arguments."""
    config = get_preset("tiny")
    gen = torch.Generator().manual_seed(seed)
    channels = config.model_config.caption_channels
    p = config.model_config.patch_size
    per_chunk = 2 * hp * wp

    def chunk(i: int, t: float, dropped: bool, key_chunks: int) -> ChunkInput:
        return ChunkInput(
            torch.randn(16, 2, hp * p, wp * p, generator=gen),
            t,
            torch.randn(caption + i, channels, generator=gen),
            dropped,
            rope_frame=2 * i,
            rope_frames_total=2 * chunks,
            k_range=(0, key_chunks * per_chunk),
        )

    window = [chunk(i, 0.2 + 0.15 * i, False, i + 1) for i in range(chunks)]
    return [ChunkGroup(window), ChunkGroup([chunk(0, 0.5, True, 1)])]


@pytest.fixture(scope="module")
def model() -> VideoDiT:
    return random_dit(get_preset("tiny"), seed=0)


def compiled_copy(model: VideoDiT, backend: str) -> VideoDiT:
    copy = random_dit(get_preset("tiny"), seed=0)
    copy.load_state_dict(model.state_dict())
    compile_dit(copy, "on", backend=backend)
    return copy


def test_compiled_layers_equal_eager_bitwise_for_two_packings_without_recompiling(model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    small, large = packing(2, 2, 3, 5, seed=1), packing(3, 4, 3, 7, seed=2)
    want = [model(small), model(large)]
    compiled = compiled_copy(model, "aot_eager")  # the graphs inductor gets, run by eager aten
    graphs = counters["stats"]["unique_graphs"]
    got_small = compiled(small)
    # one graph per piece, shared by the three layers (fullgraph: a graph break would raise)
    assert counters["stats"]["unique_graphs"] - graphs == 3
    got_large = compiled(large)
    assert counters["stats"]["unique_graphs"] - graphs == 3, "a new token count recompiled"
    with eager(compiled):  # what bench/gpu_check.py's A/B runs as "off"
        assert not any(is_compiled(layer) for layer in compiled.videodit_blocks.layers)
    assert all(is_compiled(layer) for layer in compiled.videodit_blocks.layers)
    for got, expected in zip([got_small, got_large], want, strict=True):
        for g_got, g_want in zip(got, expected, strict=True):
            for v_got, v_want in zip(g_got, g_want, strict=True):
                assert torch.equal(v_got, v_want)


def test_off_changes_nothing_and_an_unknown_mode_is_refused(model):
    compile_dit(model, "off")
    assert not any(is_compiled(layer) for layer in model.videodit_blocks.layers)
    with pytest.raises(ValueError, match="--compile 'max': use off or on"):
        compile_dit(model, "max")


def test_a_sharded_dit_compiles_the_scratch_layers_its_forward_runs(model, tmp_path):
    config = get_preset("tiny")
    config.to_json(tmp_path / CONFIG_FILE)
    save_dit(model, tmp_path / config.weight_subdir, num_shards=1)
    share = load_dit_shard(tmp_path, config, rank=0, world_size=2)
    assert isinstance(share, ShardedDiT)
    compile_dit(share, "on", backend="aot_eager")  # wraps only: compiling waits for a forward
    scratch = [s.layer for pair in share._scratch.values() for s in pair]
    assert scratch and all(is_compiled(layer) for layer in scratch)


def test_the_worker_config_compile_flag_reaches_the_engine_dit(tiny_folder):
    from engine.launch import WorkerConfig
    from engine.process import _load_engine

    dit = _load_engine(WorkerConfig(model_folder=tiny_folder, compile="on")).model.dit
    assert all(is_compiled(layer) for layer in dit.videodit_blocks.layers)
    with pytest.raises(ValueError, match="--compile 'max': use off or on"):
        WorkerConfig(model_folder=tiny_folder, compile="max")
