"""rotary_embedding and rotary_kv_cache: every backend against reference.py, over dtypes, shapes
and layouts.

The kernels (CPU, CUDA, and the CUDA kernel run by the SIMT emulator: device "simt") do the
reference's fp32 operations in the reference's order (each product rounded, then the add, then
one rounding to the dtype; no FMA contraction on either side), so every case must be
bit-identical, not only within the tolerance table. The q/k views that the model passes
(qkv.view(B, T, 3, H, D).unbind(2)) are strided in B, T and H; the kernels read them in place.
The CUDA kernel moves 16-byte vectors when D, R/2, the strides and the pointers allow, else
single elements: the layouts below reach both (see their comments).
"""
from __future__ import annotations

import pytest
import torch

from qwen_fast import ops, reference
from kernel_cases import DTYPES, case_generator, devices, kernel_op, tensor_device

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA GPU, a CUDA build of torch and qwen_fast._C built with nvcc "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
                    f"_C cuda={ops.build_info()['cuda']})")
DEVICES = devices(CUDA_READY, CUDA_SKIP_REASON, simt=True)

# (id, (B, T, H, D), R, layout of x). Qwen-1.8B: H = 16 heads of D = 128, R = 128. On the GPU,
# D = 128 with R = 128 or 64 takes the vector path in every dtype (even with R = 0: D = 8);
# D = 83, 7 or 16 with R = 4 (R/2 not a multiple of 4 or 8 elements) and the unaligned view take
# the scalar one.
LAYOUTS = [
    ("decode_1x1x16x128", (1, 1, 16, 128), 128, "qkv"),
    ("decode_4x1x16x128", (4, 1, 16, 128), 128, "qkv"),
    ("prefill_1x128x16x128", (1, 128, 16, 128), 128, "qkv"),
    ("prefill_4x128x16x128", (4, 128, 16, 128), 128, "qkv"),
    ("contiguous_2x7x16x128", (2, 7, 16, 128), 128, "contiguous"),
    ("odd_3x7x5x128", (3, 7, 5, 128), 128, "qkv"),
    ("partial_R64_2x3x4x128", (2, 3, 4, 128), 64, "qkv"),         # R < D: dims 64.. pass through
    ("odd_D_1x83x3x83_R82", (1, 83, 3, 83), 82, "contiguous"),
    ("R0_2x5x3x8", (2, 5, 3, 8), 0, "contiguous"),               # nothing rotated: a copy
    ("transposed_3x5x4x128", (3, 5, 4, 128), 128, "transposed"),  # [T, B, ...] memory order
    ("head_slice_2x3x5x128", (2, 3, 5, 128), 128, "head_slice"),  # heads 1..5 of 8, offset start
    ("D7_R6_2x3x5x7", (2, 3, 5, 7), 6, "qkv"),
    ("R4_of_D16_2x3x4x16", (2, 3, 4, 16), 4, "contiguous"),
    ("unaligned_2x3x4x128", (2, 3, 4, 128), 128, "unaligned"),   # odd start and B/T strides
]
SHAPES = [pytest.param(shape, r, layout, id=name) for name, shape, r, layout in LAYOUTS]


def _make_x(shape, layout, dtype, gen, device="cpu") -> torch.Tensor:
    """x of `shape` [B, T, H, D] (values ~ N(0, 2^2)) in the requested memory layout, a view of
    a buffer on `device` (a kernel test device: "simt" tensors live on the CPU)."""
    B, T, H, D = shape

    def randn(*size):
        return (2 * torch.randn(*size, generator=gen)).to(dtype).to(tensor_device(device))

    if layout == "contiguous":
        x = randn(B, T, H, D)
    elif layout == "qkv":  # what the model passes: q of the fused qkv projection
        x = randn(B, T, 3 * H * D).view(B, T, 3, H, D).unbind(2)[0]
    elif layout == "transposed":
        x = randn(T, B, H, D).transpose(0, 1)
    elif layout == "head_slice":
        x = randn(B, T, H + 3, D)[:, :, 1:H + 1]
    elif layout == "unaligned":
        x = randn(B, T, H * D + 1)[..., 1:].view(B, T, H, D)
    else:
        raise ValueError(layout)
    assert tuple(x.shape) == tuple(shape)
    return x


def _tables(B, T, R, gen):
    """cos, sin [B, T, R] fp32 as the model builds them (cat(freqs, freqs)) at random positions,
    up to 32k so that large angles are covered."""
    pos = torch.randint(0, 32768, (B, T), generator=gen).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / max(R, 1)))
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.fixture(autouse=True)
def _require_extension():
    assert ops.HAVE_C, f"qwen_fast._C is not built: {ops.IMPORT_ERROR}"


@pytest.mark.parametrize("shape,r,layout", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_is_bit_exact(device, dtype, shape, r, layout, request):
    gen = case_generator(request)
    x = _make_x(shape, layout, dtype, gen, device)
    cos, sin = (t.to(tensor_device(device)) for t in _tables(shape[0], shape[1], r, gen))

    out = kernel_op(device, "rotary_embedding")(x, cos, sin)

    expected = reference.rotary_embedding(x.cpu(), cos.cpu(), sin.cpu())
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert out.device == x.device
    mismatch = (out.cpu() != expected).sum().item()
    assert torch.equal(out.cpu(), expected), f"{request.node.name}: {mismatch} elements differ"


@pytest.mark.parametrize("device", DEVICES)
def test_strided_tables_and_k_view(device):
    """k (the second unbind view) and cos/sin that are slices of wider tables."""
    gen = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 9, 16, 128
    dev = tensor_device(device)
    k = torch.randn(B, T, 3 * H * D, generator=gen).to(dev).view(B, T, 3, H, D).unbind(2)[1]
    wide_cos, wide_sin = (torch.randn(B, T, 2 * D, generator=gen).to(dev) for _ in range(2))
    cos, sin = wide_cos[..., :D], wide_sin[..., D:]
    assert not cos.is_contiguous() and not sin.is_contiguous()
    out = kernel_op(device, "rotary_embedding")(k, cos, sin)
    assert torch.equal(out.cpu(), reference.rotary_embedding(k.cpu(), cos.cpu(), sin.cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_special_values_follow_the_reference(device):
    """inf and large values give the same inf / nan pattern as the reference."""
    x = torch.tensor([float("inf"), -3e38, 1.0, 0.0, 3e38, -0.0, float("-inf"), 2.0])
    x = x.view(1, 1, 1, 8)
    cos = torch.tensor([[[0.5, -1.0, 0.0, 1.0, 0.5, -1.0, 0.0, 1.0]]])
    sin = torch.tensor([[[0.5, 0.0, 1.0, -1.0, 0.5, 0.0, 1.0, -1.0]]])
    dev = tensor_device(device)
    out = kernel_op(device, "rotary_embedding")(x.to(dev), cos.to(dev), sin.to(dev)).cpu()
    expected = reference.rotary_embedding(x, cos, sin)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(0.0), expected.nan_to_num(0.0))
    finite = ~expected.isnan()  # (a NaN's sign is the hardware's: x86 and CUDA differ)
    assert torch.equal(out.signbit()[finite], expected.signbit()[finite])  # -0.0 included


@pytest.mark.parametrize("backend", ["reference", None])
def test_backend_argument_routes(backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 2, 16, generator=gen).to(torch.bfloat16)
    cos, sin = _tables(1, 3, 16, gen)
    out = ops.rotary_embedding(x, cos, sin, backend=backend)
    assert torch.equal(out, reference.rotary_embedding(x, cos, sin))
    with pytest.raises(ValueError, match="backend must be None"):
        ops.rotary_embedding(x, cos, sin, backend="cuda")


def test_empty_inputs():
    x = torch.empty(0, 3, 16, 128, dtype=torch.bfloat16)
    cos = sin = torch.empty(0, 3, 128)
    assert ops.rotary_embedding(x, cos, sin).shape == (0, 3, 16, 128)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)
def test_cuda_kernels_run_on_the_current_stream():
    """Both kernels launch on torch's current stream (here a side stream), and rotary_kv_cache's
    per-row lists reach the device on it before the kernel reads them."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, D, S = 3, 5, 16, 128, 12
    qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(torch.bfloat16)
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
    cos, sin = _tables(B, T, D, gen)
    kc, vc = (torch.randn(B, H, S, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    slots, start, n_new = [2, 0, 1], [0, 7, 3], [5, 2, 0]
    gq, gk, gv = qkv.cuda().view(B, T, 3, H, D).unbind(2)
    gcos, gsin, gkc, gvc = cos.cuda(), sin.cuda(), kc.cuda(), vc.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.rotary_embedding(gk, gcos, gsin)
        q_out = ops.rotary_kv_cache(gq, gk, gv, gcos, gsin, gkc, gvc, slots, start, n_new)
    stream.synchronize()
    assert torch.equal(out.cpu(), reference.rotary_embedding(k, cos, sin))
    want_q = reference.rotary_kv_cache(q, k, v, cos, sin, kc, vc, slots, start, n_new)
    assert torch.equal(q_out.cpu(), want_q)
    assert torch.equal(gkc.cpu(), kc) and torch.equal(gvc.cpu(), vc)


def _x(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call,error", [
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 128), _t(2, 5, 128), _t(2, 5, 128)),
                 r"rotary_embedding: x must have shape \[B, T, H, D\], got \[2, 5, 128\]",
                 id="x_3d"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128, dtype=torch.float64),
                                              _t(2, 5, 128), _t(2, 5, 128)),
                 r"rotary_embedding: x must have dtype torch.bfloat16, torch.float16 or "
                 r"torch.float32, got torch.float64", id="x_dtype"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 256)[..., ::2], _t(2, 5, 128),
                                              _t(2, 5, 128)),
                 r"rotary_embedding: x must have a contiguous last dim \(stride 1\), got stride 2",
                 id="x_last_dim_strided"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128).to("meta"),
                                              _t(2, 5, 128).to("meta"), _t(2, 5, 128).to("meta")),
                 r"rotary_embedding: x must be a CPU or CUDA tensor, got device meta",
                 id="x_device"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128), _t(2, 4, 128), _t(2, 4, 128)),
                 r"rotary_embedding: cos must have shape \[B, T, R\] = \[2, 5, R\] \(batch and "
                 r"seq of x, R even and <= head_dim 128\), got \[2, 4, 128\]", id="cos_seq"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128), _t(2, 5, 130), _t(2, 5, 130)),
                 r"rotary_embedding: cos must have shape \[B, T, R\] = \[2, 5, R\] .* got "
                 r"\[2, 5, 130\]", id="cos_R_too_big"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128), _t(2, 5, 63), _t(2, 5, 63)),
                 r"rotary_embedding: cos must have shape \[B, T, R\] = \[2, 5, R\] \(batch and "
                 r"seq of x, R even .* got \[2, 5, 63\]", id="cos_R_odd"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128), _t(2, 5, 1, 128),
                                              _t(2, 5, 1, 128)),
                 r"rotary_embedding: cos must have shape \[B, T, R\] = \[2, 5, R\] .* got "
                 r"\[2, 5, 1, 128\]", id="cos_4d"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128), _t(2, 5, 128, dtype=torch.bfloat16),
                                              _t(2, 5, 128, dtype=torch.bfloat16)),
                 r"rotary_embedding: cos must have dtype torch.float32, got torch.bfloat16",
                 id="cos_dtype"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128), _t(2, 5, 128).to("meta"),
                                              _t(2, 5, 128).to("meta")),
                 r"rotary_embedding: cos must be on cpu \(the device of x\), got meta",
                 id="cos_device"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128), _t(2, 5, 128), _t(2, 5, 64)),
                 r"rotary_embedding: sin must have shape \[2, 5, 128\] \(the shape of cos\), "
                 r"got \[2, 5, 64\]", id="sin_shape"),
    pytest.param(lambda: ops.rotary_embedding(_x(2, 5, 16, 128), _t(2, 5, 128),
                                              _t(2, 5, 128, dtype=torch.float64)),
                 r"rotary_embedding: sin must have dtype torch.float32, got torch.float64",
                 id="sin_dtype"),
])
def test_bad_arguments_are_named(call, error):
    with pytest.raises(RuntimeError, match=error):
        call()


# ---- rotary_kv_cache: the model's step (q rotated, k rotated and v copied into the cache) -------

KV_CASES = [
    # (id, B, T, n_new per row, start per row, slots per row, cache slots, positions); Qwen's
    # H = 16, D = R = 128 unless the case gives (H, D, R, padding of each cache position).
    ("decode_1", 1, 1, [1], [140], [0], 1, 256),
    ("decode_rows_of_a_bigger_cache", 3, 1, [1, 1, 1], [5, 0, 63], [3, 0, 2], 4, 64),
    ("prefill_ragged", 3, 9, [9, 4, 1], [0, 0, 0], [0, 1, 2], 3, 16),
    ("chunk_after_cached", 2, 7, [7, 3], [16, 40], [1, 0], 2, 47),
    ("nothing_appended", 2, 3, [0, 3], [8, 0], [0, 1], 2, 8),
    ("partial_R64", 2, 3, [3, 1], [2, 0], [1, 0], 2, 6, (4, 128, 64, 0)),
    # The GPU's scalar path: D = 7, then an odd cache stride (positions D + 1 apart).
    ("awkward_D7_R6", 2, 3, [3, 2], [0, 4], [1, 0], 2, 9, (3, 7, 6, 0)),
    ("odd_cache_stride", 2, 2, [2, 1], [1, 0], [0, 1], 2, 4, (4, 128, 128, 1)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in KV_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_kv_cache_is_bit_exact(device, case, dtype, request):
    """q out, the keys and values written, and every cache position not written are exactly
    the reference's (which rotates with reference.rotary_embedding and copies)."""
    _, B, T, n_new, start, slots, n_slots, S = case[:8]
    H, D, R, pad = case[8] if len(case) > 8 else (16, 128, 128, 0)
    gen = case_generator(request)
    dev = tensor_device(device)
    qkv = (2 * torch.randn(B, T, 3 * H * D, generator=gen)).to(dtype)
    q, k, v = qkv.to(dev).view(B, T, 3, H, D).unbind(2)
    cos, sin = (t.to(dev) for t in _tables(B, T, R, gen))
    # Caches as the model holds them, [slots, H, capacity, D], viewed over S positions.
    kc, vc = ((torch.randn(n_slots, H, S + 5, D + pad, generator=gen).to(dtype).to(dev)
               [:, :, :S, :D]) for _ in range(2))
    kc_ref, vc_ref = kc.cpu().clone(), vc.cpu().clone()
    want = reference.rotary_kv_cache(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu(), kc_ref,
                                     vc_ref, slots, start, n_new)
    op = kernel_op(device, "rotary_kv_cache")
    out = torch.empty(B, T, H, D, dtype=dtype, device=dev)
    got = op(q, k, v, cos, sin, kc, vc, slots, start, n_new, out=out)
    assert got is out
    assert torch.equal(got.cpu(), want)
    assert torch.equal(want, reference.rotary_embedding(q.cpu(), cos.cpu(), sin.cpu()))
    assert torch.equal(kc.cpu(), kc_ref) and torch.equal(vc.cpu(), vc_ref)
    for b in range(B):       # and the reference really wrote what the model reads back
        s0, n = start[b], n_new[b]
        assert torch.equal(vc_ref[slots[b], :, s0:s0 + n], v[b, :n].cpu().transpose(0, 1))
    fresh = op(q, k, v, cos, sin, kc.clone(), vc.clone(), slots, start, n_new)
    assert torch.equal(fresh.cpu(), want) and fresh.is_contiguous() and fresh.device == q.device


def _kv_args(B=2, T=1, S=8, dtype=torch.bfloat16):
    H, D = 4, 16
    qkv = torch.randn(B, T, 3 * H * D).to(dtype)
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
    cos, sin = torch.randn(B, T, D), torch.randn(B, T, D)
    kc, vc = torch.zeros(B, H, S, D, dtype=dtype), torch.zeros(B, H, S, D, dtype=dtype)
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=kc, v_cache=vc, slots=[0, 1],
                start=[0, 3], n_new=[1, 1])


def _kv_call(**change):
    a = _kv_args()
    a.update(change)
    return ops.rotary_kv_cache(**a)


@pytest.mark.parametrize("change,error", [
    pytest.param(dict(slots=[0, 2]), r"rotary_kv_cache: slots\[1\] = 2 is not a cache slot "
                 r"\(the cache has 2\)", id="slot_out_of_range"),
    pytest.param(dict(slots=[1, 1]), r"slots\[0\] and slots\[1\] are both 1; each sequence needs "
                 r"its own cache slot", id="slot_twice"),
    pytest.param(dict(slots=[0]), r"slots must give one value for each of the 2 sequences, got 1",
                 id="slots_short"),
    pytest.param(dict(start=[0, 8]), r"sequence 1 writes positions 8 \.\. 8, outside the cache's "
                 r"8 positions", id="past_the_cache"),
    pytest.param(dict(start=[-1, 0]), r"sequence 0 writes positions -1", id="negative_start"),
    pytest.param(dict(n_new=[2, 1]), r"n_new\[0\] = 2 must be in \[0, 1\]", id="n_new_past_T"),
    pytest.param(dict(k=torch.randn(2, 1, 4, 16).to(torch.bfloat16)),
                 r"k must have the strides of q \[192, 192, 16, 1\] \(q, k, v are views of one qkv "
                 r"buffer\), got \[64, 64, 16, 1\]", id="k_strides"),
    pytest.param(dict(v_cache=torch.zeros(2, 4, 9, 16, dtype=torch.bfloat16)),
                 r"v_cache must have the shape and strides of k_cache \[2, 4, 8, 16\]",
                 id="v_cache_shape"),
    pytest.param(dict(k_cache=torch.zeros(2, 4, 8, 16)),
                 r"k_cache must have dtype torch.bfloat16 \(the dtype of q\), got torch.float32",
                 id="cache_dtype"),
    pytest.param(dict(k_cache=torch.zeros(2, 5, 8, 16, dtype=torch.bfloat16)),
                 r"k_cache must have shape \[slots, 4, positions, 16\]", id="cache_heads"),
    pytest.param(dict(out=torch.empty(2, 1, 4, 16)),
                 r"rotary_kv_cache: out must have dtype torch.bfloat16 \(the dtype of q\), got "
                 r"torch.float32", id="out_dtype"),
    pytest.param(dict(out=torch.empty(2, 1, 4, 17, dtype=torch.bfloat16)[..., :16]),
                 r"rotary_kv_cache: out must be contiguous", id="out_strided"),
])
def test_rotary_kv_cache_bad_arguments_are_named(change, error):
    with pytest.raises(RuntimeError, match=error):
        _kv_call(**change)


def test_rotary_kv_cache_refuses_overlapping_buffers():
    a = _kv_args()
    with pytest.raises(RuntimeError, match="the caches share memory with k_cache"):
        _kv_call(v_cache=a["k_cache"], k_cache=a["k_cache"])
    # out: a contiguous [2, 1, 4, 16] tensor over the first elements of the key cache.
    aliasing = a["k_cache"].view(-1)[:2 * 4 * 16].view(2, 1, 4, 16)
    with pytest.raises(RuntimeError, match="out shares memory with k_cache; pass a separate buffer"):
        _kv_call(k_cache=a["k_cache"], out=aliasing)
