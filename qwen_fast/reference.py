"""PyTorch reference of every op: the spec that kernels and tests are measured against.

Each function states where rounding happens, because that is where Qwen's release
semantics live (see qwen-spec.md §4). Inputs may be bf16, fp16 or fp32; the maths runs
in fp32 and rounds to the input dtype at exactly the points the release does.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Qwen RMSNorm over the last dim.

    y = (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype) * weight

    The normalised value is rounded to x.dtype *before* the multiply by the weight, and the
    product is computed in x.dtype (one more rounding), exactly as the release's pure-torch path.
    """
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: h = residual + x (rounded to the dtype), returns (rms_norm(h), h).

    This is `h = h + attn(a); m = RMSNorm_2(h)` of a Qwen block in one pass.
    """
    h = residual + x
    return rms_norm(h, weight, eps), h
