"""linear: every backend and every ISA level of the CPU kernel against reference.linear, over
dtypes, numbers of rows and the real Qwen-1.8B shapes plus awkward ones; the CUDA kernel on a GPU
(marked gpu) and, on small shapes, in the SIMT emulator (marked simt).

The reference is the spec and always runs on the CPU. Each case checks:
1. tolerances.dot_product_bound: a rigorous per-element bound for fp32 sums taken in another
   order, then rounded once.
2. 16-bit outputs are bit-identical to the reference in almost all elements: an fp32 sum that
   differs only in its order rarely crosses a rounding boundary. A kernel that rounded twice
   (the bias added after rounding) would differ in about 30% of them.
3. fp32 outputs: the rigorous bound grows with K (~K * eps * S, S = sum |x||w|) and would let a
   dropped term (~S / K) through at K = 5504. In practice the rounding errors of a reordered sum
   largely cancel and stay within a few u * S whatever K, so a tighter statistical bound,
   FP32_TYPICAL_ERROR * S, is asserted as well.
"""
from __future__ import annotations

import functools
import zlib

import pytest
import torch
import torch.nn.functional as F

from qwen_fast import ops, reference
from kernel_cases import DTYPES, devices, kernel_op, tensor_device
from tolerances import (FP32_UNIT_ROUNDOFF, assert_within, dot_product_bound,
                        dot_product_magnitude)

# Share of 16-bit output elements allowed to differ in any bit from the reference (check 2);
# at least one element may, for tiny outputs. Measured over this grid: at most 0.13% in bf16 and
# 2.3% in fp16 (3 of 128 elements at K = 5125: fp16 keeps 3 more bits, so flips are ~8x as
# frequent); rounding twice differs in ~30%.
MAX_INEXACT_FRACTION = {torch.bfloat16: 0.01, torch.float16: 0.05}
# |kernel - reference| / S for fp32 outputs (check 3): measured at most 4.5 u over this grid
# (the scalar kernel sums in plain k order); a dropped term is ~S / K, ~3000 u at K = 5504.
FP32_TYPICAL_ERROR = 16 * FP32_UNIT_ROUNDOFF
# Rows of x up to which ops.linear runs our kernel with isa "auto" in every dtype (csrc/ops/linear.cpp).
KERNEL_MAX_ROWS = 48

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA GPU, a CUDA build of torch and qwen_fast._C built with nvcc "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
                    f"_C cuda={ops.build_info()['cuda']})")
# Rows of x up to which ops.linear runs our GEMV on CUDA tensors (csrc/ops/linear.cpp); cuBLAS beyond.
CUDA_GEMV_MAX_ROWS = 16
ISAS = ops._C.linear_isas() if ops.HAVE_C else []

pytestmark = pytest.mark.usefixtures("require_extension")

DEVICES = devices(CUDA_READY, CUDA_SKIP_REASON)
# Decode (1), small batches (2, 7, 16, 17: every remainder of the 4-row tiles) and prefill
# blocks (128, 200), where ops.linear runs our kernel or torch by dtype and K (csrc/ops/linear.cpp):
# both paths are covered, and fp16 at 200 rows runs ours over several activation panels. On CUDA
# 1..16 rows run our GEMV (panels of 1, 2, 4, 8, 16 rows), 17 and more cuBLAS.
ROWS = [1, 2, 7, 16, 17, 128, 200]

# (id, N = out_features, K = in_features, with bias)
QWEN_SHAPES = [
    ("c_attn_6144x2048_bias", 6144, 2048, True),
    ("attn_c_proj_2048x2048", 2048, 2048, False),
    ("w1_5504x2048", 5504, 2048, False),
    ("mlp_c_proj_2048x5504", 2048, 5504, False),
]
# N and K from 1, 7, 83, 769, 5125: K not a multiple of any vector width, N not of the 4-row tile.
AWKWARD_SHAPES = [
    ("1x1_bias", 1, 1, True),
    ("7x83", 7, 83, False),
    ("83x7_bias", 83, 7, True),
    ("769x5125", 769, 5125, False),
    ("5125x769_bias", 5125, 769, True),
    ("1x5125", 1, 5125, False),
    ("5125x1_bias", 5125, 1, True),
    ("83x769_bias", 83, 769, True),
]
SHAPES = [pytest.param(n, k, bias, id=name) for name, n, k, bias in QWEN_SHAPES + AWKWARD_SHAPES]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _randn(shape, dtype, seed) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).normal_(generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=4)
def _weights(n: int, k: int, bias: bool, dtype: torch.dtype):
    """N(0, 1) weight [n, k] and bias [n] (or None), the same for every case of that shape."""
    w = _randn((n, k), dtype, _seed("w", n, k, dtype))
    return w, (_randn((n,), dtype, _seed("b", n, k, dtype)) if bias else None)


def _x(request, shape, dtype) -> torch.Tensor:
    """N(0, 1) activations, seeded from the test's own id."""
    return _randn(shape, dtype, zlib.crc32(request.node.name.encode()))


def check_linear(y, x, w, b, msg) -> None:
    """y against reference.linear(x, w, b) by the three checks in the module docstring."""
    x, w, b = x.cpu(), w.cpu(), None if b is None else b.cpu()
    expected = reference.linear(x, w, b)
    assert y.is_contiguous(), msg
    s = dot_product_magnitude(x, w, b)
    assert_within(y, expected, dot_product_bound(s, x.shape[-1], expected), msg)
    y = y.cpu()
    if expected.dtype == torch.float32:
        worst = float(((y - expected).abs() / s.clamp_min(torch.finfo(s.dtype).tiny)).max())
        assert worst <= FP32_TYPICAL_ERROR, (
            f"{msg}: an fp32 result is off by {worst / FP32_UNIT_ROUNDOFF:.1f} u * sum|x||w|, "
            f"more than a reordered sum ({FP32_TYPICAL_ERROR / FP32_UNIT_ROUNDOFF:.0f} u)")
    else:
        inexact = int((y != expected).sum())
        allowed = max(1, int(MAX_INEXACT_FRACTION[expected.dtype] * y.numel()))
        assert inexact <= allowed, (
            f"{msg}: {inexact} of {y.numel()} elements differ from the reference in some bit "
            f"(at most {allowed} expected from a different fp32 sum order)")


@pytest.mark.parametrize("n,k,has_bias", SHAPES)
@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_matches_reference(device, dtype, m, n, k, has_bias, request):
    w, b = _weights(n, k, has_bias, dtype)
    x = _x(request, (m, k), dtype)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    y = ops.linear(dev(x), dev(w), dev(b))
    assert y.device.type == device and y.shape == (m, n) and y.dtype == dtype
    check_linear(y, x, w, b, request.node.name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_lm_head(device, dtype, request):
    """lm_head [151936, 2048], one decode row: the biggest matrix (622 MB in bf16)."""
    w = _randn((151936, 2048), dtype, _seed("lm_head", dtype))
    x = _x(request, (1, 2048), dtype)
    check_linear(ops.linear(x.to(device), w.to(device)), x, w, None, request.node.name)


# (id, shape of x, how x is laid out in memory); K = 2048 rows of x against a [769, 2048] weight.
LAYOUTS = [
    pytest.param((3, 2048), "strided", id="strided_3x2048_of_2560"),    # x[:, :K] of a wider buffer
    pytest.param((40, 2048), "strided", id="strided_40x2048_of_2560"),  # the same, prefill sized
    pytest.param((5, 2048), "strided_offset", id="strided_5x2048_at_3"),  # unaligned start
    pytest.param((2, 3, 2048), "contiguous", id="batch_2x3x2048"),     # the model's [B, T, K]
    pytest.param((2, 3, 2048), "strided", id="strided_2x3x2048"),      # collapses to one stride
    pytest.param((2, 3, 2048), "transposed", id="transposed_2x3x2048"),  # cannot collapse: copied
    pytest.param((4, 9, 2048), "transposed", id="transposed_4x9x2048"),  # the same, prefill sized
]


def _laid_out(request, shape, layout, dtype) -> torch.Tensor:
    k = shape[-1]
    if layout == "contiguous":
        x = _x(request, shape, dtype)
    elif layout == "strided":
        x = _x(request, (*shape[:-1], k + 512), dtype)[..., :k]
    elif layout == "strided_offset":
        x = _x(request, (*shape[:-1], k + 100), dtype)[..., 3:3 + k]
    elif layout == "transposed":
        x = _x(request, (shape[1], shape[0], k), dtype).transpose(0, 1)
    else:
        raise ValueError(layout)
    assert tuple(x.shape) == tuple(shape)
    return x


@pytest.mark.parametrize("shape,layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_layouts(device, dtype, shape, layout, request):
    w, b = _weights(769, 2048, True, dtype)
    x = _laid_out(request, shape, layout, dtype)
    # .to(device) of a view copies it contiguous: make the strided view on the device instead.
    base = x if x._base is None else x._base
    xd = base.to(device).as_strided(x.shape, x.stride(), x.storage_offset())
    y = ops.linear(xd, w.to(device), b.to(device))
    assert y.shape == (*shape[:-1], 769) and y.device.type == device
    check_linear(y, x, w, b, request.node.name)


# The CUDA kernel on small shapes, also run by the SIMT emulator ("simt"): (id, N, K, with bias,
# layout of x). bf16/fp16 vectors hold 8 elements, fp32 vectors 4.
SMALL_SHAPES = [
    pytest.param(48, 256, True, "contiguous", id="48x256_bias"),          # 16-byte vectors
    pytest.param(48, 256, False, "strided", id="48x256_strided"),         # vectors, ld_x = 768
    pytest.param(48, 256, True, "strided_offset", id="48x256_bias_at_3"),  # unaligned x: scalars
    pytest.param(37, 300, True, "contiguous", id="37x300_bias"),  # 16-bit scalars, fp32 vectors
    pytest.param(37, 300, False, "strided_offset", id="37x300_at_3"),
    pytest.param(5, 7, True, "contiguous", id="5x7_bias"),         # K shorter than a vector
]
# 1, 3 (a 4-row panel with a missing row), 16, and 19: two panels in the emulator (ops.linear runs
# torch's GEMM for 19 rows on CUDA).
SMALL_ROWS = [1, 3, 16, 19]


@pytest.mark.parametrize("n,k,has_bias,layout", SMALL_SHAPES)
@pytest.mark.parametrize("m", SMALL_ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", devices(CUDA_READY, CUDA_SKIP_REASON, simt=True))
def test_linear_small_shapes(device, dtype, m, n, k, has_bias, layout, request):
    w, b = _weights(n, k, has_bias, dtype)
    x = _laid_out(request, (m, k), layout, dtype)
    dev = tensor_device(device)
    base = x if x._base is None else x._base
    xd = base.to(dev).as_strided(x.shape, x.stride(), x.storage_offset())
    y = kernel_op(device, "linear")(xd, w.to(dev), None if b is None else b.to(dev))
    assert y.shape == (m, n) and y.dtype == dtype and y.device.type == dev
    check_linear(y, x, w, b, request.node.name)


# Row counts covering every remainder of the 4-row (AVX-512, scalar) and 2-row (AVX2) tiles;
# shapes covering every remainder of N by the 4-row weight tile and K tails shorter than a vector.
ISA_ROWS = [1, 2, 3, 4, 7, 16, 17]
ISA_SHAPES = [
    pytest.param(7, 83, False, id="7x83"),
    pytest.param(10, 5125, True, id="10x5125_bias"),
    pytest.param(769, 769, True, id="769x769_bias"),
    pytest.param(2048, 2048, False, id="2048x2048"),
    pytest.param(83, 7, False, id="83x7"),
]


@pytest.mark.parametrize("n,k,has_bias", ISA_SHAPES)
@pytest.mark.parametrize("m", ISA_ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ["avx512_bf16", "avx512", "avx2", "scalar"])
def test_linear_every_isa(isa, dtype, m, n, k, has_bias, request):
    """Each ISA level of the kernel, forced (any number of rows then runs our kernel)."""
    if isa not in ISAS:
        pytest.skip(f"this CPU does not run {isa} (it runs {ISAS})")
    w, b = _weights(n, k, has_bias, dtype)
    x = _x(request, (m, k), dtype)
    check_linear(ops._C.linear(x, w, b, isa=isa), x, w, b, request.node.name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forced_isa_on_prefill_rows(dtype, request):
    """128 rows with a forced ISA run our kernel, not torch, at every level this CPU has."""
    w, b = _weights(83, 769, True, dtype)
    x = _x(request, (128, 769), dtype)
    for isa in ISAS:
        check_linear(ops._C.linear(x, w, b, isa=isa), x, w, b, f"{request.node.name}[{isa}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_is_the_best_isa_and_independent_of_threads(dtype, request):
    """isa="auto" is the first of linear_isas(); every output is one thread's fixed-order sum,
    so the result does not depend on the thread count."""
    assert ISAS[-1] == "scalar"
    w, b = _weights(6144, 2048, True, dtype)
    x = _x(request, (KERNEL_MAX_ROWS, 2048), dtype)
    y = ops._C.linear(x, w, b)
    assert torch.equal(y, ops._C.linear(x, w, b, isa=ISAS[0]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(y, ops._C.linear(x, w, b))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("m,n,k", [(0, 7, 83), (3, 0, 83), (3, 7, 0), (0, 0, 0)])
@pytest.mark.parametrize("has_bias", [False, True], ids=["no_bias", "bias"])
def test_empty_sizes(m, n, k, has_bias):
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16) if has_bias else None
    y = ops.linear(x, w, b)
    assert y.shape == (m, n)
    assert torch.equal(y, reference.linear(x, w, b))  # K = 0: y is the bias (or zeros)


@pytest.mark.parametrize("backend", ["reference", None])
def test_backend_argument_routes(backend):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    y = ops.linear(x, w, backend=backend)
    if backend == "reference":  # the wrapper must call the reference itself
        assert torch.equal(y, reference.linear(x, w))
    else:
        check_linear(y, x, w, None, "kernel")
    with pytest.raises(ValueError, match="backend must be None"):
        ops.linear(x, w, backend="cuda")


def test_ops_linear_gives_the_model_logits(tiny_engine, monkeypatch):
    """Every F.linear of a real forward pass (c_attn with its bias, c_proj, w1, w2, the MLP's
    c_proj and lm_head, whose output is the logits) is reproduced by ops.linear."""
    calls = []

    def recording_linear(x, weight, bias=None, *, out=None):
        y = F.linear(x, weight, bias)
        if out is not None:                 # the step's buffer, reused by the next layer:
            y = out.copy_(y)                # the call is recorded by value
        calls.append((x.clone(), weight, bias, y.clone()))
        return y

    monkeypatch.setitem(tiny_engine.model.ops, "linear", recording_linear)  # the reference's F.linear
    logits = tiny_engine.logits("The quick brown fox jumps over the lazy dog")
    monkeypatch.undo()
    assert len(calls) == 5 * tiny_engine.cfg.num_hidden_layers + 1
    x, w, b, y = calls[-1]
    assert w is tiny_engine.model.lm_head and torch.equal(y.float(), logits)
    # Per layer: c_attn (the one with a bias), c_proj, w1, w2, mlp.c_proj; then lm_head.
    has_bias = [b is not None for _, _, b, _ in calls]
    assert has_bias == [i % 5 == 0 for i in range(len(calls) - 1)] + [False]
    for i, (x, w, b, y) in enumerate(calls):
        assert w.dtype == torch.bfloat16
        ours = ops.linear(x, w, b)
        check_linear(ours, x, w, b, f"call {i}: x {tuple(x.shape)}, weight {tuple(w.shape)}")
        # torch's bf16 F.linear also sums in fp32 and rounds once (reference.linear's docstring).
        check_linear(y.contiguous(), x, w, b, f"F.linear call {i}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)
def test_cuda_linear_runs_on_the_current_stream_and_writes_out():
    w, b = _weights(6144, 2048, True, torch.bfloat16)
    x = _randn((CUDA_GEMV_MAX_ROWS, 2048), torch.bfloat16, _seed("stream"))
    xd, wd, bd = x.cuda(), w.cuda(), b.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = ops.linear(xd, wd, bd)
        out = torch.empty(CUDA_GEMV_MAX_ROWS, 6144, dtype=torch.bfloat16, device="cuda")
        y2 = ops.linear(xd, wd, bd, out=out)
    stream.synchronize()
    assert y2 is out and torch.equal(y, out)
    check_linear(y, x, w, b, "side stream")
    with pytest.raises(RuntimeError, match=r'linear: isa chooses a level of the CPU kernel; x is '
                                           r'on cuda:\d+, pass isa="auto"'):
        ops._C.linear(xd, wd, isa="scalar")


def _t(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call,error", [
    pytest.param(lambda: ops.linear(_t(7, 2048), _t(6144, 1024)),
                 r"linear: weight must have shape \[N, 2048\] \(out_features, in_features = last "
                 r"dim of x\), got \[6144, 1024\]", id="weight_shape"),
    pytest.param(lambda: ops.linear(_t(7, 2048), _t(2048)),
                 r"linear: weight must have shape \[N, 2048\] .*got \[2048\]", id="weight_1d"),
    pytest.param(lambda: ops.linear(_t(7, 2048), _t(6144, 2048, dtype=torch.float32)),
                 r"linear: weight must have dtype torch.bfloat16 \(the dtype of x\), got "
                 r"torch.float32", id="weight_dtype"),
    pytest.param(lambda: ops.linear(_t(7, 2048), _t(2048, 6144).t()),
                 r"linear: weight must be contiguous \(row-major \[N, K\]\), got strides "
                 r"\[1, 6144\]", id="weight_transposed"),
    pytest.param(lambda: ops.linear(_t(7, 2048), _t(6144, 2048).to("meta")),
                 r"linear: weight must be on cpu \(the device of x\), got meta",
                 id="weight_device"),
    pytest.param(lambda: ops.linear(_t(7, 2048), _t(6144, 2048), _t(2048)),
                 r"linear: bias must have shape \[6144\] \(out_features = weight.size\(0\)\), "
                 r"got \[2048\]", id="bias_shape"),
    pytest.param(lambda: ops.linear(_t(7, 2048), _t(6144, 2048), _t(6144, dtype=torch.float16)),
                 r"linear: bias must have dtype torch.bfloat16 \(the dtype of x\), got "
                 r"torch.float16", id="bias_dtype"),
    pytest.param(lambda: ops.linear(_t(7, 2048), _t(6144, 2048), _t(12288)[::2]),
                 r"linear: bias must be contiguous \(stride 1\), got stride 2", id="bias_strided"),
    pytest.param(lambda: ops.linear(_t(7, 4096)[:, ::2], _t(6144, 2048)),
                 r"linear: x must have a contiguous last dim \(stride 1\), got stride 2",
                 id="x_last_dim_strided"),
    pytest.param(lambda: ops.linear(_t(7, 2048, dtype=torch.float64),
                                    _t(6144, 2048, dtype=torch.float64)),
                 r"linear: x must have dtype torch.bfloat16, torch.float16 or torch.float32, got "
                 r"torch.float64", id="x_dtype"),
    pytest.param(lambda: ops.linear(torch.tensor(1.0), _t(1, 1, dtype=torch.float32)),
                 r"linear: x must have shape \[\.\.\., K\], got a 0-dim tensor", id="x_0d"),
    pytest.param(lambda: ops.linear(_t(7, 2048).to("meta"), _t(6144, 2048).to("meta")),
                 r"linear: x must be a CPU or CUDA tensor, got device meta", id="x_device"),
    pytest.param(lambda: ops._C.linear(_t(7, 2048), _t(6144, 2048), isa="avx9"),
                 r'linear: isa must be "auto" or one of "avx512_bf16", "avx512", "avx2", '
                 r'"scalar", got "avx9"', id="isa_unknown"),
])
def test_bad_arguments_are_named(call, error):
    with pytest.raises(RuntimeError, match=error):
        call()
