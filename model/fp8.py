"""fp8 (e4m3) linears of the `distill_quant` checkpoints (reference §7.5).

Weights are stored `(1, out, in)` float8_e4m3fn with float32 scales. Activations are quantised
the official way: divide by the input (or smooth) scale, clamp to ±448, round through bf16, then
to e4m3. The matmul then runs on dequantised values on CPU; on a GPU with fp8 tensor cores it
uses `torch._scaled_mm`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_E4M3 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_E4M3).max  # 448


def quantize_activation(x: Tensor, scale: Tensor) -> Tensor:
    """fp32 -> bf16 -> e4m3 after dividing by the scale (double rounding as the official)."""
    q = torch.clamp(x.float() / scale.float(), -_FP8_MAX, _FP8_MAX).to(torch.bfloat16)
    return q.to(_E4M3)


def _fp8_matmul(
    xq: Tensor, weight: Tensor, a_scale: Tensor, b_scale: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """xq (M, in) e4m3, weight (out, in) e4m3 -> (M, out) = (xq @ W^T) * a_scale * b_scale."""
    a_scale = a_scale.float().reshape(-1)[:1]  # cuBLASLt reads the A scale as a scalar
    b_scale = b_scale.float().reshape(-1)[:1]
    if xq.is_cuda and torch.cuda.get_device_capability(xq.device) >= (8, 9):
        return torch._scaled_mm(
            xq,
            weight.t(),
            scale_a=a_scale.reshape(()),
            scale_b=b_scale.reshape(()),
            out_dtype=out_dtype,
        )
    out = xq.float() @ weight.float().t()
    return (out * (a_scale * b_scale)).to(out_dtype)


class _Fp8Linear(nn.Module):
    """The e4m3 weight `(1, out, in)` with its scale, and the quantised matmul both kinds share;
    subclasses add their scale parameters and name the one activations are divided by."""

    divisor = "input_scale"  # the parameter activations are divided by before quantising

    def __init__(self, in_features: int, out_features: int, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.weight = nn.Parameter(
            torch.empty(1, out_features, in_features, dtype=_E4M3), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(1, dtype=torch.float32), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        xq = quantize_activation(x, getattr(self, self.divisor))
        out = _fp8_matmul(
            xq.reshape(-1, xq.shape[-1]),
            self.weight[0],
            self.input_scale,
            self.weight_scale,
            self.out_dtype,
        )
        return out.reshape(*x.shape[:-1], -1)


class PerTensorFp8Linear(_Fp8Linear):
    """`linear_qkv.{q,qx,k,v}` and `mlp.linear_fc1` in quantised layers."""

    def __init__(
        self, in_features: int, out_features: int, out_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__(in_features, out_features, out_dtype)
        self.input_scale = nn.Parameter(
            torch.empty(in_features, dtype=torch.float32), requires_grad=False
        )


class PerChannelFp8Linear(_Fp8Linear):
    """`self_attention.linear_proj` and `mlp.linear_fc2` in quantised layers (SmoothQuant style:
    the smooth scale already absorbs the activation scale)."""

    divisor = "smooth_scale"

    def __init__(
        self, in_features: int, out_features: int, out_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__(in_features, out_features, out_dtype)
        self.input_scale = nn.Parameter(torch.empty(1, dtype=torch.float32), requires_grad=False)
        self.smooth_scale = nn.Parameter(
            torch.empty(1, in_features, dtype=torch.float32), requires_grad=False
        )


def quantize_linear(linear: nn.Linear, per_channel: bool) -> nn.Module:
    """A random-weights fp8 twin of `linear` (for writing test checkpoints in the fp8 layout):
    per-output-tensor weight scale so the e4m3 range is used, unit activation scales."""
    out_f, in_f = linear.weight.shape
    module: PerTensorFp8Linear | PerChannelFp8Linear
    module = PerChannelFp8Linear(in_f, out_f) if per_channel else PerTensorFp8Linear(in_f, out_f)
    w = linear.weight.detach().float()
    scale = w.abs().max().clamp(min=1e-12) / _FP8_MAX
    module.weight.data = (w / scale).to(_E4M3).unsqueeze(0)
    module.weight_scale.data = scale.reshape(1)
    module.input_scale.data = torch.ones_like(module.input_scale)
    if per_channel:
        module.smooth_scale.data = torch.ones(1, in_f)
    return module
