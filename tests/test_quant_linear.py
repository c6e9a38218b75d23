"""quant_linear (int4_gemm / int8_gemm on the CPU) against the reference on the dequantized
weights, over the Qwen-1.8B shapes and awkward ones, both kernel paths, act-order weights.

The kernel quantizes each row of x to int8 per 128-input chunk (sx = max|x| / 127) and sums the
products exactly in int32, so its error against fp32 maths on the dequantized weight W is the
activation rounding, at most sx / 2 per element: |y - x.W^T| <= sum_k |W[n, k]| * sx(k) / 2 =: B.
That is a bound, not an estimate: each case must lie within B (plus fp32 rounding of the
sums, 1e-5 of the sum of |terms|) and, to show the bound is not vacuous, the typical error is
checked to be well below it.
"""
from __future__ import annotations

import pytest
import torch

from qwen_fast import ops, reference
from qwen_fast.qweight import CHUNK, QuantWeight
from kernel_cases import case_generator

pytestmark = pytest.mark.usefixtures("require_extension")

ISAS = ["avx512_vnni", "avx2", "scalar"]

# (id, N, K, M): Qwen-1.8B's projections at decode (1, 4) and a prefill chunk, then awkward
# sizes (K not a multiple of 128: a padded last chunk; N not a multiple of the 16-output tiles).
SHAPES = [
    ("c_attn_1", 6144, 2048, 1), ("w1_4", 5504, 2048, 4), ("c_proj_1", 2048, 5504, 1),
    ("c_proj_16", 2048, 5504, 16), ("c_attn_prefill_37", 6144, 2048, 37),
    ("odd_37x300x3", 37, 300, 3), ("one_row_1x128x1", 1, 128, 1), ("tiny_k_5x7x2", 5, 7, 2),
    ("rows_17x256x17", 17, 256, 17),
]


def _components(N, K, bits, g, group=128):
    G = 1 if group == -1 else -(-K // group)
    q = torch.randint(0, 2 ** bits, (N, K), generator=g)
    zeros = torch.randint(1, 2 ** bits + 1, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 1e-3).half()
    g_idx = torch.zeros(K, dtype=torch.int64) if group == -1 else torch.arange(K) // group
    return q, zeros, scales, g_idx


def _check(y, x, W, bias=None):
    """y within the activation-rounding bound of x.W^T (+ bias) in fp32."""
    xf, Wf = x.float().reshape(-1, x.shape[-1]), W.float()
    M, K = xf.shape
    C = -(-K // CHUNK)
    sx = torch.nn.functional.pad(xf, (0, C * CHUNK - K)).view(M, C, CHUNK).abs().amax(-1) / 127
    sx_k = torch.repeat_interleave(sx, CHUNK, dim=1)[:, :K]                 # [M, K]
    want = xf @ Wf.t() + (0 if bias is None else bias.float())
    bound = sx_k @ Wf.abs().t() / 2 + 1e-5 * (xf.abs() @ Wf.abs().t())
    # the output's own rounding to its dtype
    bound = bound + want.abs() * (torch.finfo(y.dtype).eps if y.dtype != torch.float32 else 0)
    err = (y.float().reshape(M, -1) - want).abs()
    assert bool((err <= bound * 1.0001 + 1e-30).all()), float((err / bound).max())
    return err, bound


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("N,K,M", [pytest.param(*s[1:], id=s[0]) for s in SHAPES])
def test_quant_linear_within_the_activation_rounding_bound(request, N, K, M, bits, isa):
    g = case_generator(request)
    q, zeros, scales, g_idx = _components(N, K, bits, g)
    w = QuantWeight.from_components(q, zeros, scales, g_idx, bits)
    W = w.dequantize()
    # the layout keeps exactly the GPTQ dequantization s * (q - z)
    assert torch.equal(W, scales.float()[g_idx].t() * (q.float() - zeros.float()[g_idx].t()))
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(M, K, generator=g).to(dtype)
        y = ops.quant_linear(x, w, isa=isa)
        assert y.shape == (M, N) and y.dtype == dtype
        err, bound = _check(y, x, W)
        if K >= CHUNK:     # rounding errors of random sign: far below the worst case
            assert float(err.mean()) < 0.25 * float(bound.mean())


def test_both_paths_agree_and_bias_and_batch_dims():
    g = torch.Generator().manual_seed(0)
    q, zeros, scales, g_idx = _components(96, 384, 4, g)
    w = QuantWeight.from_components(q, zeros, scales, g_idx, 4)
    x = torch.randn(2, 3, 384, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    ys = [ops.quant_linear(x, w, b, isa=isa) for isa in ISAS if isa in ops._C.quant_linear_isas()]
    assert ys[0].shape == (2, 3, 96)
    # the same integer sums, scaled in another order: equal to fp32 rounding, then bf16
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-2, atol=1e-2)
    _check(ys[0], x, w.dequantize(), b)
    ref = ops.quant_linear(x, w, b, backend="reference")
    assert torch.equal(ref, reference.linear(x, w.dequantize(torch.bfloat16), b))
    # ops.linear dispatches on the weight's type
    assert torch.equal(ops.linear(x, w, b), ys[0])


@pytest.mark.parametrize("group", [256, -1])
def test_group_sizes_of_whole_chunks(group):
    g = torch.Generator().manual_seed(1)
    q, zeros, scales, g_idx = _components(40, 512, 4, g, group)
    w = QuantWeight.from_components(q, zeros, scales, g_idx, 4)
    assert torch.equal(w.dequantize(), scales.float()[g_idx].t() * (q.float() - zeros.float()[g_idx].t()))
    x = torch.randn(2, 512, generator=g)
    _check(ops.quant_linear(x, w), x, w.dequantize())


def test_act_order_weights_are_permuted_not_refused():
    """desc_act checkpoints: g_idx is a permutation of the groups; the layout sorts the inputs
    by group and the kernel gathers x through perm."""
    g = torch.Generator().manual_seed(2)
    N, K = 48, 512
    q, zeros, scales, _ = _components(N, K, 4, g)
    g_idx = (torch.arange(K) // 128)[torch.randperm(K, generator=g)]
    w = QuantWeight.from_components(q, zeros, scales, g_idx, 4)
    assert w.perm is not None
    W = scales.float()[g_idx].t() * (q.float() - zeros.float()[g_idx].t())
    assert torch.equal(w.dequantize(), W)
    x = torch.randn(3, K, generator=g)
    for isa in ISAS:
        _check(ops.quant_linear(x, w, isa=isa), x, W)


def test_groups_that_split_a_chunk_are_refused():
    g = torch.Generator().manual_seed(3)
    q, zeros, scales, g_idx = _components(8, 256, 4, g, group=64)
    with pytest.raises(ValueError, match=r"groups of whole 128-input chunks .* hold \[64\] inputs"):
        QuantWeight.from_components(q, zeros, scales, g_idx, 4)


def test_bad_arguments_are_named():
    g = torch.Generator().manual_seed(4)
    w = QuantWeight.from_components(*_components(8, 256, 4, g), 4)
    x = torch.randn(2, 256)
    with pytest.raises(RuntimeError, match=r"the weight has in_features = 256, x has 255"):
        ops._C.quant_linear(torch.randn(2, 255), w.data, 4, 256, 8)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous CPU torch.uint8 tensor "
                                           r"\[1, 2304\] \(the kernel layout of 8 4-bit outputs"):
        ops._C.quant_linear(x, w.data[:, :100], 4, 256, 8)
    with pytest.raises(RuntimeError, match=r"weight must be .* \[2, 2304\]"):
        ops._C.quant_linear(x, w.data, 4, 256, 17)
    with pytest.raises(RuntimeError, match=r"bits must be 4 or 8, got 3"):
        ops._C.quant_linear(x, w.data, 3, 256, 8)
    with pytest.raises(RuntimeError, match=r"out_features must be >= 1, got 0"):
        ops._C.quant_linear(x, w.data, 4, 256, 0)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[8\]"):
        ops._C.quant_linear(x, w.data, 4, 256, 8, torch.zeros(9))
    with pytest.raises(RuntimeError, match=r"perm values must lie in \[0, 256\)"):
        ops._C.quant_linear(x, w.data, 4, 256, 8, None, torch.full((256,), 300))
    with pytest.raises(RuntimeError, match=r'isa must be "auto", "avx512_vnni", "avx2" or "scalar", got "avx"'):
        ops._C.quant_linear(x, w.data, 4, 256, 8, isa="avx")
    with pytest.raises(ValueError, match=r"data must be a uint8 tensor \[1, 2304\] for 8 4-bit outputs"):
        QuantWeight(w.data[:, :10], 4, 256, 8)
