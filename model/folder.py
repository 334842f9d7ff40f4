"""A model folder: the official config.json plus the DiT, VAE, T5 and special-token files.

Paths inside config.json (`load`, `vae_pretrained`, `t5_pretrained`) are resolved against the
folder holding config.json, so a folder can be moved as a whole. Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, load_dit, random_dit, save_dit, shard_map
from model.config import (  # noqa: F401  (read_config, embedded_folder: re-exported)
    CONFIG_FILE,
    EMBEDDED,
    MagiConfig,
    embedded_folder,
    get_preset,
    preset_name,
    read_config,
)
from model.dit import VideoDiT
from model.text import SpecialTokens, TextEncoder, t5_folder, write_special_tokens
from model.tiny_t5 import write_tiny_t5
from model.vae import VAEConfig, ViTVAE, load_vae, random_vae, save_vae

# Model folders shipped in the repository (trained by the project), by preset name.
SPECIAL_TOKENS_FILE = "special_tokens.npz"


@dataclass
class MagiModel:
    """Everything one worker needs to generate: the loaded parts of a model folder."""

    folder: Path
    config: MagiConfig
    dit: VideoDiT
    vae: ViTVAE
    # None on a follower rank of a worker group: rank 0 runs T5 and sends the embeddings with
    # the plans (engine.ranks); the runner reads them through its caption source
    text: TextEncoder | None
    special_tokens: SpecialTokens


@dataclass(frozen=True)
class FolderPaths:
    config: Path
    dit: Path  # the inference_weight[.fp8][.distill] folder
    vae: Path
    t5: Path  # holds t5-v1_1-xxl/
    special_tokens: Path


def folder_paths(folder: str | Path, config: MagiConfig) -> FolderPaths:
    root = Path(folder)
    rc = config.runtime_config

    def resolve(p: str | None, what: str) -> Path:
        if p is None:
            raise CheckpointError(f"{root / CONFIG_FILE}: runtime_config.{what} is not set")
        return Path(p) if Path(p).is_absolute() else root / p

    return FolderPaths(
        config=root / CONFIG_FILE,
        dit=resolve(rc.load, "load") / config.weight_subdir,
        vae=resolve(rc.vae_pretrained, "vae_pretrained"),
        t5=resolve(rc.t5_pretrained, "t5_pretrained"),
        special_tokens=root / SPECIAL_TOKENS_FILE,
    )


def t5_device(configured: str, device: str | torch.device) -> torch.device:
    """Where T5 runs: the config's `t5_device` (reference: cpu for 4.5B, cuda for 24B), on the
    engine's own accelerator. A CPU engine keeps T5 on the CPU; `cuda` without an index means
    the engine's `cuda:<local rank>`, so the ranks of a group do not all load it onto GPU 0."""
    device, wanted = torch.device(device), torch.device(configured)
    if device.type == "cpu" or wanted.type == "cpu":
        return torch.device("cpu")
    if wanted.type == device.type and wanted.index is None:
        return device
    return wanted


def load_model(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dit: VideoDiT | None = None,
    text: bool = True,
) -> MagiModel:
    """Load every part; the first missing or malformed file raises CheckpointError naming it.
    `dit`: one already loaded (a worker rank's share of a sharded model) instead of the files'.
    `text=False`: no T5 (`model.text` None), for a follower rank of a worker group, which gets
    its prompt embeddings from rank 0 (T5-XXL is ~19 GB in fp32)."""
    folder = Path(folder)
    config = read_config(folder)
    paths = folder_paths(folder, config)
    if dit is None:
        dit = load_dit(folder, config, device=device)
    try:
        vae = load_vae(paths.vae, dtype=config.model_config.dtype, device=device)
        encoder = None
        if text:
            t5_folder(paths.t5)
            # the cache keeps embeddings where the DiT reads them, whichever device T5 runs on
            encoder = TextEncoder(
                paths.t5,
                device=t5_device(config.runtime_config.t5_device, device),
                cache_device=device,
            )
        if not paths.special_tokens.is_file():
            raise FileNotFoundError(f"{paths.special_tokens}: special tokens file missing")
        tokens = SpecialTokens.load(paths.special_tokens).to(device)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CheckpointError(str(e)) from e
    caption_channels = config.model_config.caption_channels
    d_model = caption_channels if encoder is None else encoder.d_model
    if d_model != caption_channels or tokens.channels != caption_channels:
        raise CheckpointError(
            f"{folder}: caption width mismatch: DiT caption_channels {caption_channels}, "
            f"T5 d_model {d_model}, special tokens {tokens.channels}"
        )
    return MagiModel(folder, config, dit, vae, encoder, tokens)


def write_random(preset: str, out: str | Path, seed: int = 0) -> Path:
    """Write a model folder with deterministic random weights in the official layout.

    `tiny*` presets get every part (tiny VAE, tiny T5 + tokenizer, special tokens). For the
    official sizes only config.json and the DiT are written: MAGI-1's VAE hyper-parameters and
    T5 are not derivable, so those come from the user's real downloads."""
    config = get_preset(preset)
    rc = config.runtime_config
    if not preset.startswith("tiny"):
        local = dataclasses.replace(
            rc, load=".", vae_pretrained="vae", t5_pretrained="t5_pretrained"
        )
        config = MagiConfig(config.model_config, local, config.engine_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.to_json(out / CONFIG_FILE)
    paths = folder_paths(out, config)
    save_dit(random_dit(config, seed), paths.dit, num_shards=2)
    if preset.startswith("tiny"):
        save_vae(random_vae(VAEConfig.tiny(), seed=seed + 1), paths.vae)
        write_tiny_t5(paths.t5, d_model=config.model_config.caption_channels, seed=seed + 2)
        write_special_tokens(
            paths.special_tokens, config.model_config.caption_channels, seed=seed + 3
        )
    return out


def describe(model: MagiModel) -> list[str]:
    """Human-readable lines: preset, parameters, dtypes, files."""
    cfg = model.config
    params = sum(p.numel() for p in model.dit.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.dit.parameters()})
    vae_params = sum(p.numel() for p in model.vae.parameters())
    text = model.text
    paths = folder_paths(model.folder, cfg)
    shards = shard_map(paths.dit)
    lines = [
        f"folder: {model.folder}",
        f"preset: {preset_name(cfg) or 'custom'}",
        f"dit: {params:,} parameters ({', '.join(dtypes)}), {cfg.model_config.num_layers} layers, "
        f"hidden {cfg.model_config.hidden_size}, cfg_number {cfg.runtime_config.cfg_number}, "
        f"distill {cfg.engine_config.distill}, fp8 {cfg.engine_config.fp8_quant}",
        f"dit files: {paths.dit.relative_to(model.folder)}/ ({len(shards)} shards)",
        f"vae: {vae_params:,} parameters, {paths.vae.relative_to(model.folder)}/",
        "t5: not loaded (a follower rank: rank 0 sends the prompt embeddings)"
        if text is None
        else f"t5: {sum(p.numel() for p in text.model.parameters()):,} parameters, "
        f"d_model {text.d_model}, {paths.t5.relative_to(model.folder)}/",
        f"special tokens: {paths.special_tokens.name}",
        f"sampling: {cfg.runtime_config.num_steps} steps, window {cfg.runtime_config.window_size}, "
        f"{cfg.runtime_config.video_size_h}x{cfg.runtime_config.video_size_w}",
    ]
    return lines
