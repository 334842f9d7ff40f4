"""RoPE placement (reference §3.7) and the fp8 linears (§7.5)."""

from __future__ import annotations

import math

import torch

from model.config import get_preset
from model.dit import ChunkGroup, ChunkInput, RotaryEmbedding
from model.folder import load_model, write_random
from model.fp8 import PerChannelFp8Linear, PerTensorFp8Linear, quantize_linear


def rope(bands: int = 16) -> RotaryEmbedding:
    r = RotaryEmbedding(get_preset("4.5B_base").model_config)
    with torch.no_grad():
        r.bands.copy_(1.0 / 10000 ** (torch.arange(bands) / bands))
    return r


def test_time_coordinate_is_the_global_latent_frame_index():
    r = rope()
    # chunk 3 of a forward whose grid spans 4 chunks (24 latent frames), 45x45 patches (720x720)
    table = r.table(range(18, 24), 24, 45, 45)
    assert table.shape == (6 * 45 * 45, 96)
    sin_t = table[:, :16]  # sin of p_t * bands for the first token of each frame
    first_of_frame = sin_t[:: 45 * 45]
    for i, frame in enumerate(range(18, 24)):
        assert torch.allclose(first_of_frame[i], torch.sin(frame * r.bands.detach()), atol=1e-5)


def test_spatial_coordinates_are_centred_and_rescaled_to_a_16x16_area():
    r = rope()
    with torch.no_grad():
        r.bands.fill_(1.0)
    table = r.table(range(0, 1), 6, 45, 80)  # 1280x720: rho = 3.75
    angles = torch.asin(
        table[:, :48].clamp(-1, 1)
    )  # bands = 1: angle = coordinate (|x| < pi/2 only)
    sin_h = table[:, 16].reshape(45, 80)[:, 0]
    rho = math.sqrt(45 * 80 / 256)
    ph = (torch.arange(45, dtype=torch.float32) - 22) / 44 * (45 / rho - 1)
    assert torch.allclose(sin_h, torch.sin(ph), atol=1e-6)
    assert abs(float(ph[0]) + 5.5) < 1e-5  # p_h spans -5.5 .. 5.5 as the reference states
    assert angles.shape == (45 * 80, 48)


def test_time_axis_uses_the_fp32_divide_then_multiply_rescale():
    """x / (f - 1) * (f - 1) in fp32 is not always x: the official code does it, so do we."""
    frames = 14
    x = torch.arange(frames, dtype=torch.float32)
    official = x / (frames - 1) * (frames - 1)
    assert not torch.equal(official, x)  # the quirk exists for this length
    r = rope()
    with torch.no_grad():
        r.bands.fill_(1.0)
    table = r.table(range(0, frames), frames, 1, 1)  # one patch per frame: rows = frames
    assert torch.equal(table[:, 0], torch.sin(official))


def test_uncond_chunk_placed_at_frames_0_to_5_differs_from_its_true_position():
    r = rope()
    at_zero = r.table(range(0, 6), 6, 4, 4)
    at_true = r.table(range(12, 18), 30, 4, 4)
    assert not torch.allclose(at_zero, at_true)


def test_per_tensor_fp8_linear_quantises_activations_through_bf16_then_e4m3():
    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(16, 32, generator=gen))
    fp8 = quantize_linear(dense, per_channel=False)
    with torch.no_grad():
        fp8.input_scale.fill_(0.05)
    x = torch.randn(5, 32, generator=gen)
    xq = torch.clamp(x / 0.05, -448, 448).to(torch.bfloat16).to(torch.float8_e4m3fn)
    w = fp8.weight[0].float()
    want = ((xq.float() @ w.T) * 0.05 * fp8.weight_scale).to(torch.bfloat16)
    assert torch.equal(fp8(x), want)
    # and it approximates the dense layer to e4m3 precision
    assert float((fp8(x).float() - dense(x)).norm() / dense(x).norm()) < 0.1


def test_per_channel_fp8_linear_divides_by_the_smooth_scale():
    gen = torch.Generator().manual_seed(1)
    layer = PerChannelFp8Linear(8, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1, 4, 8, generator=gen).to(torch.float8_e4m3fn))
        layer.weight_scale.fill_(0.5)
        layer.input_scale.fill_(2.0)
        layer.smooth_scale.copy_(torch.rand(1, 8, generator=gen) + 0.5)
    x = torch.randn(3, 8, generator=gen)
    xq = torch.clamp(x / layer.smooth_scale, -448, 448).to(torch.bfloat16).to(torch.float8_e4m3fn)
    want = ((xq.float() @ layer.weight[0].float().T) * 1.0).to(torch.bfloat16)
    assert torch.equal(layer(x), want)
    assert isinstance(PerTensorFp8Linear(8, 4).weight, torch.nn.Parameter)


def test_fp8_folder_loads_strictly_and_runs(tmp_path):
    folder = write_random("tiny_distill_quant", tmp_path / "q", seed=0)
    model = load_model(folder)
    layers = model.dit.videodit_blocks.layers
    assert layers[0].mlp.linear_fc1.weight.dtype == torch.float32
    assert layers[-1].mlp.linear_fc1.weight.dtype == torch.float32
    assert layers[1].mlp.linear_fc1.weight.dtype == torch.float8_e4m3fn
    assert layers[1].self_attention.linear_proj.smooth_scale.shape == (1, 256)
    assert (folder / "inference_weight.fp8.distill").is_dir()
    gen = torch.Generator().manual_seed(0)
    chunk = ChunkInput(
        torch.randn(16, 6, 8, 8, generator=gen),
        0.3,
        torch.randn(4, 64, generator=gen),
        False,
        0,
        6,
        (0, 96),
        step_size=4.0,
    )
    out = model.dit([ChunkGroup([chunk])])[0][0]
    assert out.shape == (16, 6, 8, 8) and torch.isfinite(out).all()
