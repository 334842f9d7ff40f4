"""model/text.py: prompt cleaning, T5 encoding with a tiny offline T5, special tokens and the
per-chunk caption assembly of magi1-reference.md §4.10."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from model.folder import t5_device
from model.t5 import T5Config, load_t5_encoder
from model.text import (
    CAPTION_TOKENS,
    T5_SUBFOLDER,
    PromptEmbedding,
    SpecialToken,
    SpecialTokens,
    TextConditioning,
    TextEncoder,
    chunk_caption,
    chunk_captions,
    clean_prompt,
    duration_index,
    null_caption,
    write_special_tokens,
)
from model.tiny_t5 import write_tiny_t5

C = 64  # tiny T5 width, equal to the tiny DiT preset's caption_channels
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("t5_pretrained")
    write_tiny_t5(root, d_model=C, seed=0)
    return root


@pytest.fixture(scope="module")
def encoder(t5_dir: Path) -> TextEncoder:
    return TextEncoder(t5_dir)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> SpecialTokens:
    path = write_special_tokens(tmp_path_factory.mktemp("assets") / "special_tokens.npz", C, 0)
    return SpecialTokens.load(path)


def fake_prompt(valid: int, length: int = CAPTION_TOKENS) -> PromptEmbedding:
    """A T5-shaped caption whose row r is filled with the value r, `valid` tokens visible."""
    rows = torch.arange(length, dtype=torch.float32)[:, None].expand(length, C).clone()
    mask = (torch.arange(length) < valid).long()
    return PromptEmbedding(embedding=rows, mask=mask, text="fake")


# 1. Cleaning. Expected outputs follow the rules in magi1-reference.md §6, step by step.
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # unquote_plus first: '+' and %20 become spaces, then lower-case.
        ("A+Cat%20on+the+Mat", "a cat on the mat"),
        # "https://" goes with the scheme rule, "example.com/page" with the bare-host rule.
        ("Visit https://example.com/page for a dog running", "visit for a dog running"),
        # BeautifulSoup decodes the entities in pass 1 ("<b>bold</b> cat & dog"); "&" and "/"
        # are bad punctuation; pass 2 strips the "<b>" tag, while "< b>" is not a tag.
        ("&lt;b&gt;Bold&lt;/b&gt; cat &amp; dog", "bold< b> cat dog"),
        # CJK ideographs go, kana and hangul stay.
        ("一只猫 a cat ねこ 고양이", "a cat ねこ 고양이"),
        # Double-escaped: BeautifulSoup leaves "&quot;", which is then deleted, not decoded.
        ("a &amp;quot;red&amp;quot; car", "a red car"),
        # More than three hyphens: all become spaces; one hyphen survives.
        ("this-is-my-cute-cat", "this is my cute cat"),
        ("well-known cat", "well-known cat"),
        # IP address, then a file name (underscore and all).
        ("IMG_1234.jpg a cat at 192.168.0.1", "a cat at"),
        # Em dash to "-", curly quotes to ASCII; the trailing "'" is trailing punctuation.
        (
            "A dog \u2014 running\u2026 \u201cfast\u201d \u2018ok\u2019",
            'a dog - running\u2026 "fast" \'ok',
        ),
        ("#1 cat #12345 and 1234567 things", "cat and things"),
        # A space after ",", "." and "/" (which bad punctuation then turns into a space).
        ("hello:world,foo.bar/baz", "hello:world, foo. bar baz"),
        ("wow!!! (test) [x] {y} | z \\ w / q * ~", "wow!!! test x y z w q"),
        ("<person> walks a dog", "person walks a dog"),
        ("@user the sun rises", "the sun rises"),
        ("line\\nbreak real\nnewline", "line break real newline"),
        ('"a cat"', "a cat"),
        ("   ", ""),
    ],
)
def test_clean_prompt_follows_reference_rules(raw: str, expected: str) -> None:
    assert clean_prompt(raw) == expected


# 2. Encoding.
def test_encode_pads_to_800_with_int64_mask_counting_eos(encoder: TextEncoder) -> None:
    out = encoder.encode("A red cat jumps over the river at sunset.")
    content = encoder.tokenizer(out.text, add_special_tokens=False)["input_ids"]
    assert out.embedding.shape == (CAPTION_TOKENS, C)
    assert out.embedding.dtype == torch.float32
    assert out.mask.shape == (CAPTION_TOKENS,)
    assert out.mask.dtype == torch.int64
    assert out.num_tokens == len(content) + 1  # + </s>
    assert out.mask[: out.num_tokens].all() and not out.mask[out.num_tokens :].any()


def test_encode_truncation_keeps_eos_at_position_800(encoder: TextEncoder) -> None:
    out = encoder.encode("the cat runs " * 400)
    ids = encoder.tokenizer(
        [out.text], max_length=CAPTION_TOKENS, truncation=True, add_special_tokens=True
    )["input_ids"][0]
    assert out.num_tokens == CAPTION_TOKENS == len(ids)
    assert ids[-1] == encoder.tokenizer.eos_token_id


def test_empty_prompt_cleans_to_empty_and_encodes_to_eos_only(encoder: TextEncoder) -> None:
    for prompt in ("", "   \n\t", "一只猫"):
        out = encoder.encode(prompt)
        assert out.text == ""
        assert out.num_tokens == 1


def test_encode_matches_a_direct_t5_forward(encoder: TextEncoder) -> None:
    out = encoder.encode("two green birds fly above the clouds")
    batch = encoder.tokenizer(
        [out.text], max_length=CAPTION_TOKENS, padding="max_length", return_tensors="pt"
    )
    with torch.inference_mode():
        direct = encoder.model(**batch).last_hidden_state[0]
    torch.testing.assert_close(out.embedding, direct, rtol=0, atol=0)


def test_cache_hit_returns_identical_tensor_without_running_encoder(t5_dir: Path) -> None:
    enc = TextEncoder(t5_dir, cache_size=4)
    forwards = []
    enc.model.register_forward_hook(lambda *_: forwards.append(1))
    first = enc.encode("A cat sleeps.")
    again = enc.encode("  a CAT sleeps. ")  # same cleaned text, so the same cache key
    assert again.embedding is first.embedding and again.mask is first.mask
    assert len(forwards) == 1
    info = enc.cache_info()
    assert (info.hits, info.misses, info.entries, info.capacity) == (1, 1, 1, 4)


def test_cache_evicts_least_recently_used(t5_dir: Path) -> None:
    enc = TextEncoder(t5_dir, cache_size=2)
    a = enc.encode("a cat")
    enc.encode("a dog")
    enc.encode("a cat")  # refreshes "a cat"; "a dog" is now the oldest
    enc.encode("a bird")  # evicts "a dog"
    assert enc.encode("a cat") is a
    enc.encode("a dog")
    assert enc.cache_info().misses == 4


def test_missing_t5_subfolder_raises_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / T5_SUBFOLDER)):
        TextEncoder(tmp_path)


def test_write_tiny_t5_is_byte_deterministic(t5_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_t5(tmp_path / "same", d_model=C, seed=0)
    other = write_tiny_t5(tmp_path / "other", d_model=C, seed=1)
    for name in ("model.safetensors", "config.json", "spiece.model", "tokenizer.json"):
        assert (again / name).read_bytes() == (t5_dir / T5_SUBFOLDER / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_official_layout_with_only_spiece_model_tokenizes_the_same(
    t5_dir: Path, encoder: TextEncoder, tmp_path: Path
) -> None:
    # DeepFloyd's folder ships spiece.model and no tokenizer.json: transformers converts it.
    official = tmp_path / T5_SUBFOLDER
    shutil.copytree(t5_dir / T5_SUBFOLDER, official)
    (official / "tokenizer.json").unlink()
    text = clean_prompt("Three huge whales swim under the sea, aerial view 4k video!")
    expected = encoder.tokenizer(text)["input_ids"]
    assert TextEncoder(tmp_path).tokenizer(text)["input_ids"] == expected


def test_loading_leaves_transformers_logging_as_it_was(t5_dir: Path) -> None:
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    TextEncoder(t5_dir)
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


def test_importing_model_text_does_not_import_transformers() -> None:
    code = "import sys, model.text; print('transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# 3. Special tokens.
def test_special_tokens_round_through_fp16_to_fp32(tmp_path: Path) -> None:
    path = write_special_tokens(tmp_path / "st.npz", channels=C, seed=3)
    raw = np.load(path)
    assert raw["other_tokens"].dtype == np.float64 and raw["other_tokens"].shape == (100, C)
    loaded = SpecialTokens.load(path)
    assert loaded.other.dtype == torch.float32 and loaded.caption.shape == (1, C)
    expected = torch.from_numpy(raw["other_tokens"]).half().float()
    torch.testing.assert_close(loaded.other, expected, rtol=0, atol=0)
    assert 0.1 < float(loaded.other.std()) < 0.15


def test_special_tokens_with_a_missing_array_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, caption_token=np.zeros((1, C)))
    with pytest.raises(ValueError, match="logo_token"):
        SpecialTokens.load(path)


# 4. Per-chunk captions.
def test_chunk0_of_4_gets_duration_4_then_hq_in_front(tokens: SpecialTokens) -> None:
    prompt = fake_prompt(valid=10)
    out = chunk_caption(prompt, tokens, TextConditioning(), generated_index=0, generated_total=4)
    # k = min(4 - 0 - 1, 7) = 3 -> DURATION_4 -> other_tokens[10]
    assert torch.equal(out.embedding[0], tokens.other[10])
    assert torch.equal(out.embedding[1], tokens.other[SpecialToken.HQ])
    assert torch.equal(out.embedding[2:], prompt.embedding[:-2])
    assert out.mask.dtype == torch.float32  # the reference's promotion, kept
    assert out.mask.bool().tolist() == [True] * 12 + [False] * (CAPTION_TOKENS - 12)


@pytest.mark.parametrize(
    ("index", "total", "k"),
    [(0, 4, 3), (3, 4, 0), (0, 1, 0), (0, 20, 7), (12, 20, 7), (13, 20, 6), (5, None, 7)],
)
def test_duration_index_counts_remaining_chunks_capped_at_8(
    index: int, total: int | None, k: int
) -> None:
    assert duration_index(index, total) == k


def test_unbounded_session_chunks_get_duration_8(tokens: SpecialTokens) -> None:
    out = chunk_caption(fake_prompt(5), tokens, TextConditioning(), 1000, None)
    assert torch.equal(out.embedding[0], tokens.row(SpecialToken.DURATION_8)[0])


def test_duration_index_rejects_chunks_past_the_end() -> None:
    with pytest.raises(ValueError, match="past the last chunk"):
        duration_index(4, 4)


def test_two_prepends_drop_the_last_two_rows_and_a_full_prompt_loses_eos(
    tokens: SpecialTokens,
) -> None:
    prompt = fake_prompt(valid=CAPTION_TOKENS)  # 799 tokens + </s>
    out = chunk_caption(prompt, tokens, TextConditioning(), 0, 2)
    assert out.embedding.shape == (CAPTION_TOKENS, C)
    assert torch.equal(out.embedding[-1], prompt.embedding[-3])  # rows 798, 799 are gone
    assert out.num_tokens == CAPTION_TOKENS


def test_no_special_tokens_leave_caption_and_int64_mask_untouched(
    tokens: SpecialTokens,
) -> None:
    prompt = fake_prompt(valid=7)
    off = TextConditioning(pad_duration=False, pad_hq=False)
    out = chunk_caption(prompt, tokens, off, 0, 3)
    assert torch.equal(out.embedding, prompt.embedding) and out.mask.dtype == torch.int64


def test_enabled_tokens_are_prepended_in_reference_order(tokens: SpecialTokens) -> None:
    cond = TextConditioning(pad_static=True, pad_borderness=True, pad_three_d=True)
    out = chunk_caption(fake_prompt(3), tokens, cond, 2, 3)
    order = [SpecialToken.DURATION_1, SpecialToken.THREE_D, SpecialToken.HQ]
    order += [SpecialToken.BORDERNESS, SpecialToken.STATIC]
    for position, token in enumerate(order):
        assert torch.equal(out.embedding[position], tokens.other[token]), token.name
    assert torch.equal(out.embedding[5], fake_prompt(3).embedding[0])


def test_null_caption_shows_its_first_50_rows(tokens: SpecialTokens) -> None:
    null_embedding = torch.randn(CAPTION_TOKENS, C)
    null = null_caption(null_embedding)
    assert torch.equal(null.embedding, null_embedding)
    assert null.mask.bool().tolist() == [True] * 50 + [False] * (CAPTION_TOKENS - 50)
    assert null.mask.dtype == torch.float32  # float because the default cond prepends tokens
    assert null_caption(
        null_embedding, cond=TextConditioning(pad_hq=False, pad_duration=False)
    ).mask.dtype == (torch.int64)


def test_negative_prompt_puts_four_tokens_before_the_null_rows(tokens: SpecialTokens) -> None:
    null_embedding = torch.randn(CAPTION_TOKENS, C)
    null = null_caption(null_embedding, tokens, TextConditioning(neg_prompt=True))
    expected = [tokens.row(SpecialToken.BORDERNESS), tokens.row(SpecialToken.TRANS)]
    expected += [tokens.logo, tokens.caption, null_embedding[:-4]]
    assert torch.equal(null.embedding, torch.cat(expected))
    assert null.num_tokens == 50


def test_prompt_with_empty_mask_becomes_null_in_both_halves(tokens: SpecialTokens) -> None:
    null = null_caption(torch.randn(CAPTION_TOKENS, C))
    pair = chunk_captions(fake_prompt(valid=0), null, tokens, TextConditioning(), 0, 4)
    assert pair.prompt is null and pair.null is null
    pair = chunk_captions(fake_prompt(valid=1), null, tokens, TextConditioning(), 0, 4)
    assert pair.prompt.num_tokens == 3 and pair.null is null


def test_encoded_prompt_flows_through_chunk_captions_with_autograd_on(
    encoder: TextEncoder, tokens: SpecialTokens
) -> None:
    prompt = encoder.encode("a small robot walks along the river")
    assert not prompt.embedding.is_inference()
    null = null_caption(torch.zeros(CAPTION_TOKENS, C))
    pair = chunk_captions(prompt, null, tokens, TextConditioning(), 1, 3)
    weight = torch.ones(C, requires_grad=True)
    (pair.prompt.embedding[pair.prompt.mask.bool()] * weight).sum().backward()
    assert pair.prompt.num_tokens == prompt.num_tokens + 2
    assert torch.equal(pair.prompt.embedding[0], tokens.row(SpecialToken.DURATION_2)[0])


# 5. The T5 encoder (model/t5.py): bit-identical to transformers' T5EncoderModel in fp32 on
# the CPU, which is imported here only.
PROMPTS = (
    "A red cat jumps over the river at sunset.",
    "two green birds fly above the clouds, aerial view 4k video",
    "",  # </s> alone
    "the cat runs " * 400,  # truncated to 800: no padding at all
)


def test_t5_encoder_equals_transformers_on_the_tiny_folder(
    t5_dir: Path, encoder: TextEncoder
) -> None:
    from transformers import T5EncoderModel

    reference = T5EncoderModel.from_pretrained(t5_dir / T5_SUBFOLDER, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        out = encoder.encode(prompt)
        batch = encoder.tokenizer(
            [out.text],
            max_length=CAPTION_TOKENS,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            expected = reference(**batch).last_hidden_state[0]
        assert torch.equal(out.embedding, expected), prompt[:40]
        assert torch.equal(out.mask, batch["attention_mask"][0])


def _random_reference(seed: int):
    """A random T5 v1.1 encoder larger than the tiny one: 6 heads, 3 layers, and a short
    max_distance so that 40 tokens reach the log-spaced and the last bucket."""
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    config = HFConfig(
        vocab_size=300,
        d_model=96,
        d_kv=16,
        d_ff=160,
        num_layers=3,
        num_heads=6,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=24,
        feed_forward_proj="gated-gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def _padded_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, 300, (3, 40), generator=g, device="cpu")
    mask = torch.zeros(3, 40, dtype=torch.int64, device="cpu")
    for row, length in enumerate((40, 23, 1)):
        mask[row, :length] = 1
    return ids, mask


def test_t5_encoder_equals_transformers_on_a_larger_sharded_folder_with_padding(
    tmp_path: Path,
) -> None:
    reference = _random_reference(seed=5)
    reference.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_t5_encoder(tmp_path)
    ids, mask = _padded_batch()
    with torch.inference_mode():
        for rows in (slice(0, 3), slice(1, 2), slice(0, 1)):  # padded batch, one padded, none
            got = model(ids[rows], mask[rows]).last_hidden_state
            expected = reference(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
            assert torch.equal(got, expected), rows


def test_t5_encoder_reads_sharded_pytorch_bins_of_a_full_t5(tmp_path: Path) -> None:
    # google/t5-v1_1-xxl style: .bin shards, an index, decoder and lm_head keys to skip, and the
    # encoder's copy of the embedding beside `shared.weight`.
    reference = _random_reference(seed=6)
    reference.config.to_json_file(tmp_path / "config.json")
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["decoder.final_layer_norm.weight"] = torch.ones(96, device="cpu")
    state["lm_head.weight"] = torch.zeros(300, 96, device="cpu")
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[::2],
        "pytorch_model-00002-of-00002.bin": names[1::2],
    }
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_t5_encoder(tmp_path)
    ids, mask = _padded_batch()
    with torch.inference_mode():
        got = model(ids, mask).last_hidden_state
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feed_forward_proj": "relu"}, "feed_forward_proj 'relu' is not supported"),
        ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj 'gated-silu' is not supported"),
        ({"is_decoder": True}, "is_decoder"),
        ({"model_type": "mt5"}, "model_type 'mt5'"),
        ({"d_model": None}, r"missing \['d_model'\]"),
    ],
)
def test_t5_config_refuses_what_the_encoder_does_not_compute(
    t5_dir: Path, tmp_path: Path, change: dict, message: str
) -> None:
    raw = json.loads((t5_dir / T5_SUBFOLDER / "config.json").read_text())
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        T5Config.from_json(tmp_path / "config.json")


def test_t5_weights_missing_or_misshapen_are_named(t5_dir: Path, tmp_path: Path) -> None:
    shutil.copy(t5_dir / T5_SUBFOLDER / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors, model.safetensors.index"):
        load_t5_encoder(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "d_ff": raw["d_ff"] + 8}))
    shutil.copy(t5_dir / T5_SUBFOLDER / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="(?s)do not fit config.json.*wi_0"):
        load_t5_encoder(tmp_path)


def test_loading_the_encoder_imports_no_transformers_modeling_code(t5_dir: Path) -> None:
    code = (
        "import sys; from model.text import TextEncoder; TextEncoder(sys.argv[1]); "
        "print(sorted(m for m in ('transformers.modeling_utils', "
        "'transformers.models.t5.modeling_t5', 'torch._dynamo') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(t5_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"


def test_embeddings_are_cached_on_the_cache_device(t5_dir: Path, encoder: TextEncoder) -> None:
    # meta stands in for the DiT's GPU: the encoder runs on the CPU, results land elsewhere
    remote = TextEncoder(t5_dir, cache_device="meta", cache_size=2)
    out = remote.encode("a small cat")
    assert out.embedding.device.type == "meta" and out.mask.device.type == "meta"
    assert out.embedding.shape == (CAPTION_TOKENS, C) and out.mask.dtype == torch.int64
    assert remote.encode("a small cat") is out
    assert next(remote.model.parameters()).device.type == "cpu"
    assert encoder.encode("a small cat").embedding.device.type == "cpu"


def test_encoding_creates_every_tensor_on_a_stated_device(
    t5_dir: Path, encoder: TextEncoder
) -> None:
    fresh = TextEncoder(t5_dir, cache_size=0)
    with torch.device("meta"):  # a tensor made without device= would land on meta
        out = fresh.encode("three huge whales swim under the sea")
    assert not out.embedding.is_inference()
    assert torch.equal(
        out.embedding, encoder.encode("three huge whales swim under the sea").embedding
    )


@pytest.mark.parametrize(
    ("configured", "engine", "expected"),
    [
        ("cpu", "cpu", "cpu"),
        ("cuda", "cpu", "cpu"),  # a CPU engine keeps T5 on the CPU
        ("cpu", "cuda:1", "cpu"),  # the 4.5B configs: T5 on the host, the DiT on the GPU
        ("cuda", "cuda:1", "cuda:1"),  # the 24B configs: the rank's own GPU
        ("cuda:0", "cuda:1", "cuda:0"),  # an explicit index is kept
    ],
)
def test_t5_device_follows_the_config_on_the_engines_gpu(
    configured: str, engine: str, expected: str
) -> None:
    assert t5_device(configured, engine) == torch.device(expected)


def test_special_tokens_move_to_the_captions_device(tokens: SpecialTokens) -> None:
    moved = tokens.to("meta")
    assert {t.device.type for t in (moved.caption, moved.logo, moved.other)} == {"meta"}
    assert tokens.to("cpu").other is tokens.other  # no copy where they already are


@pytest.mark.parametrize(("d_model", "seed"), [(64, 0), (32, 3)])
def test_tiny_t5_weights_are_the_ones_transformers_draws(
    tmp_path: Path, d_model: int, seed: int
) -> None:
    # write_tiny_t5 replays T5EncoderModel(config)'s draws so existing folders keep their bytes
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    folder = write_tiny_t5(tmp_path, d_model=d_model, seed=seed)
    config = HFConfig.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expected = T5EncoderModel(config).state_dict()
    del expected["encoder.embed_tokens.weight"]  # tied to shared.weight
    written = load_t5_encoder(folder).state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in written)
