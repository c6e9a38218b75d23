"""rotary_embedding and rotary_kv_cache: every backend against reference.py, over dtypes, shapes
and layouts.

The kernels (CPU, CUDA, and the CUDA kernel run by the SIMT emulator: device "simt") do the
reference's fp32 operations in the reference's order (each product rounded, then the add, then
one rounding to the dtype; no FMA contraction on either side), so every case must be
bit-identical, not only within the tolerance table. The q/k views that the model passes
(qkv.view(B, T, 3, H, D).unbind(2)) are strided in B, T and H; the kernels read them in place.
The CUDA kernel moves 16-byte vectors when D, R/2, the strides and the pointers allow, else
single elements: the layouts below reach both (see their comments).

rotary_kv_cache writes into a paged KV cache (tests/paged_cases.py: pages drawn from a shuffled
pool, steps that pack prefill chunks and decode rows of several sequences); the pools start as a
sentinel, and every slot the step does not write must still hold it afterwards.
"""
from __future__ import annotations

import pytest
import torch

from paged_cases import paged_step
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
def _require_extension(request):
    """The "cpu" and "cuda" cases run qwen_fast._C (fail, not skip, when it did not build); the
    ones marked simt only the emulator."""
    if request.node.get_closest_marker("simt") is None:
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
    """Both kernels launch on torch's current stream (here a side stream)."""
    gen = torch.Generator().manual_seed(3)
    args, step = _step_inputs(16, 128, 128, 16, [(0, 5), (7, 2), (30, 0), (3, 1)], "qkv",
                              torch.bfloat16, gen, "cuda")
    before = args[5].cpu().clone()
    q, k, v, cos, sin = args[:5]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.rotary_embedding(k[None], cos[None], sin[None])
        q_out = ops.rotary_kv_cache(*args, step.page_table, step.token_seq, step.token_pos)
    stream.synchronize()
    assert torch.equal(out.cpu(), reference.rotary_embedding(k.cpu()[None], cos.cpu()[None],
                                                             sin.cpu()[None]))
    _check_step(q_out, args, step, before, "side stream")


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


# ---- rotary_kv_cache: the model's step (q rotated, k rotated and v copied into its pages) ------

# (id, H, D, R, page size P, [(cached, new) per sequence], layout of q, k, v). Layouts: "qkv",
# views of a [N, 3, H, D] buffer (the model's); "unaligned", the same with rows one element
# longer, starting one element in (the GPU's scalar path). D = 7 or R = 64 with P = 1 also take
# the scalar path on the GPU (D or R/2 not a multiple of the vector).
KV_CASES = [
    ("decode_1_P16", 16, 128, 128, 16, [(140, 1)], "qkv"),
    ("decode_batch_at_page_edges_P64", 16, 128, 128, 64, [(63, 1), (0, 1), (64, 1)], "qkv"),
    ("prefill_ragged_P16", 16, 128, 128, 16, [(0, 9), (0, 4), (0, 1)], "qkv"),
    ("chunk_after_cached_P24", 16, 128, 128, 24, [(16, 7), (40, 3)], "qkv"),
    # One sequence's 37-token chunk packed with decode rows, one sequence sitting out.
    ("mixed_37_and_decodes_P16", 4, 128, 128, 16, [(10, 37), (5, 1), (30, 0), (99, 1), (0, 1)],
     "qkv"),
    ("mixed_P24_unaligned", 4, 128, 128, 24, [(50, 37), (23, 1), (24, 1)], "unaligned"),
    ("P1", 4, 64, 64, 1, [(3, 5), (0, 2)], "qkv"),
    ("partial_R64_P16", 4, 128, 64, 16, [(2, 3), (0, 1)], "qkv"),
    ("awkward_D7_R6_P24", 3, 7, 6, 24, [(0, 3), (4, 2)], "qkv"),
    ("R0_P16", 2, 16, 0, 16, [(7, 2)], "qkv"),
]
SENTINEL = -77.0   # every pool slot before the step (exact in every dtype)


def _step_inputs(H, D, R, P, seqs, layout, dtype, gen, dev, shuffle_rows=False):
    """q, k, v (views of one qkv buffer), cos, sin, the sentinel-filled pools and the step."""
    step = paged_step(seqs, P, gen, shuffle_rows=shuffle_rows)
    N = step.n_tokens
    if layout == "unaligned":
        qkv = (2 * torch.randn(N, 3 * H * D + 1, generator=gen)).to(dtype)[:, 1:]
    else:
        qkv = (2 * torch.randn(N, 3 * H * D, generator=gen)).to(dtype)
    q, k, v = qkv.to(dev).view(N, 3, H, D).unbind(1)
    # The model's tables: the rows of each token's own position.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / max(R, 1)))
    freqs = step.token_pos.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dev), emb.sin().to(dev)
    kp, vp = (torch.full((step.num_pages, H, P, D), SENTINEL, dtype=dtype, device=dev)
              for _ in range(2))
    return (q, k, v, cos, sin, kp, vp), step.to(dev)


def _check_step(got, args, step, pool_before, msg):
    """q out bit-exact, the written slots bit-exact and every other slot still the sentinel;
    pool_before: either pool before the step (both start as the same sentinel fill)."""
    q, k, v, cos, sin, kp, vp = (t.cpu() for t in args)
    kp_ref, vp_ref = pool_before.clone(), pool_before.clone()
    meta = (step.page_table.cpu(), step.token_seq.cpu(), step.token_pos.cpu())
    want = reference.rotary_kv_cache(q, k, v, cos, sin, kp_ref, vp_ref, *meta)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous(), msg
    assert torch.equal(got.cpu(), want), msg
    assert torch.equal(kp, kp_ref) and torch.equal(vp, vp_ref), msg
    # The slots the step writes, and nothing else, changed.
    written = torch.zeros(step.num_pages, step.page_size, dtype=torch.bool)
    pages = meta[0].long()[meta[1].long(), meta[2].long() // step.page_size]
    written[pages, meta[2].long() % step.page_size] = True
    untouched = kp.permute(0, 2, 1, 3)[~written]
    assert (untouched == SENTINEL).all() and (vp.permute(0, 2, 1, 3)[~written] == SENTINEL).all()
    n_slots = step.num_pages * step.page_size
    assert untouched.shape[0] == n_slots - step.n_tokens, msg   # every token its own slot
    # And the reference wrote what attention reads back: token i's value at its slot.
    assert torch.equal(vp.permute(0, 2, 1, 3)[pages, meta[2].long() % step.page_size], v), msg


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in KV_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_kv_cache_is_bit_exact(device, case, dtype, request):
    """q out, the keys and values written, and every page slot not written are exactly the
    reference's (which rotates with reference.rotary_embedding and copies)."""
    _, H, D, R, P, seqs, layout = case
    dev = tensor_device(device)
    args, step = _step_inputs(H, D, R, P, seqs, layout, dtype, case_generator(request), dev)
    before = args[5].cpu().clone()
    op = kernel_op(device, "rotary_kv_cache")
    out = torch.empty(args[0].shape, dtype=dtype, device=dev)
    got = op(*args, step.page_table, step.token_seq, step.token_pos, out=out)
    assert got is out and got.device == args[0].device
    _check_step(got, args, step, before, request.node.name)
    assert torch.equal(got.cpu(), reference.rotary_embedding(args[0].cpu()[None], args[3].cpu()[None],
                                                             args[4].cpu()[None])[0])
    # Without out: a new contiguous tensor; the pools are written again with the same values.
    fresh = op(*args, step.page_table, step.token_seq, step.token_pos)
    assert torch.equal(fresh.cpu(), got.cpu()) and fresh.is_contiguous()
    _check_step(fresh, args, step, before, request.node.name)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_kv_cache_rows_in_any_order(device, request):
    """The step's tokens need not come sequence by sequence (the metadata say where each goes)."""
    dev = tensor_device(device)
    args, step = _step_inputs(4, 32, 32, 8, [(5, 9), (17, 1), (0, 6)], "qkv", torch.float16,
                              case_generator(request), dev, shuffle_rows=True)
    assert not torch.equal(step.token_seq.cpu(), step.token_seq.cpu().sort().values)
    before = args[5].cpu().clone()
    got = kernel_op(device, "rotary_kv_cache")(*args, step.page_table, step.token_seq,
                                               step.token_pos)
    _check_step(got, args, step, before, request.node.name)


def _kv_args(dtype=torch.bfloat16):
    """A decode step of 2 sequences (4 heads of 16, P = 4, 3 pages in the table per sequence)."""
    (q, k, v, cos, sin, kp, vp), step = _step_inputs(4, 16, 16, 4, [(5, 1), (2, 1)], "qkv", dtype,
                                                     torch.Generator().manual_seed(5), "cpu")
    assert step.page_table.shape[1] == 3
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, k_pages=kp, v_pages=vp,
                page_table=step.page_table, token_seq=step.token_seq, token_pos=step.token_pos)


# The messages name the argument; the patterns are loose on the rest of the wording.
@pytest.mark.parametrize("change,error", [
    pytest.param(lambda a: dict(page_table=a["page_table"].long()), "page_table",
                 id="page_table_dtype"),
    pytest.param(lambda a: dict(token_pos=a["token_pos"].long()), "token_pos",
                 id="token_pos_dtype"),
    # Position 12 is on page 3: the table holds 3 pages per sequence.
    pytest.param(lambda a: dict(token_pos=torch.tensor([5, 12], dtype=torch.int32)), "token_pos",
                 id="token_pos_past_the_table"),
    pytest.param(lambda a: dict(k=torch.randn(2, 4, 16).to(torch.bfloat16)), r"\bk\b",
                 id="k_strides_not_q_s"),
    pytest.param(lambda a: dict(k_pages=a["k_pages"].float()), "k_pages", id="k_pages_dtype"),
    pytest.param(lambda a: dict(v_pages=a["v_pages"][:, :, :2].contiguous()), "v_pages",
                 id="v_pages_page_size"),
    pytest.param(lambda a: dict(cos=a["cos"][:1], sin=a["sin"][:1]), "cos", id="cos_rows"),
    pytest.param(lambda a: dict(out=torch.empty(2, 4, 16)), "out", id="out_dtype"),
])
def test_rotary_kv_cache_bad_arguments_are_named(change, error):
    a = _kv_args()
    a.update(change(a))
    with pytest.raises(RuntimeError, match=error):
        ops.rotary_kv_cache(**a)
