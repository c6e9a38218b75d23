"""The one tolerance table for comparing a kernel with reference.py.

TOLERANCES[dtype] is the default: the kernel does the reference's arithmetic in fp32 and rounds to
the storage dtype at the same points, so it may differ only through the order of fp32 reductions
(a sum of squares, a dot product). Such a difference moves a result across a rounding boundary of
the storage dtype at most once before the final rounding: two units in the last place (2 * eps,
relative), plus an atol of the same size for results near zero. fp32 outputs carry that fp32
reduction error itself, a few eps of fp32.

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
