"""Smoke test of bench/parallel_scaling.py: the quick run prints a row per configuration with the
bytes the sharded and unsharded forwards move."""

from __future__ import annotations

from bench import parallel_scaling
from model import parallel
from model.checkpoint import random_dit, save_dit
from model.kv_cache import KVCache
from model.sharding import sharded_bytes_total


def test_quick_run_prints_the_tables(capsys):
    assert parallel_scaling.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for name in ("| ws 1 |", "| ws 1, 2 threads |", "| ws 2, cp |", "| ws 2, cp+shard |"):
        assert name in out
    assert "ws 2 / ws 1 =" in out
    assert "| rank 0 alone |" in out and "| split over 2 ranks |" in out


def test_weight_bytes_are_the_sharded_parameters(tmp_path):
    """Per step, all ranks together send (N - 1) x the sharded bytes (+ padding) of weights,
    and the same activations with and without sharding."""
    config = parallel_scaling.bench_config(quick=True)
    window = parallel_scaling.Window(latent=8, in_flight=2)
    save_dit(random_dit(config, seed=0), tmp_path / config.weight_subdir, num_shards=2)
    cp, shard = (
        parallel_scaling.measure(tmp_path, config, window, 2, s, 1, 1) for s in (False, True)
    )
    sharded, replicated = sharded_bytes_total(config)
    assert cp.weight_bytes == 0
    assert 0 <= shard.weight_bytes - sharded < 64
    assert shard.activation_bytes == cp.activation_bytes > 0
    assert shard.param_bytes[:2] == (sharded // 2, replicated)
    assert cp.param_bytes == (0, sharded + replicated, 0)


def test_window_runs_on_the_plain_model():
    config = parallel_scaling.bench_config(quick=True)
    window = parallel_scaling.Window(latent=8, in_flight=2)
    model = random_dit(config, seed=0)
    groups = parallel_scaling.window_groups(config, window, KVCache(3))
    out = parallel.ulysses_forward(model, groups)
    assert sum(v.shape[1] * 16 for v in out[0]) == parallel_scaling.tokens(config, window)
