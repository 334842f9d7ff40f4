"""One DiT training step of `python -m train` (forward + backward), timed on this machine.

The toy preset's DiT with random weights, batches of training examples exactly as
`train.toy.dit_example` builds them (random latents and captions stand in for the scenes). It
prints the median seconds per step and, as the in-run baseline, the median of a plain matmul
of the model's MLP shape over every token of the same batches, so figures from different
machines or runs compare as a ratio.

    .venv/bin/python bench/train_step.py               # 20 steps, batch 12, 2 threads
    .venv/bin/python bench/train_step.py --steps 5     # quick look

To compare two commits, run this file from each checkout (copy it into the older one).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import init_random_  # noqa: E402
from model.dit import VideoDiT  # noqa: E402
from model.text import SpecialTokens, TextEncoder, write_special_tokens  # noqa: E402
from model.tiny_t5 import write_tiny_t5  # noqa: E402
from train import toy as T  # noqa: E402


def examples(cfg: T.TrainConfig, captions: T.Captions, rng: np.random.Generator) -> list:
    rc = T.toy_config().runtime_config
    data = T.LatentSet(
        torch.from_numpy(rng.standard_normal((16, 16, 24, 8, 8), dtype=np.float32)),
        [("a red ball falls and bounces",) * 4] * 16,
        torch.from_numpy(rng.random((16, 24, 8, 8)) < 0.1),
    )
    return [T.dit_example(cfg, rc, rng, data, captions) for _ in range(cfg.dit_batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = T.TrainConfig(out=Path("."), dit_batch=args.batch)
    config = T.toy_config()
    dit = VideoDiT(config)
    init_random_(dit, seed=0)
    with_text = Path(__file__).resolve().parents[1] / ".cache" / "bench-train-step"
    d_model = config.model_config.caption_channels
    if not (with_text / "t5").is_dir():
        write_tiny_t5(with_text / "t5", d_model=d_model, seed=T.TEXT_SEED)  # training's, seed 0
        write_special_tokens(with_text / "tokens.npz", d_model, seed=T.TOKENS_SEED)
    captions = T.Captions(
        TextEncoder(with_text / "t5"),
        SpecialTokens.load(with_text / "tokens.npz"),
        dit.y_embedder.null_caption_embedding,
    )
    rng = np.random.default_rng(0)
    hidden = config.model_config.hidden_size
    fc1 = torch.randn(hidden, 4 * hidden)
    step_s, matmul_s, tokens = [], [], []
    for i in range(args.steps + 2):  # the first two warm up
        batch = examples(cfg, captions, rng)
        start = time.perf_counter()
        dit.zero_grad(set_to_none=True)
        T.dit_loss(dit, batch).backward()
        elapsed = time.perf_counter() - start
        n = sum(c.latent[0].numel() // 4 for g, _ in batch for c in g.chunks)  # 2x2 patches
        x = torch.randn(n, hidden)
        start = time.perf_counter()
        torch.mm(x, fc1)
        if i >= 2:
            matmul_s.append(time.perf_counter() - start)
            step_s.append(elapsed)
            tokens.append(n)
    step, matmul = statistics.median(step_s), statistics.median(matmul_s)
    print(
        f"# train step: toy DiT, batch {args.batch}, {statistics.median(tokens):.0f} tokens "
        f"(median), {args.steps} steps, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"step {step:.3f} s (median); fc1-shape matmul {matmul * 1e3:.1f} ms; "
        f"ratio {step / matmul:.1f}"
    )


if __name__ == "__main__":
    main()
