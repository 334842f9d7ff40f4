"""Model folders: write-random -> check -> load round trip, determinism, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.__main__ import main as model_main
from model.checkpoint import CheckpointError, random_dit
from model.config import get_preset
from model.dit import ChunkGroup, ChunkInput
from model.folder import folder_paths, load_model, read_config, write_random

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def run_model_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model", *args], cwd=REPO_ROOT, capture_output=True, text=True
    )


def call_model_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`python -m model` in this process (a new interpreter costs ~2 s of imports; the tests
    that run the command in its own check what the process adds): exit code, stdout, stderr."""
    capsys.readouterr()
    code = model_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def probe_chunk() -> ChunkInput:
    gen = torch.Generator().manual_seed(0)
    return ChunkInput(
        torch.randn(16, 6, 8, 8, generator=gen),
        0.5,
        torch.randn(9, 64, generator=gen),
        False,
        0,
        6,
        (0, 96),
    )


def test_write_random_then_load_gives_the_writers_weights(tiny_folder):
    model = load_model(tiny_folder)
    fresh = random_dit(get_preset("tiny"), seed=0)
    want = fresh([ChunkGroup([probe_chunk()])])[0][0]
    got = model.dit([ChunkGroup([probe_chunk()])])[0][0]
    assert torch.equal(got, want)
    assert model.text.d_model == 64 and model.special_tokens.channels == 64


def test_write_random_is_deterministic(tiny_folder, tmp_path):
    again = write_random("tiny", tmp_path / "again", seed=0)
    for path in sorted(p for p in tiny_folder.rglob("*") if p.is_file()):
        rel = path.relative_to(tiny_folder)
        assert (again / rel).read_bytes() == path.read_bytes(), rel


def test_dit_is_sharded_with_an_index(tiny_folder):
    paths = folder_paths(tiny_folder, read_config(tiny_folder))
    index = json.loads((paths.dit / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_check_prints_what_the_folder_holds(tiny_folder):
    result = run_model_cli("check", str(tiny_folder))
    assert result.returncode == 0, result.stderr
    assert "preset: tiny" in result.stdout
    assert "607,842 parameters" in result.stdout


def broken_copy(tiny_folder, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(tiny_folder, target)
    return target, folder_paths(target, read_config(target)).dit


def test_missing_shard_is_a_one_line_error_naming_the_shard(tiny_folder, tmp_path):
    folder, dit = broken_copy(tiny_folder, tmp_path)
    (dit / "model-00002-of-00002.safetensors").unlink()
    result = run_model_cli("check", str(folder))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "model-00002-of-00002.safetensors" in result.stderr and "missing" in result.stderr


@pytest.mark.parametrize("damage", ["wrong_shape", "unknown_key", "missing_key"])
def test_damaged_checkpoint_errors_name_the_key(tiny_folder, tmp_path, damage):
    folder, dit = broken_copy(tiny_folder, tmp_path)
    shard = dit / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    index = json.loads((dit / "model.safetensors.index.json").read_text())
    key = "final_linear.linear.weight"
    if damage == "wrong_shape":
        tensors[key] = torch.zeros(3, 3)
    elif damage == "unknown_key":
        tensors["not_a_weight"] = torch.zeros(1)
        index["weight_map"]["not_a_weight"] = shard.name
    else:
        del tensors[key]
        del index["weight_map"][key]
    save_file(tensors, shard)
    (dit / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    message = str(err.value)
    expected = {
        "wrong_shape": "wrong shapes",
        "unknown_key": "unexpected keys",
        "missing_key": "missing keys",
    }
    assert expected[damage] in message
    assert ("not_a_weight" if damage == "unknown_key" else key) in message


def test_folder_without_config_is_refused(tmp_path, capsys):
    code, _, err = call_model_cli(capsys, "check", str(tmp_path))
    assert code == 1 and "no config.json" in err


def test_keys_command_prints_key_tab_shape(capsys):
    code, out, _ = call_model_cli(capsys, "keys", "--preset", "24B_distill_quant")
    assert code == 0
    lines = dict(line.split("\t") for line in out.splitlines())
    assert len(lines) == 1998
    assert lines["videodit_blocks.layers.1.mlp.linear_fc1.weight"] == "1,32768,6144"
    assert lines["x_embedder.weight"] == "6144,32,1,2,2"
