"""attention: the CPU kernel against reference.attention over dtypes, decode and prefill shapes
(Qwen-1.8B: 16 heads of 128), per-sequence cached lengths and strided views of the cache.

The design's rule for attention: the kernel's largest error against an fp32 reference is at
most twice that of the reference itself computed in the same low dtype (there, only the final
rounding). fp32 outputs use the tolerance table (the online softmax reorders fp32 sums).
16-bit outputs must also be bit-identical to the reference in almost every element.
"""
from __future__ import annotations

import pytest
import torch

from qwen_fast import ops, reference
from kernel_cases import DTYPES, case_generator
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason=f"qwen_fast._C not built: {ops.IMPORT_ERROR}")


# (id, B, T, H, D, capacity S of the cache view, start per sequence)
CASES = [
    ("decode_1x16x128_at_127", 1, 1, 16, 128, 128, [127]),
    ("decode_1x16x128_at_2047", 1, 1, 16, 128, 2048, [2047]),
    ("decode_batch_own_lengths", 4, 1, 16, 128, 300, [0, 299, 17, 150]),
    ("prefill_128", 1, 128, 16, 128, 128, [0]),
    ("prefill_chunk_after_100", 2, 37, 16, 128, 137, [100, 60]),   # bottom-right aligned
    ("awkward_3_heads_d7", 3, 5, 3, 7, 83, [0, 40, 78]),
    ("one_key", 1, 1, 2, 16, 1, [0]),
    ("d256", 1, 3, 2, 256, 9, [6]),
]
PARAMS = [pytest.param(*c[1:], id=c[0]) for c in CASES]


def _inputs(B, T, H, D, S, dtype, g):
    """q as the model makes it (a view of a fused qkv projection) and k, v as views of a
    larger cache: none of the three is contiguous."""
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(dtype)
    q = qkv.unbind(2)[0]
    cache = torch.randn(2, B, S + 5, H, D, generator=g).to(dtype)
    return q, cache[0, :, :S], cache[1, :, :S]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D,S,start", PARAMS)
def test_attention_matches_reference(request, dtype, B, T, H, D, S, start):
    q, k, v = _inputs(B, T, H, D, S, dtype, case_generator(request))
    st = torch.tensor(start)
    got = ops.attention(q, k, v, st)
    assert got.shape == (B, T, H, D) and got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:
        assert_close(got, reference.attention(q, k, v, st), "attention")
        return
    exact = reference.attention(q.float(), k.float(), v.float(), st)
    rounded = reference.attention(q, k, v, st)
    err_kernel = (got.float() - exact).abs().max().item()
    err_ref = (rounded.float() - exact).abs().max().item()
    assert err_kernel <= 2 * err_ref + 1e-7, (err_kernel, err_ref)
    assert (got == rounded).float().mean().item() >= 0.99


def test_attention_backend_reference_and_default_scale(request):
    q, k, v = _inputs(1, 2, 2, 16, 5, torch.float32, case_generator(request))
    st = torch.tensor([3])
    assert torch.equal(ops.attention(q, k, v, st, backend="reference"),
                       reference.attention(q, k, v, st))
    assert_close(ops.attention(q, k, v, st, scale=0.3), reference.attention(q, k, v, st, 0.3))


@pytest.mark.parametrize("change,msg", [
    (lambda q, k, v, s: (q[0], k, v, s), r"q must have shape \[batch, tokens, heads, head_dim\]"),
    (lambda q, k, v, s: (q, k[:, :, :1], v, s), r"k must have shape \[2, cached, 4, 16\]"),
    (lambda q, k, v, s: (q, k, v.double(), s), "v must have dtype torch.float32"),
    (lambda q, k, v, s: (q, k, v[:, :3], s), "k and v must hold the same number of positions"),
    (lambda q, k, v, s: (q, k, v, s.int()), r"start must be a CPU torch.int64 tensor of shape \[2\]"),
    (lambda q, k, v, s: (q, k, v, s[:1]), r"start must be a CPU torch.int64 tensor of shape \[2\]"),
    (lambda q, k, v, s: (q, k, v, -s), "start must be >= 0"),
    (lambda q, k, v, s: (q, k.transpose(2, 3), v, s), "k must have"),
])
def test_attention_argument_errors(change, msg):
    q = torch.randn(2, 3, 4, 16)
    k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 4, 16)
    with pytest.raises(RuntimeError, match=msg):
        ops._C.attention(*change(q, k, v, torch.tensor([1, 2])), 0.25)
