"""Train the `toy` world model on toyworld scenes: the VAE, then the DiT, then write the folder.

One command (`python -m train --out models/toy`) runs four phases and can be
stopped and restarted at any point (state in `<out>/train/state.pt`, saved every
`save_every` steps and at each phase end):

1. **VAE.** MAGI-1's transformer VAE scaled down (`toy_vae_config`), trained as an autoencoder
   on 12-frame clips, the pipeline's temporal tile at 24 fps, plus 8- and 4-frame clips (the v2v
   tail tile and the i2v image path). Pixel MSE; the latent scale factor is then measured so the
   DiT sees unit-variance latents (`runtime_config.scale_factor`).
2. **Latents.** Every training scene is encoded once with the trained VAE.
3. **DiT.** MAGI-1's objective: flow matching (x_t = (1 - t) noise + t clean, v = clean -
   noise) on chunk sequences whose noise rises with the chunk index the way the sampler's
   window has it at some forward of its loop (`window_layout`, drawn from the forwards
   `scheduler.window` plans; a chunk at level j is at s = (j + u) / W, t = s^2 / (3 - 2 s^2)),
   with finished chunks as causal context at clean_t, captions per chunk through the
   frozen tiny T5 with the sampler's special tokens, and the branches the sampler's CFG needs:
   per-chunk caption dropout, all-null sequences, and chunks alone at time slot 0. i2v / v2v
   prefixes are taught by pasting clean leading latent frames into the first noisy chunk.
4. **Decoder.** With the encoder frozen (so the latents the DiT learned stay exactly as they
   were), the VAE decoder trains on with object pixels counting twice instead of 11 times.
   Phase 1 weights them up so that the encoder learns to carry objects at all; that weighting
   also teaches the decoder to paint objects too big and to leave the background noisy. The
   lighter weight gives crisper objects and a flatter background, from the encoder's latents
   and from the DiT's. (The weight trades MSE against the masks' IoUs: docs/toyworld.md.)
   Noise is added to the latents (`decoder_latent_noise`, in the DiT's units), so the decoder
   also paints clean objects from latents a little off the encoder's, as the DiT's samples are.

The text side (tiny T5, tokenizer, special tokens) is the `tiny` preset's, deterministic from a
seed and kept frozen: captions differ by their token embeddings, which is all the DiT needs.

`vae_from` (`--vae-from FOLDER`) runs phase 3 alone on a finished folder's VAE and scale
factor. Its encoder is phase 1's (phase 4 freezes it) and phase 4 never reads the DiT, so this is
phase 3 of the same full run, bit for bit (a test checks it): a DiT recipe can be tried, or the
DiT retrained, without paying for phases 1, 2 and 4 again. `dit_from` (`--dit-from FOLDER`)
runs phase 4 alone on a finished folder: its decoder trains on from where it is, for the
folder's DiT, encoder and scale factor, which stay as they are. (Phase 1 cannot be rerun
instead: today's code does not reproduce the shipped encoder, and the DiT is tied to it.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from model.checkpoint import init_random_, load_dit, save_dit
from model.config import MagiConfig, RuntimeConfig, get_preset
from model.dit import ChunkGroup, ChunkInput, VideoDiT
from model.folder import folder_paths, read_config
from model.text import (
    NULL_CAPTION_TOKENS,
    SpecialTokens,
    TextConditioning,
    TextEncoder,
    chunk_caption,
    write_special_tokens,
)
from model.tiny_t5 import write_tiny_t5
from model.vae import VAEConfig, ViTVAE, load_vae, random_vae, save_vae
from scheduler.window import WindowSpec, forward_count, plan_forward
from toyworld.plot import write_loss_plot
from toyworld.scenes import BACKGROUND
from toyworld.video import generate_video

SIZE = 64  # frame side, px: 8 x 8 latent pixels, 4 x 4 DiT tokens per latent frame
CHUNKS = 4  # chunks per training sequence: the sampler's window
WIDTH = 6  # latent frames per chunk
LATENT_CHANNELS = 16
TEXT_SEED = 2  # the tiny T5 / special tokens seeds write_random uses (seed + 2, seed + 3)
TOKENS_SEED = 3
# Loss weight of object pixels (VAE) and object voxels (DiT) over background ones: objects cover
# ~5 % of a frame, and unweighted losses spend hundreds of steps on the background alone. A
# per-location weight leaves flow matching's optimum (the conditional mean velocity) unchanged.
OBJECT_WEIGHT = 10.0
PSNR_SEEDS = range(1_000_000, 1_000_020)  # held-out scenes whose first 12-frame tile scores the VAE


def toy_config(scale_factor: float = 0.18215) -> MagiConfig:
    """The `toy` preset with this latent scale factor (measured after the VAE is trained)."""
    preset = get_preset("toy")
    runtime = dataclasses.replace(preset.runtime_config, scale_factor=scale_factor)
    return dataclasses.replace(preset, runtime_config=runtime)


def toy_vae_config() -> VAEConfig:
    """MAGI-1's ViT VAE (8x8 spatial, 4 temporal, 16 channels) with a 64 px, 12-frame base grid
    and the official final projection to 4 channels per pixel."""
    return VAEConfig(
        embed_dim=256,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        patch_size=8,
        patch_length=4,
        video_size=SIZE,
        video_length=12,
        z_chans=LATENT_CHANNELS,
        qkv_bias=True,
        with_cls_token=True,
        ln_in_attn=True,
        # width 256 / (4 x 8 x 8 px) leaves ONE channel per pixel before the last Conv3d, which
        # cannot carry colour; the official final projection gives each pixel 4 channels
        use_final_proj=True,
    )


@dataclass
class TrainConfig:
    out: Path
    scenes: int = 2000  # training scenes (seeds 0..scenes-1); held-out ones start at 1_000_000
    vae_steps: int = 1500
    vae_batch: int = 8
    vae_lr: float = 1e-3
    dit_steps: int = 3000
    dit_batch: int = 8
    dit_lr: float = 5e-4
    decoder_steps: int = 400
    decoder_batch: int = 12
    decoder_lr: float = 5e-4
    decoder_object_weight: float = 1.0  # phase 4: object pixels count 1 + this (phase 1: 10)
    # phase 4: N(0, this^2) added to the latents, in the DiT's units (latent x scale factor):
    # the DiT's samples are never exactly the encoder's latents, and a decoder that has only
    # seen the encoder's paints their small errors as blotches and dark halos around objects
    decoder_latent_noise: float = 0.3
    caption_dropout: float = 0.1  # per noisy chunk: null caption, adaLN null row
    null_sequence: float = 0.1  # whole sequence null (the sampler's null + context branch)
    alone: float = 0.15  # a noisy chunk alone at slot 0, null caption (the uncond branch)
    prefix_paste: float = 0.3  # first noisy chunk starts with 1-2 clean latent frames
    save_every: int = 200
    seed: int = 0
    threads: int = 2
    vae_from: Path | None = None  # a finished model folder: take its VAE, train the DiT only
    dit_from: Path | None = None  # a finished model folder: train its VAE decoder on (phase 4)


@dataclass
class TrainState:
    phase: str = "vae"  # vae -> latents -> dit -> decoder -> done
    step: int = 0  # within the phase
    vae_losses: list[float] = field(default_factory=list)
    dit_losses: list[float] = field(default_factory=list)
    decoder_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    scale_factor: float = 0.0
    psnr: float = 0.0  # after phase 1
    decoder_psnr: float = 0.0  # after phase 4: the shipped VAE's


# ---- data -----------------------------------------------------------------------------------


def frames_to_unit(frames: np.ndarray) -> Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) fp32 in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def vae_batch(rng: np.random.Generator, scenes: int, batch: int) -> Tensor:
    """Clips of one length per batch: 12 frames (the decode tile) mostly, 8 (the v2v tail tile)
    or 4 (one latent; a third of those static, the i2v image repeated 4x)."""
    length = int(rng.choice([12, 8, 4], p=[0.7, 0.15, 0.15]))
    clips = []
    for _ in range(batch):
        video = generate_video(int(rng.integers(scenes)), CHUNKS, SIZE)
        start = int(rng.integers(0, video.frames.shape[0] - length + 1))
        clip = video.frames[start : start + length]
        if length == 4 and rng.random() < 1 / 3:
            clip = np.repeat(clip[:1], 4, axis=0)
        clips.append(frames_to_unit(clip))
    return torch.stack(clips)


@dataclass
class LatentSet:
    latents: Tensor  # (N, 16, CHUNKS * WIDTH, 8, 8), x scale factor
    captions: list[tuple[str, ...]]  # per scene, per chunk
    objects: Tensor | None = None  # (N, CHUNKS * WIDTH, 8, 8) bool: voxel holds object pixels

    def weights(self, scene: int, chunk: int) -> Tensor:
        """(WIDTH, 8, 8) loss weights of one chunk: object voxels count 1 + OBJECT_WEIGHT."""
        if self.objects is None:
            return torch.ones(WIDTH, SIZE // 8, SIZE // 8)
        return 1 + OBJECT_WEIGHT * self.objects[scene, chunk * WIDTH : (chunk + 1) * WIDTH].float()


# ---- phases ---------------------------------------------------------------------------------


def train_vae(
    cfg: TrainConfig, state: TrainState, vae: ViTVAE, opt: torch.optim.Optimizer, save
) -> None:
    rng = np.random.default_rng(cfg.seed * 7919 + state.step)
    bar = tqdm(total=cfg.vae_steps, initial=state.step, desc="vae", unit="step", mininterval=10)
    vae.train()
    while state.step < cfg.vae_steps:
        lr = _cosine(cfg.vae_lr, state.step, cfg.vae_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x = vae_batch(rng, cfg.scenes, cfg.vae_batch)
        moments = vae.encoder(x)
        z = moments[:, :LATENT_CHANNELS]
        recon = vae.decoder(z)
        loss = weighted_mse(recon, x) + 1e-6 * z.pow(2).mean()
        _step(loss, vae, opt, state, state.vae_losses, bar)
        if state.step % cfg.save_every == 0:
            save()
    bar.close()
    vae.eval()


def weighted_mse(recon: Tensor, x: Tensor, object_weight: float = OBJECT_WEIGHT) -> Tensor:
    """Pixel MSE with object pixels weighted up: objects cover ~5 % of a frame, and a plain MSE
    sits for hundreds of steps on "background everywhere" before it draws them."""
    background = torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1, 1) / 127.5 - 1
    weight = 1 + object_weight * ((x - background).abs().amax(dim=1, keepdim=True) > 0.1)
    return (weight * (recon - x).pow(2)).mean() / weight.mean()


def train_decoder(
    cfg: TrainConfig, state: TrainState, vae: ViTVAE, opt: torch.optim.Optimizer, save
) -> None:
    """Phase 4: the decoder alone, on the frozen encoder's posterior means (the latents the DiT
    was trained on) plus cfg.decoder_latent_noise, with cfg.decoder_object_weight."""
    rng = np.random.default_rng(cfg.seed * 15485863 + state.step)
    bar = tqdm(
        total=cfg.decoder_steps, initial=state.step, desc="decoder", unit="step", mininterval=10
    )
    vae.decoder.train()
    while state.step < cfg.decoder_steps:
        lr = _cosine(cfg.decoder_lr, state.step, cfg.decoder_steps, warmup=20)
        for g in opt.param_groups:
            g["lr"] = lr
        x = vae_batch(rng, cfg.scenes, cfg.decoder_batch)
        with torch.no_grad():
            z = vae.encoder(x)[:, :LATENT_CHANNELS]
        if cfg.decoder_latent_noise > 0:  # drawn only when used: noise 0 is plain phase 4
            noise = torch.from_numpy(rng.standard_normal(z.shape, dtype=np.float32))
            z = z + noise * (cfg.decoder_latent_noise / state.scale_factor)
        loss = weighted_mse(vae.decoder(z), x, cfg.decoder_object_weight)
        _step(loss, vae.decoder, opt, state, state.decoder_losses, bar)
        if state.step % cfg.save_every == 0:
            save()
    bar.close()
    vae.decoder.eval()


@torch.no_grad()
def vae_psnr(vae: ViTVAE, seeds: range) -> float:
    """Reconstruction PSNR (dB, uint8 scale) over whole 12-frame tiles of held-out scenes."""
    errors = []
    for seed in seeds:
        video = generate_video(seed, 1, SIZE)
        x = frames_to_unit(video.frames[:12])[None]
        recon = vae.decode(vae.encode_mean(x)).clamp(-1, 1)
        errors.append(float(((recon - x) * 127.5).pow(2).mean()))
    return 10 * math.log10(255**2 / float(np.mean(errors)))


@torch.no_grad()
def encode_scenes(vae: ViTVAE, scenes: int, scale_factor: float | None) -> tuple[LatentSet, float]:
    """Posterior means of every scene by 12-frame tiles, as the pipeline encodes; the scale
    factor (1 / std) is measured here when not given."""
    latents, captions, objects = [], [], []
    for seed in tqdm(range(scenes), desc="latents", unit="scene"):
        video = generate_video(seed, CHUNKS, SIZE)
        x = frames_to_unit(video.frames)[None]
        tiles = [vae.encode_mean(x[:, :, s : s + 12]) for s in range(0, x.shape[2], 12)]
        latents.append(torch.cat(tiles, dim=2)[0])
        captions.append(video.captions)
        # which latent voxels (4 frames x 8 x 8 px) hold any object pixel
        mask = torch.from_numpy(video.union_mask).view(-1, 4, SIZE // 8, 8, SIZE // 8, 8)
        objects.append(mask.any(dim=5).any(dim=3).any(dim=1))
    stacked = torch.stack(latents)
    if scale_factor is None:
        scale_factor = float(1.0 / stacked.std())
    return LatentSet(stacked * scale_factor, captions, torch.stack(objects)), scale_factor


class Captions:
    """Caption rows the sampler feeds the DiT, cached per (text, chunk index)."""

    def __init__(self, text: TextEncoder, tokens: SpecialTokens, null_embedding: Tensor) -> None:
        self.text, self.tokens = text, tokens
        self.cond = TextConditioning()
        self.null_embedding = null_embedding
        self._cache: dict[tuple[str, int], Tensor] = {}

    def prompt(self, caption: str, index: int) -> Tensor:
        key = (caption, index)
        if key not in self._cache:
            emb = chunk_caption(self.text.encode(caption), self.tokens, self.cond, index, CHUNKS)
            self._cache[key] = emb.embedding[emb.mask.bool()].float()
        return self._cache[key]

    def null(self) -> Tensor:
        """The null caption's visible rows (`null_caption`'s mask), taken from the live
        parameter so that training reaches them."""
        return self.null_embedding[:NULL_CAPTION_TOKENS]


def stage_t(stage: int, u: float, window: int = CHUNKS) -> float:
    """Flow time of a chunk at window stage `stage` (0 = newest), fraction u through it: the
    sampler's grid t = s^2 / (3 - 2 s^2) at s = (stage + u) / window."""
    s = (stage + u) / window
    return s * s / (3 - 2 * s * s)


def dit_example(
    cfg: TrainConfig,
    rc: RuntimeConfig,
    rng: np.random.Generator,
    data: LatentSet,
    captions: Captions,
) -> tuple[ChunkGroup, list[tuple[int, Tensor, Tensor]]]:
    """One training group and its targets: (chunk position in the group, target v, loss weight
    per latent voxel: 0 on pasted prefix frames, object voxels weighted up)."""
    scene = int(rng.integers(data.latents.shape[0]))
    clean = data.latents[scene].split(WIDTH, dim=1)  # CHUNKS x (16, 6, 8, 8)
    tokens = (SIZE // 16) ** 2 * WIDTH
    null = captions.null()
    u = float(rng.random())
    kind = rng.random()
    if kind < cfg.alone:  # the uncond branch: one noisy chunk, no context, no text, slot 0
        c = int(rng.integers(CHUNKS))
        t = stage_t(0, float(rng.random()), window=1)
        x, v = _noised(clean[c], t, rng)
        chunk = ChunkInput(x, t, null, True, 0, WIDTH, (0, tokens))
        return ChunkGroup([chunk]), [(0, v, data.weights(scene, c))]
    all_null = kind < cfg.alone + cfg.null_sequence
    n_clean, stages = window_layout(rng)  # stages: window levels of the chunks in flight
    total = n_clean + len(stages)  # chunks that exist at this point of the sampler's loop
    chunks, targets = [], []
    for c in range(total):
        k_range = (0, (c + 1) * tokens)
        if c < n_clean:  # clean context, as the null branch writes it into the KV cache
            chunks.append(
                ChunkInput(clean[c], rc.clean_t, null, True, c * WIDTH, total * WIDTH, k_range)
            )
            continue
        t = stage_t(stages[c - n_clean], u)
        x, v = _noised(clean[c], t, rng)
        weight = data.weights(scene, c)
        if c == n_clean and rng.random() < cfg.prefix_paste:  # i2v / v2v prefix frames
            n = int(rng.integers(1, 3))
            x[:, :n] = clean[c][:, :n]
            weight[:n] = 0  # pasted frames are given, not predicted
        dropped = all_null or rng.random() < cfg.caption_dropout
        caption = null if dropped else captions.prompt(data.captions[scene][c], c)
        chunks.append(ChunkInput(x, t, caption, dropped, c * WIDTH, total * WIDTH, k_range))
        targets.append((c, v, weight))
    return ChunkGroup(chunks), targets


def window_layout(rng: np.random.Generator) -> tuple[int, list[int]]:
    """A moment of the sampler's loop in a 4-chunk session: the first chunk in flight (the ones
    before it are finished, clean context) and the window levels of the chunks in flight, oldest
    first. Drawn from the forwards the sampler itself plans (`sampler_layouts`), so the window
    filling, full and draining, with and without a v2v prefix, are trained as often as run."""
    layouts = sampler_layouts()
    n_clean, levels = layouts[int(rng.integers(len(layouts)))]
    return n_clean, list(levels)


@functools.cache
def sampler_layouts(num_steps: int = 16) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(first chunk in flight, levels oldest first) of every forward of a CHUNKS-chunk session
    with a v2v prefix of 0..CHUNKS-1 chunks, as `scheduler.window` plans them."""
    out = []
    for prefix in range(CHUNKS):
        spec = WindowSpec(num_steps, CHUNKS, CHUNKS, prefix)
        for step in range(forward_count(CHUNKS, CHUNKS, num_steps, prefix)):
            plan = plan_forward(spec, step)
            out.append((plan.chunks[0].chunk_index, tuple(c.stage_level for c in plan.chunks)))
    return tuple(out)


def _noised(clean: Tensor, t: float, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    noise = torch.from_numpy(rng.standard_normal(clean.shape, dtype=np.float32))
    return (1 - t) * noise + t * clean, clean - noise


def dit_loss(dit: VideoDiT, examples: list[tuple[ChunkGroup, list]]) -> Tensor:
    """The flow-matching loss of a batch of `dit_example`s: each target chunk's weighted mean
    squared velocity error, averaged over the chunks."""
    velocities = dit.run([g for g, _ in examples])
    losses = []
    for out, (_, targets) in zip(velocities, examples, strict=True):
        for c, v, weight in targets:
            error = (out[c] - v).pow(2).mean(dim=0)  # over channels: (WIDTH, h, w)
            losses.append((weight * error).sum() / weight.sum())
    return torch.stack(losses).mean()


def train_dit(
    cfg: TrainConfig,
    state: TrainState,
    dit: VideoDiT,
    opt: torch.optim.Optimizer,
    data: LatentSet,
    captions: Captions,
    rc: RuntimeConfig,
    save,
) -> None:
    rng = np.random.default_rng(cfg.seed * 104729 + state.step)
    bar = tqdm(total=cfg.dit_steps, initial=state.step, desc="dit", unit="step", mininterval=10)
    dit.train()
    while state.step < cfg.dit_steps:
        lr = _cosine(cfg.dit_lr, state.step, cfg.dit_steps, warmup=100)
        for g in opt.param_groups:
            g["lr"] = lr
        examples = [dit_example(cfg, rc, rng, data, captions) for _ in range(cfg.dit_batch)]
        _step(dit_loss(dit, examples), dit, opt, state, state.dit_losses, bar)
        if state.step % cfg.save_every == 0:
            save()
    bar.close()
    dit.eval()


def _step(
    loss: Tensor,
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    state: TrainState,
    history: list[float],
    bar: tqdm,
) -> None:
    """One optimiser step (gradients clipped to norm 1) and its bookkeeping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    state.step += 1
    history.append(loss.item())
    bar.update(1)
    bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)


def _cosine(peak: float, step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- the whole run --------------------------------------------------------------------------


def train(cfg: TrainConfig) -> TrainState:
    """Run (or resume) every phase and write the model folder to cfg.out."""
    if cfg.vae_from is not None and cfg.dit_from is not None:
        raise ValueError("give --vae-from or --dit-from, not both: together nothing is trained")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    work = out / "train"
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"
    torch.manual_seed(cfg.seed)
    vae = random_vae(toy_vae_config(), seed=cfg.seed + 1)
    dit = VideoDiT(toy_config())
    init_random_(dit, seed=cfg.seed)
    # a zero final linear starts every velocity at 0: a calmer start for flow matching
    torch.nn.init.zeros_(dit.final_linear.linear.weight)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    dit_opt = torch.optim.AdamW(dit.parameters(), lr=cfg.dit_lr, weight_decay=0.0)
    decoder_opt = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    state = TrainState()
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        state = TrainState(**saved["state"])
        vae.load_state_dict(saved["vae"])
        dit.load_state_dict(saved["dit"])
        vae_opt.load_state_dict(saved["vae_opt"])
        dit_opt.load_state_dict(saved["dit_opt"])
        if "decoder_opt" in saved:  # states saved before phase 4 existed have none
            decoder_opt.load_state_dict(saved["decoder_opt"])
        if state.phase == "done":  # a bigger budget than last time: train on
            if len(state.dit_losses) < cfg.dit_steps and cfg.dit_from is None:
                state.phase, state.step = "dit", len(state.dit_losses)
            elif len(state.decoder_losses) < cfg.decoder_steps and cfg.vae_from is None:
                state.phase, state.step = "decoder", len(state.decoder_losses)
        print(f"resuming: phase {state.phase}, step {state.step}, {state.seconds:.0f} s so far")
    elif cfg.vae_from is not None:
        state = vae_from_folder(Path(cfg.vae_from), vae)
    elif cfg.dit_from is not None:
        state = dit_from_folder(Path(cfg.dit_from), dit, vae)
    started, seconds0 = time.perf_counter(), state.seconds

    def save() -> None:
        state.seconds = seconds0 + time.perf_counter() - started
        torch.save(
            {
                "state": dataclasses.asdict(state),  # plain data: loads whatever moves
                "vae": vae.state_dict(),
                "dit": dit.state_dict(),
                "vae_opt": vae_opt.state_dict(),
                "dit_opt": dit_opt.state_dict(),
                "decoder_opt": decoder_opt.state_dict(),
            },
            work / "state.tmp",
        )
        (work / "state.tmp").replace(state_path)
        write_loss_plot(
            work / "loss.png",
            {"vae": state.vae_losses, "dit": state.dit_losses, "decoder": state.decoder_losses},
        )

    # the frozen text side, written where the model folder keeps it
    d_model = toy_config().model_config.caption_channels
    write_tiny_t5(out / "t5_pretrained", d_model=d_model, seed=cfg.seed + TEXT_SEED)
    write_special_tokens(out / "special_tokens.npz", d_model, seed=cfg.seed + TOKENS_SEED)
    text = TextEncoder(out / "t5_pretrained")
    tokens = SpecialTokens.load(out / "special_tokens.npz")

    if state.phase == "vae":
        train_vae(cfg, state, vae, vae_opt, save)
        state.psnr = vae_psnr(vae, PSNR_SEEDS)
        print(f"vae reconstruction PSNR {state.psnr:.2f} dB (20 held-out 12-frame tiles)")
        state.phase, state.step = "dit", 0
        save()
    if state.phase == "dit":
        data, state.scale_factor = encode_scenes(vae, cfg.scenes, state.scale_factor or None)
        captions = Captions(text, tokens, dit.y_embedder.null_caption_embedding)
        rc = toy_config(state.scale_factor).runtime_config
        train_dit(cfg, state, dit, dit_opt, data, captions, rc, save)
        if cfg.vae_from is None:
            state.phase, state.step = "decoder", len(state.decoder_losses)  # 0 unless resumed
        else:  # the folder's decoder went through phase 4 already
            state.phase = "done"
        save()
    if state.phase == "decoder":
        train_decoder(cfg, state, vae, decoder_opt, save)
        state.decoder_psnr = vae_psnr(vae, PSNR_SEEDS)
        print(f"decoder trained on: VAE PSNR {state.decoder_psnr:.2f} dB")
        state.phase = "done"
        save()
    write_folder(out, toy_config(state.scale_factor), dit, vae)
    meta = {
        "seconds": round(state.seconds, 1),
        "vae_psnr_db": round(state.psnr, 2),  # after phase 1
        "decoder_psnr_db": round(state.decoder_psnr, 2),  # the shipped VAE
        "scale_factor": state.scale_factor,
        "train": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()
        },
        "final_dit_loss": float(np.mean(state.dit_losses[-50:])) if state.dit_losses else None,
    }
    (work / "summary.json").write_text(json.dumps(meta, indent=2) + "\n")
    return state


def vae_from_folder(folder: Path, vae: ViTVAE) -> TrainState:
    """Load a finished folder's VAE into `vae`; the state of a run about to start phase 3 with
    that folder's scale factor (so the latents are the ones its own phase 3 trained on)."""
    config, first_psnr = _load_folder_vae(folder, vae)
    return TrainState(
        phase="dit",
        scale_factor=config.runtime_config.scale_factor,
        psnr=first_psnr,
        decoder_psnr=vae_psnr(vae, PSNR_SEEDS),
    )


def dit_from_folder(folder: Path, dit: VideoDiT, vae: ViTVAE) -> TrainState:
    """Load a finished folder's DiT and VAE into `dit` and `vae`; the state of a run about to
    start phase 4 on them: its decoder trains on from the folder's, on the latents of the
    folder's encoder (the ones its DiT learned), which stays frozen."""
    config, first_psnr = _load_folder_vae(folder, vae)
    dit.load_state_dict(load_dit(folder, config).state_dict())
    return TrainState(
        phase="decoder", scale_factor=config.runtime_config.scale_factor, psnr=first_psnr
    )


def _load_folder_vae(folder: Path, vae: ViTVAE) -> tuple[MagiConfig, float]:
    """Load a finished folder's VAE into `vae`; the folder's config and its VAE PSNR after
    phase 1, as its run measured it (0 where the folder keeps no summary)."""
    config = read_config(folder)
    vae.load_state_dict(load_vae(folder_paths(folder, config).vae).state_dict())
    summary = folder / "train" / "summary.json"
    first_psnr = json.loads(summary.read_text())["vae_psnr_db"] if summary.is_file() else 0.0
    return config, first_psnr


def write_folder(out: Path, config: MagiConfig, dit: VideoDiT, vae: ViTVAE) -> None:
    """The official layout: config.json, inference_weight/, vae/ (t5 and tokens already there)."""
    config.to_json(out / "config.json")
    save_dit(dit, out / config.weight_subdir, num_shards=1)
    save_vae(vae, out / "vae")
