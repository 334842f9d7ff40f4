"""MAGI-1 configuration: the three sections of the official `config.json`, and the presets.

The official loader requires every field to be present in the JSON (defaults are never read
from it); we do the same, so a config written here loads in the official code and back.
Field meanings and the shipped values are in magi1-reference.md §2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported only where a dtype object is asked for: the server process reads configs to
# validate requests at the edge and never loads torch.
_DTYPES = ("torch.float32", "torch.bfloat16")
CONFIG_FILE = "config.json"
EMBEDDED_MODELS = Path(__file__).resolve().parents[1] / "models"
EMBEDDED = ("toy",)  # presets whose trained weights ship in the repository's models/


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message says what is wrong and where."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture (`model_config`); identical for base / distill / quant of one size."""

    model_name: str = "videodit_ardf"  # informational only
    num_layers: int = 34  # transformer layers L
    hidden_size: int = 3072  # D
    ffn_hidden_size: int = 12288  # F; fc1 outputs 2F when gated_linear_unit
    num_attention_heads: int = 24  # query heads Hq (self- and cross-attention)
    num_query_groups: int = 8  # KV heads G (GQA)
    kv_channels: int = 128  # head dim hd; the model assumes D == Hq * hd
    layernorm_epsilon: float = 1e-6  # eps of every DiT LayerNorm
    apply_layernorm_1p: bool = True  # fused LayerNorms store gamma - 1
    x_rescale_factor: float = 1.0  # latent x this before patch embedding; velocity / this
    half_channel_vae: bool = False  # duplicate 16 latent channels to 32 (24B)
    params_dtype: str = "torch.bfloat16"  # storage dtype of the weights
    patch_size: int = 2  # spatial patch, latent pixels
    t_patch_size: int = 1  # temporal patch, latent frames
    in_channels: int = 16  # channels seen by the patch embedding
    out_channels: int = 16  # channels produced by the final linear
    cond_hidden_ratio: float = 0.25  # condition width = D * ratio
    caption_channels: int = 4096  # T5 width
    caption_max_length: int = 800  # T5 tokens and rows of null_caption_embedding
    xattn_cond_hidden_ratio: float = 1.0  # projected text width for cross-attention = D * ratio
    cond_gating_ratio: float = 1.0  # gate width = D * ratio
    gated_linear_unit: bool = False  # SwiGLU FFN if true, exact GELU otherwise

    def __post_init__(self) -> None:
        if self.hidden_size != self.num_attention_heads * self.kv_channels:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must equal num_attention_heads "
                f"({self.num_attention_heads}) x kv_channels ({self.kv_channels}): "
                "MAGI-1 derives the RoPE width from hidden_size / num_attention_heads"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if (self.num_attention_heads * self.kv_channels) % 8:
            raise ValueError(
                "num_attention_heads x kv_channels must be a multiple of 8 (linear_proj)"
            )
        if self.kv_channels % 8:
            raise ValueError(
                f"kv_channels must be a multiple of 8 (RoPE bands), got {self.kv_channels}"
            )
        if self.params_dtype not in _DTYPES:
            raise ValueError(
                f"params_dtype must be one of {sorted(_DTYPES)}, got {self.params_dtype!r}"
            )

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.params_dtype.removeprefix("torch."))

    @property
    def cond_dim(self) -> int:
        """Width of the timestep / adaLN condition vector (Dc)."""
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def rope_bands(self) -> int:
        """Learned frequency bands per axis (t, h, w): head dim // 8."""
        return (self.hidden_size // self.num_attention_heads) // 8


@dataclass(frozen=True)
class RuntimeConfig:
    """Sampling (`runtime_config`)."""

    cfg_number: int = 3  # 3 = three-branch CFG (base); 1 = one forward (distill / quant)
    cfg_t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)  # t bounds of scale pairs
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)  # s_p per t range
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)  # s_t per t range
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)  # look-back in chunks per step quartile
    clean_chunk_kvrange: int = 1  # look-back of a clean chunk when forwarded for its KV
    clean_t: float = 0.9999  # timestep of the clean-chunk KV forward
    seed: int = 1234  # RNG seed
    num_frames: int = 96  # requested frames; rounded up to whole chunks
    video_size_h: int = 720  # pixels, multiple of 16
    video_size_w: int = 720  # pixels, multiple of 16
    num_steps: int = 64  # Euler steps per chunk
    window_size: int = 4  # chunks in flight
    fps: int = 24  # output frames per second; also sets the VAE temporal tile
    chunk_width: int = 6  # latent frames per chunk
    load: str = "."  # DiT checkpoint root (holds inference_weight*/)
    t5_pretrained: str | None = "t5_pretrained"  # folder holding t5-v1_1-xxl/
    t5_device: str = "cpu"  # device T5 runs on
    vae_pretrained: str | None = "vae"  # VAE folder (diffusers layout)
    scale_factor: float = 0.18215  # DiT latent = VAE posterior mean x this
    temporal_downsample_factor: int = 4  # video frames per latent frame

    def __post_init__(self) -> None:
        if self.cfg_number not in (1, 3):
            raise ValueError(f"cfg_number must be 1 or 3, got {self.cfg_number}")
        n = len(self.cfg_t_range)
        if len(self.prev_chunk_scales) != n or len(self.text_scales) != n:
            raise ValueError(
                "cfg_t_range, prev_chunk_scales and text_scales must have equal lengths"
            )
        if self.num_steps % len(self.noise2clean_kvrange) or self.num_steps % self.window_size:
            raise ValueError(
                f"num_steps ({self.num_steps}) must be divisible by window_size "
                f"({self.window_size}) and by len(noise2clean_kvrange) "
                f"({len(self.noise2clean_kvrange)})"
            )
        if self.video_size_h % 16 or self.video_size_w % 16:
            raise ValueError(
                f"video size must be a multiple of 16, got {self.video_size_h}x{self.video_size_w}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Systems (`engine_config`)."""

    distributed_backend: str = "nccl"  # torch.distributed backend
    distributed_timeout_minutes: int = 15  # process-group timeout
    pp_size: int = 1  # pipeline-parallel stages
    cp_size: int = 1  # context-parallel degree (Ulysses)
    cp_strategy: str = "cp_ulysses"  # none / cp_ulysses / cp_shuffle_overlap
    ulysses_overlap_degree: int = 1  # head groups overlapping attention with all-to-all
    fp8_quant: bool = False  # fp8 e4m3 linears in layers 1..L-2
    distill_nearly_clean_chunk_threshold: float = 0.3  # t above which the oldest chunk blends
    shortcut_mode: str = "8,16,16"  # step-size pattern when num_steps == 12
    distill: bool = False  # shortcut step-size embedding; .distill weights
    kv_offload: bool = True  # KV cache in host memory
    enable_cuda_graph: bool = False  # declared but unused by the official code


_SECTIONS = {
    "model_config": ModelConfig,
    "runtime_config": RuntimeConfig,
    "engine_config": EngineConfig,
}


@dataclass(frozen=True)
class MagiConfig:
    """The whole official `config.json`."""

    model_config: ModelConfig = field(default_factory=ModelConfig)
    runtime_config: RuntimeConfig = field(default_factory=RuntimeConfig)
    engine_config: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        want = 1 if (self.engine_config.distill or self.engine_config.fp8_quant) else 3
        if self.runtime_config.cfg_number != want:
            raise ValueError(
                f"cfg_number must be {want} for distill={self.engine_config.distill}, "
                f"fp8_quant={self.engine_config.fp8_quant} (got {self.runtime_config.cfg_number})"
            )

    @property
    def weight_subdir(self) -> str:
        """`inference_weight[.fp8][.distill]`, as the official loader picks it."""
        name = "inference_weight"
        if self.engine_config.fp8_quant:
            name += ".fp8"
        if self.engine_config.distill:
            name += ".distill"
        return name

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in _SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> MagiConfig:
        sections = {}
        for section, klass in _SECTIONS.items():
            if section not in data:
                raise ValueError(f"{source}: missing section {section!r}")
            values = dict(data[section])
            names = [f.name for f in dataclasses.fields(klass)]
            missing = [n for n in names if n not in values]
            unknown = [k for k in values if k not in names]
            if missing or unknown:
                raise ValueError(
                    f"{source}: {section} missing fields {missing}, unknown fields {unknown}"
                )
            for f in dataclasses.fields(klass):
                if isinstance(values[f.name], list):
                    values[f.name] = tuple(values[f.name])
            sections[section] = klass(**values)
        return cls(**sections)

    @classmethod
    def from_json(cls, path: str | Path) -> MagiConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def to_json(self, path: str | Path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=4)
            f.write("\n")


def _official(size: str, variant: str) -> MagiConfig:
    """One of the six configs shipped in MAGI-1's example/ folder (reference §2.2)."""
    if size == "4.5B":
        model = ModelConfig()
        steps = 64
        h, w = 720, 720
        cp, t5_device = 1, "cpu"
    else:
        model = ModelConfig(
            num_layers=48,
            hidden_size=6144,
            ffn_hidden_size=16384,
            num_attention_heads=48,
            x_rescale_factor=0.1,
            half_channel_vae=True,
            in_channels=32,
            out_channels=32,
            gated_linear_unit=True,
        )
        steps = {"base": 32}.get(variant, 16)
        h, w = 720, 1280
        cp, t5_device = 8, "cuda"
    distill = variant != "base"
    runtime = RuntimeConfig(
        cfg_number=1 if distill else 3,
        num_steps=steps,
        video_size_h=h,
        video_size_w=w,
        load=f"./downloads/{size}_{variant}",
        t5_pretrained="./downloads/t5_pretrained",
        t5_device=t5_device,
        vae_pretrained="./downloads/vae",
    )
    engine = EngineConfig(cp_size=cp, fp8_quant=variant == "distill_quant", distill=distill)
    return MagiConfig(model, runtime, engine)


def _tiny(variant: str) -> MagiConfig:
    """Ours: every code path of the big models (GQA with G < 8, parallel self/cross attention,
    both norm kinds, RoPE, gating, the distill step embedding) at test size, fp32."""
    model = ModelConfig(
        num_layers=3,  # fp8 keeps the first and last layer unquantised: 3 exercises both kinds
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=16,
        params_dtype="torch.float32",
        caption_channels=64,
    )
    distill = variant != "base"
    runtime = RuntimeConfig(
        cfg_number=1 if distill else 3,
        num_steps=8,
        video_size_h=64,
        video_size_w=64,
        load=".",
        t5_pretrained="t5_pretrained",
        vae_pretrained="vae",
    )
    engine = EngineConfig(
        distributed_backend="gloo",
        fp8_quant=variant == "distill_quant",
        distill=distill,
        kv_offload=False,
    )
    return MagiConfig(model, runtime, engine)


def _toy() -> MagiConfig:
    """Ours: the world model the project trains on toyworld scenes (`python -m train`,
    train/toy.py) and ships in models/toy. MAGI-1's DiT (GQA, parallel self/cross attention,
    RoPE, gating, the 4.5B GELU MLP) at 64x64, fp32, three-branch CFG. The shipped config.json
    carries the measured latent `scale_factor`; this preset keeps the official default."""
    model = ModelConfig(
        num_layers=4,
        hidden_size=256,
        ffn_hidden_size=768,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=32,
        params_dtype="torch.float32",
        caption_channels=64,
    )
    runtime = RuntimeConfig(
        cfg_number=3,
        # MAGI-1's text scale 7.5 below t = 0.3 grows the toy model's objects to 2-3x their size;
        # 3 keeps them smaller and scores better on every V2V column (docs/toyworld.md)
        text_scales=(3.0, 3.0, 3.0, 0.0, 0.0),
        num_steps=16,
        video_size_h=64,
        video_size_w=64,
        load=".",
        t5_pretrained="t5_pretrained",
        vae_pretrained="vae",
    )
    engine = EngineConfig(distributed_backend="gloo", kv_offload=False)
    return MagiConfig(model, runtime, engine)


def _build_presets() -> dict[str, MagiConfig]:
    presets = {"toy": _toy(), "tiny": _tiny("base"), "tiny_distill": _tiny("distill")}
    presets["tiny_distill_quant"] = _tiny("distill_quant")
    for size in ("4.5B", "24B"):
        for variant in ("base", "distill", "distill_quant"):
            presets[f"{size}_{variant}"] = _official(size, variant)
    return presets


PRESETS: dict[str, MagiConfig] = _build_presets()


def get_preset(name: str) -> MagiConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_name(config: MagiConfig) -> str | None:
    """The preset whose architecture and variant this config has, if any."""
    for name, preset in PRESETS.items():
        if (
            preset.model_config == config.model_config
            and preset.engine_config.distill == config.engine_config.distill
            and preset.engine_config.fp8_quant == config.engine_config.fp8_quant
        ):
            return name
    return None


def read_config(folder: str | Path) -> MagiConfig:
    """The config.json of a model folder; CheckpointError when it is missing or malformed."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (not a model folder)")
    try:
        return MagiConfig.from_json(path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from e


def embedded_folder(name: str) -> Path:
    """The shipped folder of an embedded preset (`toy`): models/<name> in the repository."""
    if name not in EMBEDDED:
        raise CheckpointError(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED)}")
    folder = EMBEDDED_MODELS / name
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{folder}: the embedded {name!r} model is missing (it ships in the repository's "
            f"models/ folder; retrain it with `python -m train --out {folder}`)"
        )
    return folder


def check_head_split(num_heads: int, num_groups: int, world_size: int) -> None:
    if num_heads % world_size:
        raise ValueError(f"{num_heads} query heads do not split over {world_size} ranks")
    if num_groups % world_size and world_size % num_groups:
        raise ValueError(
            f"{num_groups} KV groups and {world_size} ranks: one must divide the other"
        )
