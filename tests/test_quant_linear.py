"""quant_linear (int4_gemm / int8_gemm) against the reference on the dequantized weights, over the
Qwen-1.8B shapes and awkward ones, every CPU kernel path, act-order weights; the CUDA kernel on a
GPU (marked gpu) and, on small shapes, in the SIMT emulator (marked simt).

The CPU kernel quantizes each row of x to int8 per 128-input chunk (sx = max|x| / 127) and sums the
products exactly in int32, so its error against fp32 maths on the dequantized weight W is the
activation rounding, at most sx / 2 per element: |y - x.W^T| <= sum_k |W[n, k]| * sx(k) / 2 =: B.
That is a bound, not an estimate: each case must lie within B (plus fp32 rounding of the
sums, 1e-5 of the sum of |terms|) and, to show the bound is not vacuous, the typical error is
checked to be well below it.

The CUDA kernel does not quantize x: up to 16 rows it does fp32 maths on the exactly dequantized
weights (QuantWeight.dequantize() in fp32) and rounds once, so it is held to test_linear's checks
(tolerances.dot_product_bound, and 16-bit outputs mostly bit-identical) against reference.linear
on those weights. Beyond 16 rows it dequantizes the weights to x.dtype and runs torch's GEMM: the
spec there is reference.linear on QuantWeight.dequantize(x.dtype), as the reference backend.
"""
from __future__ import annotations

import functools

import pytest
import torch

from qwen_fast import ops, reference
from qwen_fast.qweight import CHUNK, QuantWeight
from kernel_cases import DTYPES, case_generator, devices, kernel_op, tensor_device
from test_linear import check_linear
import simt_ops

pytestmark = pytest.mark.usefixtures("require_extension")

ISAS = ["avx512_vnni", "avx2", "scalar"]

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA GPU, a CUDA build of torch and qwen_fast._C built with nvcc "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
                    f"_C cuda={ops.build_info()['cuda']})")
# Rows of x up to which ops.quant_linear runs our GEMV on CUDA tensors (csrc/ops/linear.cpp).
CUDA_GEMV_MAX_ROWS = 16
# The CUDA kernel's devices: the GPU, and the emulator (the CPU kernel has its own bound, above).
GPU_KERNEL_DEVICES = [p for p in devices(CUDA_READY, CUDA_SKIP_REASON, simt=True)
                      if p.values[0] != "cpu"]

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
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous torch.uint8 tensor "
                                           r"\[1, 2144\] \(the kernel layout of 8 4-bit outputs"):
        ops._C.quant_linear(x, w.data[:, :100], 4, 256, 8)
    with pytest.raises(RuntimeError, match=r"weight must be .* \[2, 2144\]"):
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
    with pytest.raises(ValueError, match=r"data must be a uint8 tensor \[1, 2144\] for 8 4-bit outputs"):
        QuantWeight(w.data[:, :10], 4, 256, 8)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 40])   # decode (one panel, shared work counter), prefill
def test_pair_gives_quant_linears_bits(bits, dtype, M):
    """quant_linear_pair (the MLP's w1 and w2 in one pass) against two quant_linear calls: the
    same bits, with the threads' blocks spanning both weights (sizes not multiples of 16, and
    enough tiles that both threads take several blocks of each)."""
    g = torch.Generator().manual_seed(11)
    w1 = QuantWeight.quantize(torch.randn(1000, 384, generator=g) * 0.05, bits)
    w2 = QuantWeight.quantize(torch.randn(536, 384, generator=g) * 0.05, bits)
    x = torch.randn(M, 384, generator=g).to(dtype)
    o1, o2 = torch.full((M, 1000), float("nan"), dtype=dtype), torch.full((M, 536), float("nan"), dtype=dtype)
    ops._C.quant_linear_pair(x, w1.data, w2.data, bits, 1000, 536, o1, o2)
    assert torch.equal(o1, ops._C.quant_linear(x, w1.data, bits, 384, 1000))
    assert torch.equal(o2, ops._C.quant_linear(x, w2.data, bits, 384, 536))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_vector_activation_quantization_is_the_scalar_loops(dtype):
    """Without perm, the AVX-512 path quantizes x with vector code; with perm (the identity
    here) it runs the scalar loop. The tiles and the epilogue are the same, so the outputs must
    be equal bit for bit: over a partial last chunk, a zero row, huge and tiny values, inf."""
    if "avx512_vnni" not in ops._C.quant_linear_isas():
        pytest.skip("this CPU has no AVX-512 VNNI path")
    g = torch.Generator().manual_seed(13)
    K = 264                                              # two chunks and 8 inputs
    w = QuantWeight.quantize(torch.randn(48, K, generator=g) * 0.05, 4)
    big = 6e4 if dtype == torch.float16 else 1e30
    x = torch.randn(6, K, generator=g) * torch.tensor([[1.0], [0.0], [big], [1e-6], [3.0], [1.0]])
    x[4, 7] = float("inf")                               # its chunk: NaN outputs in both
    x[5, 200:] = 0.0                                     # an all-zero partial chunk
    x = x.to(dtype)
    ident = torch.arange(K)
    for m in (1, 6):
        a = ops._C.quant_linear(x[:m], w.data, 4, K, 48, isa="avx512_vnni")
        b = ops._C.quant_linear(x[:m], w.data, 4, K, 48, None, ident, isa="avx512_vnni")
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_pair_bad_arguments_are_named():
    g = torch.Generator().manual_seed(12)
    w1 = QuantWeight.quantize(torch.randn(32, 256, generator=g), 4)
    w2 = QuantWeight.quantize(torch.randn(16, 256, generator=g), 4)
    x, o1, o2 = torch.randn(2, 256), torch.empty(2, 32), torch.empty(2, 16)
    with pytest.raises(RuntimeError, match=r"w2 must be a contiguous torch.uint8 tensor \[2, 2144\]"):
        ops._C.quant_linear_pair(x, w1.data, w2.data, 4, 32, 32, o1, torch.empty(2, 32))
    with pytest.raises(RuntimeError, match=r"out2 must be a contiguous torch.float32 CPU tensor \[\.\.\., 16\]"):
        ops._C.quant_linear_pair(x, w1.data, w2.data, 4, 32, 16, o1, torch.empty(2, 16).bfloat16())
    with pytest.raises(RuntimeError, match=r"out1 must be .* with x's leading dims, got torch.float32 \[3, 32\]"):
        ops._C.quant_linear_pair(x, w1.data, w2.data, 4, 32, 16, torch.empty(3, 32), o2)
    with pytest.raises(RuntimeError, match=r"bits must be 4 or 8, got 5"):
        ops._C.quant_linear_pair(x, w1.data, w2.data, 5, 32, 16, o1, o2)


@pytest.mark.parametrize("bits", [4, 8])
def test_record_holds_fp16_scales_and_integer_zeros(bits):
    """The record keeps GPTQ's fp16 scales and integer zeros (up to 2^bits: GPTQ v1's real zeros)
    and gives them back exactly; values it could not hold are refused, naming what was wrong."""
    g = torch.Generator().manual_seed(14)
    q, zeros, scales, g_idx = _components(32, 256, bits, g)
    zeros[0, :3] = torch.tensor([0, 2 ** bits, 1])
    w = QuantWeight.from_components(q, zeros, scales, g_idx, bits)
    assert w.data.shape[1] == 2 * (16 * 128 * bits // 8 + 32 + 16 * (1 if bits == 4 else 2))
    q2, s, sz = w.components()
    assert torch.equal(q2, q.to(torch.uint8)) and torch.equal(s, scales.float().t()[:, [0, 1]])
    assert torch.equal(sz, (scales.float() * zeros.float()).t()[:, [0, 1]])
    with pytest.raises(ValueError, match=r"scales must be fp16 values"):
        QuantWeight.from_components(q, zeros, scales.float() * (1 + 2 ** -20), g_idx, bits)
    bad = zeros.clone()
    bad[1, 5] = -1
    with pytest.raises(ValueError, match=r"zeros must be integers in \[0, \d+\] for \d-bit weights, got values in \[-1"):
        QuantWeight.from_components(q, bad, scales, g_idx, bits)
    with pytest.raises(ValueError, match=r"zeros must be integers, got \[2.5\]"):
        QuantWeight.from_components(q, zeros.float().index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(2.5)), scales, g_idx, bits)


def test_to_moves_data_and_perm():
    g = torch.Generator().manual_seed(5)
    q, zeros, scales, _ = _components(16, 256, 4, g)
    g_idx = (torch.arange(256) // 128)[torch.randperm(256, generator=g)]
    w = QuantWeight.from_components(q, zeros, scales, g_idx, 4)
    m = w.to("meta")
    assert isinstance(m, QuantWeight) and m is not w and m.device.type == "meta"
    assert m.perm.device.type == "meta" and w.device.type == "cpu"
    assert (m.bits, m.in_features, m.out_features) == (4, 256, 16)
    with pytest.raises(RuntimeError, match=r"quant_linear: weight must be on cpu \(the device of x\), "
                                           r"got meta"):
        ops._C.quant_linear(torch.randn(2, 256), m.data, 4, 256, 16)
    with pytest.raises(RuntimeError, match=r"quant_linear: perm must be on cpu \(the device of x\), "
                                           r"got meta"):
        ops._C.quant_linear(torch.randn(2, 256), w.data, 4, 256, 16, None, m.perm)


# ---- the CUDA kernel ------------------------------------------------------------------------

def _gpu_kernel_expected_weight(w: QuantWeight, device: str, rows: int, dtype) -> torch.Tensor:
    """The dense weight the CUDA path's result is the spec's on: fp32 for our GEMV (the emulator
    runs it for any number of rows), x's dtype for the dequantize + GEMM path beyond 16 rows."""
    prefill = device == "cuda" and rows > CUDA_GEMV_MAX_ROWS
    return w.dequantize(dtype if prefill else torch.float32)


def _act_order_g_idx(K, g):
    return (torch.arange(K) // CHUNK)[torch.randperm(K, generator=g)]


def _x_laid_out(m, k, layout, dtype, g):
    if layout == "contiguous":
        return torch.randn(m, k, generator=g).to(dtype)
    if layout == "strided":              # x[:, :k] of a wider buffer: aligned rows
        return torch.randn(m, k + 64, generator=g).to(dtype)[:, :k]
    if layout == "strided_offset":       # rows starting 3 elements in: unaligned
        return torch.randn(m, k + 100, generator=g).to(dtype)[:, 3:3 + k]
    raise ValueError(layout)


def _on(x, device):
    """x on device as the same (possibly strided) view."""
    base = x if x._base is None else x._base
    return base.to(device).as_strided(x.shape, x.stride(), x.storage_offset())


# (id, N, K, act order, layout of x, with bias). The kernel reads x as 4-element vectors when
# there is no perm, K and the row stride are multiples of 4 and x is aligned; else one by one.
SMALL_CASES = [
    pytest.param(48, 256, False, "contiguous", True, id="48x256_bias"),
    pytest.param(48, 256, False, "strided", False, id="48x256_strided"),
    pytest.param(48, 256, False, "strided_offset", True, id="48x256_bias_at_3"),  # scalar x
    pytest.param(37, 300, False, "contiguous", False, id="37x300"),  # padded chunk, partial tile
    pytest.param(37, 301, False, "contiguous", True, id="37x301_bias"),  # K % 4 != 0: scalar x
    pytest.param(48, 384, True, "contiguous", True, id="48x384_act_order_bias"),
    pytest.param(37, 300, True, "strided", False, id="37x300_act_order_strided"),
]
# 1, 3 (a 4-row panel with a missing row), 16, and 19: two panels in the emulator, the
# dequantize + GEMM path on a GPU.
SMALL_ROWS = [1, 3, 16, 19]


@pytest.mark.parametrize("n,k,act_order,layout,has_bias", SMALL_CASES)
@pytest.mark.parametrize("m", SMALL_ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("device", GPU_KERNEL_DEVICES)
def test_gpu_kernel_small_shapes(device, bits, dtype, m, n, k, act_order, layout, has_bias,
                                 request):
    g = case_generator(request)
    q, zeros, scales, g_idx = _components(n, k, bits, g)
    if act_order:
        g_idx = _act_order_g_idx(k, g)
    w = QuantWeight.from_components(q, zeros, scales, g_idx, bits)
    assert (w.perm is not None) == act_order
    x = _x_laid_out(m, k, layout, dtype, g)
    b = torch.randn(n, generator=g).to(dtype) if has_bias else None
    dev = tensor_device(device)
    y = kernel_op(device, "quant_linear")(_on(x, dev), w.to(dev),
                                          None if b is None else b.to(dev))
    assert y.shape == (m, n) and y.dtype == dtype and y.device.type == dev
    check_linear(y, x, _gpu_kernel_expected_weight(w, device, m, dtype), b, request.node.name)


@pytest.mark.simt
@pytest.mark.skipif(not simt_ops.HAVE_SIMT, reason=simt_ops.SKIP)
@pytest.mark.parametrize("n,k,act_order", [pytest.param(48, 256, False, id="48x256"),
                                           pytest.param(37, 300, False, id="37x300"),
                                           pytest.param(37, 300, True, id="37x300_act_order")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_kernel_is_exact(bits, dtype, n, k, act_order, request):
    """The prefill path's dense weight is QuantWeight.dequantize(dtype), bit for bit."""
    g = case_generator(request)
    q, zeros, scales, g_idx = _components(n, k, bits, g)
    if act_order:
        g_idx = _act_order_g_idx(k, g)
    w = QuantWeight.from_components(q, zeros, scales, g_idx, bits)
    assert torch.equal(simt_ops.quant_linear_dequantize(w, dtype), w.dequantize(dtype))


@functools.lru_cache(maxsize=2)
def _qwen_weight(n, k, bits, act_order):
    g = torch.Generator().manual_seed(n * 7 + k * 3 + bits + act_order)
    q, zeros, scales, g_idx = _components(n, k, bits, g)
    if act_order:
        g_idx = _act_order_g_idx(k, g)
    return QuantWeight.from_components(q, zeros, scales, g_idx, bits)


# Qwen-1.8B's projections (N, K): c_attn with its bias, mlp.w1 (and w2), mlp.c_proj.
QWEN_CASES = [
    pytest.param(6144, 2048, False, True, id="c_attn_6144x2048_bias"),
    pytest.param(5504, 2048, False, False, id="w1_5504x2048"),
    pytest.param(2048, 5504, False, False, id="mlp_c_proj_2048x5504"),
    pytest.param(2048, 5504, True, False, id="mlp_c_proj_2048x5504_act_order"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("n,k,act_order,has_bias", QWEN_CASES)
@pytest.mark.parametrize("m", [1, 4, 16, 37], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_qwen_shapes(bits, dtype, m, n, k, act_order, has_bias, request):
    g = case_generator(request)
    w = _qwen_weight(n, k, bits, act_order)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if has_bias else None
    y = ops.quant_linear(x.cuda(), w.to("cuda"), None if b is None else b.cuda())
    assert y.shape == (m, n) and y.dtype == dtype and y.is_cuda
    check_linear(y, x, _gpu_kernel_expected_weight(w, "cuda", m, dtype), b, request.node.name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)
def test_cuda_stream_out_batch_dims_and_device_checks():
    g = torch.Generator().manual_seed(6)
    q, zeros, scales, _ = _components(96, 384, 4, g)
    w = QuantWeight.from_components(q, zeros, scales, _act_order_g_idx(384, g), 4)
    wd = w.to("cuda")
    x = torch.randn(2, 3, 384, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    xd, bd = x.cuda(), b.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = ops.quant_linear(xd, wd, bd)
        out = torch.empty(2, 3, 96, dtype=torch.bfloat16, device="cuda")
        y2 = ops.linear(xd, wd, bd, out=out)  # ops.linear dispatches on the weight's type
    stream.synchronize()
    assert y.shape == (2, 3, 96) and y2 is out and torch.equal(y, out)
    check_linear(y, x, w.dequantize(), b, "side stream")
    with pytest.raises(RuntimeError, match=r"quant_linear: weight must be on cuda:\d+ \(the device "
                                           r"of x\), got cpu"):
        ops.quant_linear(xd, w)
    with pytest.raises(RuntimeError, match=r"quant_linear: perm must be on cuda:\d+"):
        ops._C.quant_linear(xd, wd.data, 4, 384, 96, None, w.perm)
    with pytest.raises(RuntimeError, match=r"quant_linear: bias must be on cuda:\d+"):
        ops.quant_linear(xd, wd, b)
    with pytest.raises(RuntimeError, match=r'quant_linear: isa chooses a path of the CPU kernel'):
        ops.quant_linear(xd, wd, isa="scalar")
