"""Text side of MAGI-1: prompt cleaning, T5 encoding, special tokens and per-chunk captions.

Facts come from magi1-reference.md §4.10 (text per chunk, special tokens, null caption) and §6
(T5 encoder), pitfalls 18 and 19 of §11. The DiT sees, for every chunk, a prompt half and a null
half, each `(800, C)` with a mask; this module builds both from a prompt string.

transformers (for the tokenizer only) and sentencepiece are imported inside the functions that
need them: importing transformers costs ~3 s, and code that only cleans prompts or assembles
captions (server, scheduler tests) should not pay it. The encoder itself is model/t5.py, plain
torch, so a worker start never imports transformers' modeling code.
"""

from __future__ import annotations

import contextlib
import html
import re
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import ftfy
import numpy as np
import torch
from bs4 import BeautifulSoup
from torch import Tensor

# The reference hard-codes 800 when it truncates after a special-token prepend, whatever the
# tokenizer's max_length was.
CAPTION_TOKENS = 800
# Visible rows of the null caption (the rest of null_caption_embedding is masked out).
NULL_CAPTION_TOKENS = 50
# The official layout puts the encoder one level below `t5_pretrained`.
T5_SUBFOLDER = "t5-v1_1-xxl"
# DURATION_1..DURATION_8 sit at other_tokens[7..14]; list index k means "k + 1 chunks remain".
_DURATION_ROW0 = 7
_DURATION_MAX_INDEX = 7


# ---------------------------------------------------------------------------------------------
# 1. Prompt cleaning (DeepFloyd-IF / PixArt caption cleaning, as MAGI-1 trained with it)
# ---------------------------------------------------------------------------------------------

# Each step is (pattern, replacement), applied with re.sub in table order. The order is part of
# the behaviour (pitfall 19), so every table is run exactly where the reference runs it.
_Step = tuple["re.Pattern[str]", str]


def _steps(*pairs: tuple[str, str]) -> tuple[_Step, ...]:
    return tuple((re.compile(pattern), repl) for pattern, repl in pairs)


def _url_pattern(scheme: str) -> str:
    # A scheme prefix, or a bare host on one of a few TLDs with an optional path. The reference
    # runs this twice, once with "https?:" and once with "www:".
    host = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
    return rf"\b((?:{scheme}(?:\/{{1,3}}|[a-zA-Z0-9%])|{host}))"


_MEDIA_EXT = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"

# Before BeautifulSoup: a literal "<person>" tag would otherwise vanish as markup.
_PRE_HTML = _steps(
    ("<person>", "person"),
    (_url_pattern("https?:"), ""),
    (_url_pattern("www:"), ""),
)

_POST_HTML = _steps(
    (r"@[\w\d]+\b", ""),  # @handles
    # CJK strokes .. unified ideographs (U+31C0-U+9FFF). Kana and hangul lie outside: they stay.
    (r"[\u31c0-\u9fff]+", ""),
    # Every dash-like code point becomes one ASCII hyphen.
    (
        r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40"
        r"\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+",
        "-",
    ),
    ("[`´«»“”¨]", '"'),  # look-alike quotes to ASCII
    ("[‘’]", "'"),
    # Entities that survived BeautifulSoup (double-escaped input) are deleted, not decoded.
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids
    (r"\\n", " "),  # a literal backslash-n; real newlines go with the whitespace collapse
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"[\S]+\.(?:{_MEDIA_EXT})", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"[\.]{2,}", " "),
    # The "bad punctuation" class; `&` and `@` left over from above go here too.
    (r"[#®•©™&@·º½¾¿¡§~)(\][}{|\\/*]+", " "),
    (r"\s+\.\s+", " "),
)

# Hyphens and underscores become spaces only when there are more than three of them
# (this-is-my-cute-cat), so ordinary compounds (well-known) survive.
_DASH_OR_UNDERSCORE = re.compile(r"[-_]")
_MAX_KEPT_DASHES = 3

# After ftfy and html.unescape: product ids, shop spam, sizes, then spacing.
_POST_BASIC = _steps(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_MEDIA_EXT})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080; latin x, cyrillic x, times sign
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
)

# The reference's strip() before these is a no-op (its result is discarded), so a leading
# space left by the collapse above blocks the outer-quote rule. Reproduced on purpose.
_TRIM = _steps(
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),
    (r"^['_,\-:;]", ""),
    (r"['_,\-:\-+]$", ""),
    (r"^\.\S+$", ""),
)


def _apply(steps: tuple[_Step, ...], text: str) -> str:
    for pattern, repl in steps:
        text = pattern.sub(repl, text)
    return text


def _basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def _clean_once(text: str) -> str:
    text = urllib.parse.unquote_plus(str(text))  # '+' becomes a space
    text = text.strip().lower()
    text = _apply(_PRE_HTML, text)
    # Strips tags and decodes entities: "&lt;b&gt;" becomes "<b>", which pass 2 then strips.
    text = BeautifulSoup(text, features="html.parser").text
    text = _apply(_POST_HTML, text)
    if len(_DASH_OR_UNDERSCORE.findall(text)) > _MAX_KEPT_DASHES:
        text = _DASH_OR_UNDERSCORE.sub(" ", text)
    text = _basic_clean(text)
    text = _apply(_POST_BASIC, text)
    return _apply(_TRIM, text).strip()


def clean_prompt(text: str) -> str:
    """Clean a prompt the way MAGI-1's training captions were cleaned: lower-cased, URLs, markup,
    CJK ideographs, ids and most punctuation removed (magi1-reference.md §6).

    Applied twice, as the reference does: markup that entity decoding produced in the first
    pass is stripped by the second. Output depends on ftfy (6.2.0) and beautifulsoup4 (4.13.4).
    """
    return _clean_once(_clean_once(text))


# ---------------------------------------------------------------------------------------------
# 2. T5 encoder with an LRU cache of embeddings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptEmbedding:
    """One caption as the DiT's cross-attention reads it. Treat the tensors as read-only: the
    encoder's cache hands the same objects to every caller."""

    # Both tensors live on one device: the encoder's cache device (where the DiT reads them),
    # or the null caption's embedding's device.
    embedding: Tensor  # (L, C) float32; L = 800 from T5, rows past the mask are ignored
    mask: Tensor  # (L,) 1 = visible token; int64 from T5, float32 after a prepend (chunk_caption)
    text: str  # the cleaned prompt that produced it ("" for the null caption)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())


@dataclass(frozen=True)
class CacheInfo:
    hits: int  # encode() calls answered from the cache
    misses: int  # encode() calls that ran the encoder
    entries: int  # embeddings held now
    capacity: int  # most embeddings held; 0 disables the cache


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' and the hub's progress bars and warnings for the duration of a
    load or save, then restore whatever the application had set."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def t5_folder(t5_pretrained: str | Path) -> Path:
    """The encoder folder inside `t5_pretrained`; raises if the official layout is missing."""
    folder = Path(t5_pretrained) / T5_SUBFOLDER
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no T5 encoder at {folder}: t5_pretrained must be a folder holding "
            f"{T5_SUBFOLDER}/ with config.json, the weights and the tokenizer files"
        )
    return folder


class TextEncoder:
    """T5 v1.1 encoder (fp32, model/t5.py) and tokenizer loaded from a local folder, with an LRU
    cache of embeddings keyed by the cleaned prompt.

    The encoder runs on `device` (the config's `t5_device`: the reference keeps the 4.5B
    models' T5 on the CPU, the 24B's on the GPU); results and their masks are kept on
    `cache_device` (default: `device`), the device of the DiT that reads them, so a cache hit
    costs no copy. At C = 4096 one entry is 13 MB, so the default 256 entries bound the cache
    near 3.4 GB of that device's memory. Thread-safe; the encoder runs under the cache lock, so
    concurrent misses are serialised.
    """

    def __init__(
        self,
        t5_pretrained: str | Path,
        device: str | torch.device = "cpu",
        *,
        cache_device: str | torch.device | None = None,
        max_length: int = CAPTION_TOKENS,
        cache_size: int = 256,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0 (0 disables the cache), got {cache_size}")
        from transformers import AutoTokenizer

        from model.t5 import load_t5_encoder

        folder = t5_folder(t5_pretrained)
        self.device = torch.device(device)
        self.cache_device = self.device if cache_device is None else torch.device(cache_device)
        self.max_length = max_length
        with _quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = load_t5_encoder(folder, self.device)
        self._cache: OrderedDict[str, PromptEmbedding] = OrderedDict()
        self._capacity = cache_size
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    def encode(self, prompt: str) -> PromptEmbedding:
        """Clean, tokenise to `max_length` (padded, truncated, `</s>` appended) and encode."""
        text = clean_prompt(prompt)
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                self._hits += 1
                return cached
            self._misses += 1
            result = self._encode_clean(text)
            if self._capacity:
                self._cache[text] = result
                if len(self._cache) > self._capacity:
                    self._cache.popitem(last=False)
            return result

    def _encode_clean(self, text: str) -> PromptEmbedding:
        batch = self.tokenizer(
            [text],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,  # keeps `</s>` last after max_length - 1 content tokens
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="np",  # made into tensors here, each on a stated device
        )
        ids = torch.as_tensor(batch["input_ids"], device=self.device)  # (1, L) int64
        mask = torch.as_tensor(batch["attention_mask"], device=self.device)  # (1, L) int64
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (1, L, C)
        # Copied outside inference mode: an inference tensor would raise in any later op that
        # autograd records (a DiT run without no_grad), far from here.
        embedding = hidden[0].to(self.cache_device, copy=True)
        return PromptEmbedding(
            embedding=embedding, mask=mask[0].to(self.cache_device, copy=True), text=text
        )

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self._capacity)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


# ---------------------------------------------------------------------------------------------
# 3. Special tokens (example/assets/special_tokens.npz)
# ---------------------------------------------------------------------------------------------


class SpecialToken(IntEnum):
    """Row of `other_tokens`. Rows 5, 6 and 17..99 are unused by the released code."""

    TRANS = 0  # transition; never used by the public pipeline
    HQ = 1
    STATIC = 2  # static first frames
    DYNAMIC = 3  # dynamic first frames
    BORDERNESS = 4
    DURATION_1 = 7  # DURATION_n: n generated chunks remain (this one included)
    DURATION_2 = 8
    DURATION_3 = 9
    DURATION_4 = 10
    DURATION_5 = 11
    DURATION_6 = 12
    DURATION_7 = 13
    DURATION_8 = 14  # also "8 or more remain"
    THREE_D = 15  # 3D-model look
    TWO_D_ANIME = 16  # 2D-anime look


_NPZ_KEYS = ("caption_token", "logo_token", "other_tokens")
_MIN_OTHER_ROWS = SpecialToken.TWO_D_ANIME + 1


def _npz_tensor(array: np.ndarray) -> Tensor:
    # The file holds float64; the reference rounds through float16 before the fp32 caption
    # dtype, so the vectors carry fp16 precision. fp16 is only a cast here, never compute.
    return torch.from_numpy(array.astype(np.float16)).float()


@dataclass(frozen=True)
class SpecialTokens:
    """Learned vectors in T5 output space that are prepended to captions."""

    caption: Tensor  # (1, C) float32; CAPTION token, negative prompt only
    logo: Tensor  # (1, C) float32; LOGO token, negative prompt only
    other: Tensor  # (R, C) float32, R >= 17 (100 in the release); rows by SpecialToken

    @classmethod
    def load(cls, path: str | Path) -> SpecialTokens:
        with np.load(Path(path)) as data:
            missing = [key for key in _NPZ_KEYS if key not in data]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing}; expected {list(_NPZ_KEYS)}")
            arrays = {key: data[key] for key in _NPZ_KEYS}
        channels = arrays["other_tokens"].shape[-1]
        for key, rows in (("caption_token", 1), ("logo_token", 1), ("other_tokens", None)):
            shape = arrays[key].shape
            if len(shape) != 2 or shape[1] != channels or (rows and shape[0] != rows):
                raise ValueError(f"{path}: {key} has shape {shape}, expected ({rows or 'R'}, C)")
        if arrays["other_tokens"].shape[0] < _MIN_OTHER_ROWS:
            raise ValueError(f"{path}: other_tokens needs >= {_MIN_OTHER_ROWS} rows")
        return cls(*(_npz_tensor(arrays[key]) for key in _NPZ_KEYS))

    @property
    def channels(self) -> int:
        return int(self.other.shape[1])

    def row(self, token: SpecialToken) -> Tensor:
        """(1, C) vector of one `other_tokens` row."""
        return self.other[int(token)].unsqueeze(0)

    def to(self, device: str | torch.device) -> SpecialTokens:
        """The same vectors on `device` (the captions' device, so a prepend copies nothing)."""
        return SpecialTokens(*(t.to(device) for t in (self.caption, self.logo, self.other)))


def write_special_tokens(path: str | Path, channels: int, seed: int = 0, rows: int = 100) -> Path:
    """Write a special_tokens.npz for a tiny model: isotropic Gaussian vectors with std 0.125,
    like the released ones (norm ~8 at C = 4096), float64 as in the release. The arrays are a
    function of (channels, seed, rows); the zip container may differ in timestamps."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(
            f,
            caption_token=rng.normal(0.0, 0.125, (1, channels)),
            logo_token=rng.normal(0.0, 0.125, (1, channels)),
            other_tokens=rng.normal(0.0, 0.125, (rows, channels)),
        )
    return path


# ---------------------------------------------------------------------------------------------
# 4. Per-chunk caption assembly
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextConditioning:
    """Which special tokens go in front of captions (the reference's PAD_* / NEG_PROMPT env
    switches, made config). The official run scripts and ComfyUI set PAD_DURATION=1 PAD_HQ=1,
    hence the defaults; all False reproduces a run with the variables unset."""

    pad_static: bool = False  # STATIC token (PAD_STATIC)
    pad_dynamic: bool = False  # DYNAMIC token (PAD_DYNAMIC)
    pad_borderness: bool = False  # BORDERNESS token (PAD_BORDERNESS)
    pad_hq: bool = True  # HQ token (PAD_HQ)
    pad_three_d: bool = False  # THREE_D token (PAD_THREE_D_MODEL)
    pad_two_d_anime: bool = False  # TWO_D_ANIME token (PAD_TWO_D_ANIME)
    pad_duration: bool = True  # DURATION_k token, chunks remaining (PAD_DURATION)
    neg_prompt: bool = False  # null caption gets BORDERNESS, TRANS, LOGO, CAPTION (NEG_PROMPT)

    def fixed_tokens(self) -> tuple[SpecialToken, ...]:
        """The non-duration tokens in the order the reference prepends them."""
        flags = (
            (self.pad_static, SpecialToken.STATIC),
            (self.pad_dynamic, SpecialToken.DYNAMIC),
            (self.pad_borderness, SpecialToken.BORDERNESS),
            (self.pad_hq, SpecialToken.HQ),
            (self.pad_three_d, SpecialToken.THREE_D),
            (self.pad_two_d_anime, SpecialToken.TWO_D_ANIME),
        )
        return tuple(token for enabled, token in flags if enabled)

    @property
    def prepends_any(self) -> bool:
        return self.pad_duration or bool(self.fixed_tokens())


def duration_index(generated_index: int, generated_total: int | None) -> int:
    """0-based DURATION list index for generated chunk `generated_index` of `generated_total`:
    `min(total - index - 1, 7)`, i.e. DURATION_(k+1) = "k + 1 chunks remain", capped at 8.

    Unbounded sessions (`generated_total is None`) always get index 7 (DURATION_8): the
    reference already gives every chunk with 8 or more chunks left that token, so an endless
    stream reads as "long video, not ending soon". Prefix (clean) chunks are not counted.
    """
    if generated_index < 0:
        raise ValueError(f"generated_index must be >= 0, got {generated_index}")
    if generated_total is None:
        return _DURATION_MAX_INDEX
    if generated_index >= generated_total:
        raise ValueError(
            f"generated_index {generated_index} is past the last chunk ({generated_total} total)"
        )
    return min(generated_total - generated_index - 1, _DURATION_MAX_INDEX)


def _prepend(vector: Tensor, embedding: Tensor) -> Tensor:
    """Put a (1, C) vector in front, shift the rest right and cut at the hard-coded 800."""
    vector = vector.to(device=embedding.device, dtype=embedding.dtype)
    return torch.cat([vector, embedding])[:CAPTION_TOKENS]


def _prepend_mask(mask: Tensor, caption_dtype: torch.dtype) -> Tensor:
    # A one in the *caption* dtype: torch.cat promotes an int64 mask to float32, as in the
    # reference. Downstream code reads masks with .bool(), so either dtype works.
    one = torch.ones(1, dtype=caption_dtype, device=mask.device)
    return torch.cat([one, mask])[:CAPTION_TOKENS]


def chunk_caption(
    prompt: PromptEmbedding,
    tokens: SpecialTokens,
    cond: TextConditioning,
    generated_index: int,
    generated_total: int | None,
) -> PromptEmbedding:
    """Prompt half of the caption for one generated (non-prefix) chunk.

    Tokens are prepended in the reference order STATIC, DYNAMIC, BORDERNESS, HQ, THREE_D,
    TWO_D_ANIME, DURATION; the last applied ends first, so the defaults give
    `[DURATION_k, HQ, t5_0, ...]`. Each prepend truncates to 800: two prepends drop the last two
    rows, and a full-length prompt loses its `</s>`. `generated_index` counts generated chunks
    only (prefix chunks excluded); see `duration_index` for the rule and for unbounded sessions.
    """
    k = duration_index(generated_index, generated_total)  # validates even when unused
    rows = [tokens.row(token) for token in cond.fixed_tokens()]
    if cond.pad_duration:
        rows.append(tokens.row(SpecialToken(_DURATION_ROW0 + k)))
    embedding, mask = prompt.embedding, prompt.mask
    for row in rows:
        embedding = _prepend(row, embedding)
        mask = _prepend_mask(mask, embedding.dtype)
    return PromptEmbedding(embedding=embedding, mask=mask, text=prompt.text)


def null_caption(
    null_caption_embedding: Tensor,
    tokens: SpecialTokens | None = None,
    cond: TextConditioning = TextConditioning(),
) -> PromptEmbedding:
    """Null half of every chunk: the DiT's `null_caption_embedding` (800, C) with only the first
    50 rows visible.

    With `cond.neg_prompt` the rows become `[BORDERNESS, TRANS, LOGO, CAPTION, null_0, ...]`
    (cut at 800) but the mask stays the first 50, so 4 tokens + null_0..null_45 are visible.
    The mask is float32 when `cond` prepends any prompt token and int64 otherwise, matching the
    reference, which derives it with zeros_like from the prompt mask.
    """
    embedding = null_caption_embedding.detach()
    if cond.neg_prompt:
        if tokens is None:
            raise ValueError("cond.neg_prompt needs the special tokens")
        border, trans = tokens.row(SpecialToken.BORDERNESS), tokens.row(SpecialToken.TRANS)
        for vector in (tokens.caption, tokens.logo, trans, border):
            embedding = _prepend(vector, embedding)
    dtype = torch.float32 if cond.prepends_any else torch.int64
    mask = torch.zeros(embedding.shape[0], dtype=dtype, device=embedding.device)
    mask[:NULL_CAPTION_TOKENS] = 1
    return PromptEmbedding(embedding=embedding, mask=mask, text="")


@dataclass(frozen=True)
class ChunkCaptions:
    """Both halves of `y` for one chunk: `y[0, i]` and `y[1, i]` in the reference."""

    prompt: PromptEmbedding  # text-conditioned half
    null: PromptEmbedding  # caption-dropped half


def chunk_captions(
    prompt: PromptEmbedding,
    null: PromptEmbedding,
    tokens: SpecialTokens,
    cond: TextConditioning,
    generated_index: int,
    generated_total: int | None,
) -> ChunkCaptions:
    """Prompt and null halves of one generated chunk. A prompt whose T5 mask sums to 0 is
    replaced by the null caption in both halves, without special tokens. Through `encode` this
    never happens: an empty prompt still yields `[</s>]` (mask sum 1)."""
    if prompt.num_tokens == 0:
        return ChunkCaptions(prompt=null, null=null)
    text = chunk_caption(prompt, tokens, cond, generated_index, generated_total)
    return ChunkCaptions(prompt=text, null=null)
