"""attention: the CPU kernel, the CUDA kernel (on a GPU, and in the SIMT emulator) against
reference.attention over dtypes, decode and prefill shapes (Qwen-1.8B: 16 heads of 128),
per-sequence cached lengths and strided views of the cache.

The design's rule for attention: the kernel's largest error against an fp32 reference is at
most twice that of the reference itself computed in the same low dtype (there, only the final
rounding). fp32 outputs use the tolerance table (the online softmax reorders fp32 sums).
16-bit outputs must also be bit-identical to the reference in almost every element.

The CUDA kernel splits a row's keys into chunks (flash-decoding) once fewer than ~1024 blocks
would run otherwise; the simt cases are small, so their rows split into 64-key chunks and the
combine runs (several chunks per row, rows of one chunk beside them in the same launch).
"""
from __future__ import annotations

import pytest
import torch

import simt_ops
from qwen_fast import ops, reference
from kernel_cases import DTYPES, case_generator, devices, kernel_op, tensor_device
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason=f"qwen_fast._C not built: {ops.IMPORT_ERROR}")

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA GPU, a CUDA build of torch and qwen_fast._C built with nvcc "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
                    f"_C cuda={ops.build_info()['cuda']})")

# (id, B, T, H, D, capacity S of the cache view, start per sequence[, layout])
# layout "bshd": k, v views of a [2, B, S + 5, H, D] buffer; "model": the model's cache
# [slots, H, positions, D] seen as [B, S, H, D] (cache[:, :, :S].transpose(1, 2)); "unaligned":
# bshd with rows of D + 1 starting one element in (no 16-byte vectors: the scalar path).
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
# On the GPU also: Qwen's shape at 4096 cached tokens in the model's cache layout.
GPU_CASES = [
    ("qwen_decode_at_4095", 1, 1, 16, 128, 4096, [4095], "model"),
    ("qwen_decode_batch_4096", 4, 1, 16, 128, 4096, [4095, 0, 2047, 3333], "model"),
    ("qwen_chunk_16_after_4080", 2, 16, 16, 128, 4096, [4080, 1000], "model"),
    ("qwen_decode_unaligned_4096", 2, 1, 16, 128, 4096, [4095, 4000], "unaligned"),
]
# In the emulator (one fiber per CUDA thread): small, but long enough rows that keys split.
SIMT_CASES = [
    ("decode_2x2x128_own_lengths_600", 2, 1, 2, 128, 600, [599, 130], "model"),
    ("chunk_3_d40_after_597_and_10", 2, 3, 2, 40, 600, [597, 10]),
    ("unaligned_d64_after_150", 1, 2, 3, 64, 200, [150], "unaligned"),
    ("awkward_d7_after_70", 1, 2, 1, 7, 80, [70]),
    ("one_key", 1, 1, 2, 16, 1, [0]),
    ("d256_after_100", 1, 1, 1, 256, 101, [100]),
]


def _params():
    by_device = {"cpu": CASES, "cuda": CASES + GPU_CASES, "simt": SIMT_CASES}
    out = []
    for dev in devices(CUDA_READY, CUDA_SKIP_REASON, simt=True):
        name = dev.values[0]
        for case in by_device[name]:
            layout = case[7] if len(case) > 7 else "bshd"
            out.append(pytest.param(name, *case[1:7], layout, id=f"{name}-{case[0]}",
                                    marks=dev.marks))
    return out


PARAMS = _params()


def _inputs(B, T, H, D, S, dtype, g, layout="bshd", device="cpu"):
    """q as the model makes it (a view of a fused qkv projection) and k, v as views of a
    larger cache (layout: see CASES), on `device`: none of the three is contiguous."""
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(device=device, dtype=dtype)
    q = qkv.unbind(2)[0]
    if layout == "model":
        cache = torch.randn(2, B + 1, H, S + 5, D, generator=g).to(device=device, dtype=dtype)
        k, v = (c[1:, :, :S].transpose(1, 2) for c in cache)
    elif layout == "unaligned":
        cache = torch.randn(2, B, S + 5, H, D + 1, generator=g).to(device=device, dtype=dtype)
        k, v = cache[0, :, :S, :, 1:], cache[1, :, :S, :, 1:]
    else:
        cache = torch.randn(2, B, S + 5, H, D, generator=g).to(device=device, dtype=dtype)
        k, v = cache[0, :, :S], cache[1, :, :S]
    return q, k, v


def _check(got, q, k, v, st, dtype, msg):
    """The attention rule (module docstring) for got against the reference on the CPU."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    B, T, H, D = q.shape
    assert got.shape == (B, T, H, D) and got.dtype == dtype and got.is_contiguous(), msg
    got = got.cpu()
    if dtype == torch.float32:
        assert_close(got, reference.attention(q, k, v, st), "attention", msg=msg)
        return
    exact = reference.attention(q.float(), k.float(), v.float(), st)
    rounded = reference.attention(q, k, v, st)
    err_kernel = (got.float() - exact).abs().max().item()
    err_ref = (rounded.float() - exact).abs().max().item()
    assert err_kernel <= 2 * err_ref + 1e-7, (msg, err_kernel, err_ref)
    assert (got == rounded).float().mean().item() >= 0.99, msg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,B,T,H,D,S,start,layout", PARAMS)
def test_attention_matches_reference(request, device, dtype, B, T, H, D, S, start, layout):
    q, k, v = _inputs(B, T, H, D, S, dtype, case_generator(request), layout,
                      tensor_device(device))
    st = torch.tensor(start)
    got = kernel_op(device, "attention")(q, k, v, st)
    assert got.device == q.device
    _check(got, q, k, v, st, dtype, request.node.name)


def test_simt_cases_split_the_keys():
    """The simt cases reach what they are there for: rows split into several chunks (so the
    combine runs); while a prefill of 2048 rows and a single key need no split."""
    if not simt_ops.HAVE_SIMT:
        pytest.skip(simt_ops.SKIP)
    ws = simt_ops._simt.attention_workspace_bytes
    assert ws(2, 1, 2, 128, 600) > 0 and ws(2, 3, 2, 40, 600) > 0 and ws(1, 2, 3, 64, 200) > 0
    assert ws(1, 1, 2, 16, 1) == 0                 # one key: nothing to split
    assert ws(1, 128, 16, 128, 128) == 0           # 2048 rows fill the GPU as they are
    # Workspace bounded whatever the length: about 1024 blocks' partials at most.
    assert ws(1, 1, 16, 128, 1 << 20) <= 2 * 1024 * (128 * 4 + 8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)
def test_cuda_attention_on_a_side_stream_into_out_with_start_on_the_gpu(request):
    """The model's call: start on the device (ops.attention reads it on the CPU), out given,
    a non-default current stream."""
    g = case_generator(request)
    q, k, v = _inputs(3, 1, 16, 128, 1000, torch.bfloat16, g, "model", "cuda")
    st = torch.tensor([999, 5, 640], device="cuda")
    out = torch.empty(3, 1, 16, 128, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.attention(q, k, v, st, out=out)
    stream.synchronize()
    assert got is out
    _check(out, q, k, v, st.cpu(), torch.bfloat16, "side stream")


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
