"""The one tolerance table for comparing a kernel with reference.py.

TOLERANCES[dtype] is the default: the kernel does the reference's arithmetic in fp32 and rounds to
the storage dtype at the same points, so it may differ only through the order of fp32 reductions
(a sum of squares, a dot product). Such a difference moves a result across a rounding boundary of
the storage dtype at most once before the final rounding: two units in the last place (2 * eps,
relative), plus an atol of the same size for results near zero. fp32 outputs carry that fp32
reduction error itself, a few eps of fp32.

A dot product over K terms is bounded per element instead (dot_product_bound, used by linear):
the error of a reordered fp32 sum grows with K and with the sum of |terms|, not with the result,
which cancellation can make arbitrarily small.

An op whose kernel legitimately differs more (e.g. a long dot product, an online softmax, int4
dequantisation) adds an entry to OVERRIDES[op][dtype], with a comment saying why. Never loosen a
value to make a test pass: find the bug first.
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    # ~30 fp32 ulps (eps = 2^-23): reordered fp32 sums of up to ~5k terms, then exact
    # elementwise maths (rms_norm measured at most 5e-7 relative).
    torch.float32: {"atol": 1e-6, "rtol": 4e-6},
    # Two bf16 ulps (eps = 2^-7).
    torch.bfloat16: {"atol": 2 * 2**-7, "rtol": 2 * 2**-7},
    # Two fp16 ulps (eps = 2^-10).
    torch.float16: {"atol": 2 * 2**-10, "rtol": 2 * 2**-10},
}

# op name -> dtype -> {"atol", "rtol"}; each entry says why the default is not enough.
OVERRIDES: dict[str, dict[torch.dtype, dict[str, float]]] = {}


# Unit roundoff of fp32: a correctly rounded fp32 operation is off by at most this, relatively.
FP32_UNIT_ROUNDOFF = 2.0**-24


def dot_product_magnitude(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """S = |x| @ |weight|.T + |bias| in fp32 on the CPU: the sum of the magnitudes of the terms."""
    s = torch.matmul(x.detach().cpu().float().abs(), weight.detach().cpu().float().abs().t())
    return s if bias is None else s + bias.detach().cpu().float().abs()


def dot_product_bound(s: torch.Tensor, k: int, expected: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |kernel - reference| for y = round(x @ weight.T + bias), both sides
    accumulating in fp32 in any order and rounding once to expected.dtype; s is
    dot_product_magnitude(x, weight, bias) and k the length of the dot products.

    Any order of summing n = k + 1 terms (the products and the bias) in fp32 is within
    gamma_n * S of the exact sum, with gamma_n = n*u / (1 - n*u), u the fp32 unit roundoff and
    S = sum_k |x_k * w_k| + |b| (Higham, Accuracy and Stability of Numerical Algorithms, §3.1;
    the bf16 x bf16 / fp16 x fp16 products are exact in fp32). So the kernel's and the reference's
    fp32 values differ by at most 2 * gamma_n * S. Rounding both to a 16-bit dtype then adds at
    most one unit in the last place of the output (eps * |expected|, relatively, plus the
    subnormal spacing near zero); fp32 outputs are not rounded again.
    """
    n = k + 1
    bound = 2 * n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF) * s
    if expected.dtype != torch.float32:
        info = torch.finfo(expected.dtype)
        # |round(a) - round(b)| <= |a - b| + (ulp(a) + ulp(b)) / 2, and the spacing at v is at
        # most eps * |v|, or smallest_normal * eps below the normal range.
        ulp = (info.eps * (1 + info.eps) * expected.cpu().float().abs()
               + info.smallest_normal * info.eps)
        bound = bound * (1 + info.eps) + ulp
    return bound


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor,
                  msg: str = "") -> None:
    """|actual - expected| <= bound element by element (compared in fp32 on the CPU)."""
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, (
        f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    err = (actual.cpu().float() - expected.cpu().float()).abs()
    bad = ~(err <= bound)  # NaN in actual counts as a failure
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{msg}: {int(bad.sum())} of {bad.numel()} elements exceed the bound; first at flat "
            f"index {i}: actual {actual.flatten()[i].item()!r}, expected "
            f"{expected.flatten()[i].item()!r}, |diff| {err.flatten()[i].item():.3e} > bound "
            f"{bound.flatten()[i].item():.3e}")


def tolerance(dtype: torch.dtype, op: str | None = None) -> dict[str, float]:
    """{"atol", "rtol"} for comparing `op`'s kernel output of this dtype with the reference."""
    return OVERRIDES.get(op, {}).get(dtype, TOLERANCES[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, op: str | None = None,
                 msg: str = "") -> None:
    """actual ~= expected within the table's tolerance for expected.dtype (compared on the CPU)."""
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, (
        f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(),
                               **tolerance(expected.dtype, op),
                               msg=lambda m: f"{msg}: {m}" if msg else m)
