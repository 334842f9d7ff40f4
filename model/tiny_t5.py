"""A tiny random T5 encoder and its tokenizer, written to disk for the `tiny*` presets.

`write_random` (model/folder.py) puts one in every tiny model folder, including the ones the
server writes for `--model tiny`, and `python -m train` puts one in models/toy; tests and
bench/train_step.py write their own. Nothing in it is MAGI-1's: the real T5 is the official
folder. The tokenizer is a sentencepiece model trained offline on a built-in corpus, so writing
a folder needs no network and gives the same bytes on every machine.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import torch
from torch import Tensor

from model.t5 import T5Config
from model.text import T5_SUBFOLDER, _quiet_transformers

_SUBJECTS = tuple(
    """cat dog horse bird fox rabbit wolf bear deer owl eagle fish whale dolphin turtle frog
    lion tiger elephant giraffe monkey panda penguin squirrel mouse duck swan butterfly bee
    woman man girl boy child dancer runner cyclist skier surfer chef painter musician pilot
    astronaut robot knight wizard soldier farmer sailor car train boat ship plane truck bus
    bicycle balloon kite drone rocket lantern candle clock tree flower river ocean wave cloud
    storm mountain volcano waterfall glacier forest desert meadow village castle tower bridge
    city street market garden kitchen library station harbor island beach lake""".split()
)
_ADJECTIVES = tuple(
    """red blue green yellow orange purple pink white black golden silver gray brown small
    large tiny huge old young ancient modern bright dark misty foggy snowy rainy sunny windy
    calm quiet busy crowded empty wooden metal glass shiny soft fluffy wet dry warm cold happy
    sad curious sleepy playful elegant colorful vivid pale glowing rusty futuristic cozy wild
    gentle fierce slow fast distant nearby frozen burning floating hidden""".split()
)
_VERBS = tuple(
    """runs walks jumps flies swims dances sings sleeps eats drinks climbs falls spins rolls
    glides drifts crawls rides drives sails floats waves smiles laughs looks turns opens closes
    moves shakes bounces slides rises sinks chases follows carries throws catches paints plays
    reads writes builds explodes melts glows flickers shines burns grows blooms""".split()
)
_PLACES = tuple(
    """across the street|along the river|through the forest|over the mountains|under the bridge
    |on the beach|in the rain|in the snow|at night|at sunset|at dawn|in a small room|inside the
    castle|near the lake|around the corner|between the trees|on a busy road|in the city center|
    above the clouds|under the sea|in slow motion|in the distance|next to the window""".split("|")
)
_CAMERA = tuple(
    """the camera pans left|the camera pans right|the camera zooms in|the camera zooms out|
    close-up shot|wide shot|aerial view|tracking shot|handheld camera|static camera|cinematic
    lighting|soft light|high quality|4k video|shallow depth of field|time-lapse|golden hour|
    dramatic shadows|film grain|smooth motion""".split("|")
)


def _tiny_corpus(sentences: int = 6000) -> list[str]:
    """Deterministic lower-case English prompts (~400k chars), shaped like cleaned captions,
    with some digits and punctuation so those get pieces too."""
    rng = random.Random(0)  # fixed: the tokenizer must not depend on the model seed
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_ADJECTIVES), rng.choice(_SUBJECTS), rng.choice(_VERBS)]
        if rng.random() < 0.5:
            words.insert(0, rng.choice(("a", "the", "one", "two", "three", "many")))
        words.append(" ".join(rng.choice(_PLACES).split()))
        if rng.random() < 0.6:
            words.append(", " + " ".join(rng.choice(_CAMERA).split()))
        if rng.random() < 0.2:
            words.append(f"{rng.randint(0, 999)} {rng.choice(_SUBJECTS)}s")
        lines.append(" ".join(words).replace(" ,", ",") + rng.choice((".", "", "!", "?", ";")))
    return lines


def _train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,  # T5 id layout: pad 0, eos 1, unk 2, no bos
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_name="identity",  # the text is already cleaned; keeps the file small
        character_coverage=1.0,
        hard_vocab_limit=False,  # the corpus may support fewer pieces than asked
        num_threads=1,  # one thread: byte-identical output across machines
        minloglevel=2,
    )
    return buffer.getvalue()


def _random_weights(cfg: T5Config, seed: int) -> dict[str, Tensor]:
    """Random weights drawn in the order `transformers.T5EncoderModel(config)` (5.24) draws
    them under `manual_seed(seed)`, so folders keep the bytes they had when transformers wrote
    them, without importing its modeling code (~1.5 s) at every `--model tiny` start. Each
    tensor is drawn several times (construction, then two init passes); the last draw stays."""
    weights: dict[str, Tensor] = {}

    def draw(name: str, shape: tuple[int, int], std: float | None) -> None:
        t = torch.empty(shape, dtype=torch.float32, device="cpu")
        if std is None:  # nn.Linear's construction: kaiming_uniform_(a=sqrt(5))
            bound = 1.0 / math.sqrt(shape[1])
            weights[name] = t.uniform_(-bound, bound)
        else:
            weights[name] = t.normal_(0.0, std)

    d, inner, vocab = cfg.d_model, cfg.num_heads * cfg.d_kv, (cfg.vocab_size, cfg.d_model)
    bias = (cfg.relative_attention_num_buckets, cfg.num_heads)

    def attention(i: int) -> list[tuple[str, tuple[int, int], float]]:
        name = f"encoder.block.{i}.layer.0.SelfAttention."
        rows = [
            (name + "q.weight", (inner, d), (d * cfg.d_kv) ** -0.5),
            (name + "k.weight", (inner, d), d**-0.5),
            (name + "v.weight", (inner, d), d**-0.5),
            (name + "o.weight", (d, inner), inner**-0.5),
        ]
        return rows + [(name + "relative_attention_bias.weight", bias, d**-0.5)] * (i == 0)

    def ffn(i: int) -> list[tuple[str, tuple[int, int], float]]:
        name = f"encoder.block.{i}.layer.1.DenseReluDense."
        return [
            (name + "wi_0.weight", (cfg.d_ff, d), d**-0.5),
            (name + "wi_1.weight", (cfg.d_ff, d), d**-0.5),
            (name + "wo.weight", (d, cfg.d_ff), cfg.d_ff**-0.5),
        ]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # 1. construction: `shared` and the stack's own embedding, then each block's layers
        draw("shared.weight", vocab, 1.0)
        draw("shared.weight", vocab, 1.0)
        for i in range(cfg.num_layers):
            for name, shape, _ in attention(i):
                draw(name, shape, 1.0 if "relative" in name else None)
            for name, shape, _ in ffn(i):
                draw(name, shape, None)
        # 2. the stack's init: the embedding, then per layer a generic N(0, 1) and T5's stds
        draw("shared.weight", vocab, 1.0)
        for i in range(cfg.num_layers):
            for rows in (attention(i), ffn(i)):
                for name, shape, _ in rows:
                    draw(name, shape, 1.0)
                for name, shape, std in rows:
                    draw(name, shape, std)
        # 3. the model's init: `shared` twice more
        draw("shared.weight", vocab, 1.0)
        draw("shared.weight", vocab, 1.0)
    norms = [f"encoder.block.{i}.layer.{j}." for i in range(cfg.num_layers) for j in (0, 1)]
    for name in [*(n + "layer_norm.weight" for n in norms), "encoder.final_layer_norm.weight"]:
        weights[name] = torch.ones(d, dtype=torch.float32, device="cpu")
    return weights


def write_tiny_t5(
    folder: str | Path, d_model: int = 64, seed: int = 0, vocab_size: int = 1000
) -> Path:
    """Write a tiny random T5 v1.1-style encoder into `<folder>/t5-v1_1-xxl/` and return that path.

    The folder holds what the official one does (config.json, spiece.model) plus the weights as
    model.safetensors and the converted tokenizer (tokenizer.json, tokenizer_config.json), so
    `TextEncoder(folder)` exercises the real loading path. The tokenizer is trained offline on
    a built-in corpus and is the same for every seed (`vocab_size` sentencepiece pieces at most,
    plus T5's 100 `<extra_id_*>` tokens); the weights depend on `seed` only. Same arguments give
    byte-identical files. The caller's torch RNG state is left untouched.
    """
    from safetensors.torch import save_file
    from transformers import T5Config as HFConfig
    from transformers import T5Tokenizer

    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of the 4 heads, got {d_model}")
    out = Path(folder) / T5_SUBFOLDER
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(_train_sentencepiece(vocab_size))
    with _quiet_transformers():
        # from_pretrained(dir) reads spiece.model; T5Tokenizer(vocab_file=...) would ignore it.
        tokenizer = T5Tokenizer.from_pretrained(out, local_files_only=True)
        tokenizer.save_pretrained(out)
        config = HFConfig(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=d_model // 4,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu",  # tanh GELU, as T5 v1.1
            tie_word_embeddings=False,  # v1.1 unties them
        )
        # what T5EncoderModel.save_pretrained writes: the encoder's architecture and dtype
        config.architectures = ["T5EncoderModel"]
        config.is_encoder_decoder, config.use_cache, config.dtype = False, False, torch.float32
        config.save_pretrained(out)
    weights = _random_weights(T5Config.from_json(out / "config.json"), seed)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out
