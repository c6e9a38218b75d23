"""attention over a paged KV cache: the CPU kernel, the CUDA kernel (on a GPU, and in the SIMT
emulator) against reference.attention over dtypes, page sizes (1, 16, 64 and 24, not a power of
two), decode steps, prefill chunks after cached tokens and mixed steps that pack both, several
sequences with their own lengths, awkward heads and head dims, and q as a strided view of the
fused qkv buffer (plus an unaligned one, the CUDA kernel's scalar path).

Every step's pages are drawn from a shuffled pool (tests/paged_cases.py); the slots that hold no
key (spare pages, which the page table's unused entries name, and the tail of each sequence's
last page) are NaN, so that a kernel that reads a page or a slot it should not gives NaN.

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
from paged_cases import paged_step, poison_pools
from qwen_fast import ops, reference
from kernel_cases import DTYPES, case_generator, devices, kernel_op, tensor_device
from tolerances import assert_close

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA GPU, a CUDA build of torch and qwen_fast._C built with nvcc "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
                    f"_C cuda={ops.build_info()['cuda']})")

# (id, H, D, page size P, [(cached, new) per sequence][, q layout])
# q layout "qkv": q = qkv[:, 0] of a [N, 3, H, D] buffer; "unaligned": the same with the rows of
# qkv one element longer and starting one element in (no 16-byte vectors: the scalar path).
CASES = [
    ("decode_own_lengths_P16", 16, 128, 16, [(299, 1), (0, 1), (17, 1), (150, 1)]),
    ("prefill_128_P64", 16, 128, 64, [(0, 128)]),
    ("chunk_37_after_cached_P16", 16, 128, 16, [(100, 37), (60, 37)]),
    # One sequence's 37-token chunk packed with three decode rows, and one sequence idle.
    ("mixed_37_and_decodes_P16", 16, 128, 16, [(50, 37), (10, 1), (40, 0), (200, 1), (0, 1)]),
    ("mixed_P24", 8, 64, 24, [(70, 37), (5, 1), (100, 1)]),
    ("decode_at_page_edges_P64", 4, 128, 64, [(63, 1), (64, 1), (127, 1), (300, 1)]),
    ("P1", 4, 64, 1, [(40, 3), (7, 1)]),
    ("awkward_3_heads_d7_P5", 3, 7, 5, [(0, 5), (40, 5), (78, 5)]),
    ("one_key", 2, 16, 16, [(0, 1)]),
    ("d256_P16", 2, 256, 16, [(6, 3)]),
    ("unaligned_q_P16", 4, 64, 16, [(30, 4), (90, 1)], "unaligned"),
    # bf16 x 128 runs chunks in tiles of 8 tokens: tiles cut short, blocks of 128 in a page.
    ("tiles_P64", 4, 128, 64, [(70, 21), (0, 3), (127, 2)]),
    ("tiles_P256", 2, 128, 256, [(300, 19)]),
    ("tiles_P5", 2, 128, 5, [(33, 11)]),
]
# On the GPU also: Qwen's shape at 4096 cached tokens, P = 64.
GPU_CASES = [
    ("qwen_decode_at_4095", 16, 128, 64, [(4095, 1)]),
    ("qwen_decode_batch_4096", 16, 128, 64, [(4095, 1), (0, 1), (2047, 1), (3333, 1)]),
    ("qwen_chunk_16_after_4080", 16, 128, 64, [(4080, 16), (1000, 16)]),
    ("qwen_mixed_37_and_decodes_4096", 16, 128, 64, [(2000, 37), (4095, 1), (100, 1), (3000, 1)]),
    ("qwen_decode_unaligned_4096", 16, 128, 64, [(4095, 1), (4000, 1)], "unaligned"),
]
# In the emulator (one fiber per CUDA thread): few rows, but long enough that keys split.
SIMT_CASES = [
    ("decode_2x128_own_lengths_P16", 2, 128, 16, [(599, 1), (130, 1)]),
    ("mixed_chunk_3_and_decode_P24", 2, 40, 24, [(200, 3), (299, 1), (7, 0), (0, 1)]),
    ("mixed_37_and_decodes_P24", 1, 32, 24, [(100, 37), (300, 1), (0, 1)]),
    ("P1_d16", 2, 16, 1, [(80, 2)]),
    ("P64_unaligned_q_d64", 3, 64, 64, [(150, 2)], "unaligned"),
    ("awkward_d7_P5", 1, 7, 5, [(70, 2)]),
    ("one_key", 2, 16, 16, [(0, 1)]),
    ("d256_P16", 1, 256, 16, [(100, 1)]),
]


def _params():
    by_device = {"cpu": CASES, "cuda": CASES + GPU_CASES, "simt": SIMT_CASES}
    out = []
    for dev in devices(CUDA_READY, CUDA_SKIP_REASON, simt=True):
        name = dev.values[0]
        for case in by_device[name]:
            layout = case[5] if len(case) > 5 else "qkv"
            out.append(pytest.param(name, *case[1:5], layout, id=f"{name}-{case[0]}",
                                    marks=dev.marks))
    return out


@pytest.fixture(autouse=True)
def _require_extension(request):
    """The "cpu" and "cuda" cases run qwen_fast._C (fail, not skip, when it did not build); the
    ones marked simt only the emulator."""
    if request.node.get_closest_marker("simt") is None:
        assert ops.HAVE_C, f"qwen_fast._C is not built: {ops.IMPORT_ERROR}"


def _inputs(H, D, P, seqs, dtype, g, layout="qkv", device="cpu", shuffle_rows=False):
    """q (a strided view, see CASES), the poisoned page pools and the step's metadata."""
    step = paged_step(seqs, P, g, shuffle_rows=shuffle_rows)
    N = step.n_tokens
    if layout == "unaligned":
        buf = torch.randn(N, 3 * H * D + 1, generator=g)[:, 1:]
        q = buf.to(dtype).view(N, 3, H, D)[:, 0]
    else:
        q = torch.randn(N, 3, H, D, generator=g).to(dtype)[:, 0]
    k_pages, v_pages = (torch.randn(step.num_pages, H, P, D, generator=g).to(dtype)
                        for _ in range(2))
    poison_pools(k_pages, v_pages, step)
    return (q.to(device), k_pages.to(device), v_pages.to(device)), step.to(device)


def _check(got, q, k_pages, v_pages, step, dtype, msg, scale=None):
    """The attention rule (module docstring) for got against the reference on the CPU."""
    q, k_pages, v_pages, step = q.cpu(), k_pages.cpu(), v_pages.cpu(), step.to("cpu")
    meta = (step.page_table, step.token_seq, step.token_pos)
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous(), msg
    got = got.cpu()
    if dtype == torch.float32:
        assert_close(got, reference.attention(q, k_pages, v_pages, *meta, scale), "attention",
                     msg=msg)
        return
    exact = reference.attention(q.float(), k_pages.float(), v_pages.float(), *meta, scale)
    rounded = reference.attention(q, k_pages, v_pages, *meta, scale)
    assert exact.isfinite().all(), "the reference read a poisoned slot: the case is wrong"
    err_kernel = (got.float() - exact).abs().max().item()
    err_ref = (rounded.float() - exact).abs().max().item()
    assert err_kernel <= 2 * err_ref + 1e-7, (msg, err_kernel, err_ref)
    assert (got == rounded).float().mean().item() >= 0.99, msg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,H,D,P,seqs,layout", _params())
def test_attention_matches_reference(request, device, dtype, H, D, P, seqs, layout):
    (q, kp, vp), step = _inputs(H, D, P, seqs, dtype, case_generator(request), layout,
                                tensor_device(device))
    got = kernel_op(device, "attention")(q, kp, vp, step.page_table, step.token_seq,
                                         step.token_pos)
    assert got.device == q.device
    _check(got, q, kp, vp, step, dtype, request.node.name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,D,P,cached,new", [(2, 128, 64, 150, 45), (2, 128, 5, 20, 23),
                                              (3, 24, 16, 40, 19)])
def test_attention_gives_a_token_the_same_bits_however_the_step_is_chunked(request, dtype, H, D,
                                                                          P, cached, new):
    """The prefix cache's exactness rests on this (README "Prefix caching"): a token's output is
    the same bits whether its chunk is computed at once, in chunks of any size, one token at a
    time (a decode step), or packed with other sequences' tokens."""
    g = case_generator(request)
    (q, kp, vp), step = _inputs(H, D, P, [(cached, new), (7, 1)], dtype, g)
    seq, pos = step.token_seq, step.token_pos
    whole = ops.attention(q, kp, vp, step.page_table, seq, pos)
    mine = seq == 0
    for sizes in ([1] * new, [int(c) for c in torch.randint(1, 12, (new,), generator=g)]):
        parts, at = [], 0
        idx = torch.nonzero(mine).flatten()
        for c in sizes:
            if at >= new:
                break
            rows = idx[at:at + c]
            parts.append(ops.attention(q[rows], kp, vp, step.page_table, seq[rows], pos[rows]))
            at += c
        got = torch.cat(parts)
        assert torch.equal(got, whole[mine]), (request.node.name, sizes[:8],
                                               (got.float() - whole[mine].float()).abs().max())


@pytest.mark.parametrize("device", devices(CUDA_READY, CUDA_SKIP_REASON, simt=True))
def test_attention_rows_in_any_order_into_out_with_scale(request, device):
    """A step's tokens need not come sequence by sequence; out given is written and returned;
    an explicit scale is used."""
    dev = tensor_device(device)
    (q, kp, vp), step = _inputs(2, 32, 16, [(90, 3), (0, 2), (70, 1)], torch.bfloat16,
                                case_generator(request), device=dev, shuffle_rows=True)
    assert not torch.equal(step.token_seq.cpu(), step.token_seq.cpu().sort().values)
    out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    got = kernel_op(device, "attention")(q, kp, vp, step.page_table, step.token_seq,
                                         step.token_pos, 0.3, out=out)
    assert got is out
    _check(out, q, kp, vp, step, torch.bfloat16, request.node.name, scale=0.3)


@pytest.mark.parametrize("device", devices(CUDA_READY, CUDA_SKIP_REASON, simt=True))
def test_a_wrong_page_reads_poison(request, device):
    """The poison catches a kernel that reads the wrong page: the same step with one page
    table entry moved to a spare page gives NaN for the rows that read it, and only for them."""
    dev = tensor_device(device)
    (q, kp, vp), step = _inputs(2, 16, 4, [(9, 1), (20, 1)], torch.float32,
                                case_generator(request), device=dev)
    step.page_table[0, 1] = int(step.spare[0])   # sequence 0's keys 4 .. 7
    got = kernel_op(device, "attention")(q, kp, vp, step.page_table, step.token_seq,
                                         step.token_pos).cpu()
    assert got[0].isnan().all() and got[1].isfinite().all()


@pytest.mark.simt
def test_simt_cases_split_the_keys():
    """The simt cases reach what they are there for: rows split into several chunks (so the
    combine runs); while a prefill of 2048 rows and a single key need no split."""
    if not simt_ops.HAVE_SIMT:
        pytest.skip(simt_ops.SKIP)
    ws = simt_ops._simt.attention_workspace_bytes
    assert ws(2, 2, 128, 600) > 0 and ws(5, 2, 40, 300) > 0 and ws(2, 3, 64, 152) > 0
    assert ws(2, 2, 16, 82) > 0 and ws(2, 1, 7, 72) > 0 and ws(39, 1, 32, 301) > 0
    assert ws(1, 2, 16, 1) == 0                    # one key: nothing to split
    assert ws(128, 16, 128, 128) == 0              # 2048 rows fill the GPU as they are
    # Workspace bounded whatever the length: about 1024 blocks' partials at most.
    assert ws(1, 16, 128, 1 << 20) <= 2 * 1024 * (128 * 4 + 8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)
def test_cuda_attention_on_a_side_stream_into_out(request):
    """The model's call: metadata on the device, out given, a non-default current stream."""
    (q, kp, vp), step = _inputs(16, 128, 64, [(999, 1), (5, 1), (640, 1)], torch.bfloat16,
                                case_generator(request), device="cuda")
    out = torch.empty(q.shape, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.attention(q, kp, vp, step.page_table, step.token_seq, step.token_pos, out=out)
    stream.synchronize()
    assert got is out
    _check(out, q, kp, vp, step, torch.bfloat16, "side stream")


def test_attention_backend_reference_and_default_scale(request):
    (q, kp, vp), step = _inputs(2, 16, 4, [(3, 2)], torch.float32, case_generator(request))
    meta = (step.page_table, step.token_seq, step.token_pos)
    assert torch.equal(ops.attention(q, kp, vp, *meta, backend="reference"),
                       reference.attention(q, kp, vp, *meta))
    assert_close(ops.attention(q, kp, vp, *meta, scale=0.3),
                 reference.attention(q, kp, vp, *meta, 0.3))


def _error_args():
    (q, kp, vp), step = _inputs(4, 16, 4, [(5, 1), (2, 1)], torch.float32,
                                torch.Generator().manual_seed(7))
    return dict(q=q, k_pages=kp, v_pages=vp, page_table=step.page_table,
                token_seq=step.token_seq, token_pos=step.token_pos)


# The messages name the argument; the patterns are loose on the rest of the wording.
@pytest.mark.parametrize("change,msg", [
    pytest.param(lambda a: dict(page_table=a["page_table"].long()), "page_table",
                 id="page_table_dtype"),
    pytest.param(lambda a: dict(q=a["q"][None]), r"\bq\b", id="q_rank"),
    pytest.param(lambda a: dict(token_seq=a["token_seq"].long()), "token_seq",
                 id="token_seq_dtype"),
    # Position 40 is on page 10: the table holds 3 pages per sequence.
    pytest.param(lambda a: dict(token_pos=torch.tensor([5, 40], dtype=torch.int32)),
                 "token_pos", id="token_pos_past_the_table"),
    pytest.param(lambda a: dict(v_pages=a["v_pages"][:, :2].contiguous()), "v_pages",
                 id="v_pages_heads"),
    pytest.param(lambda a: dict(k_pages=a["k_pages"].double()), "k_pages", id="k_pages_dtype"),
])
def test_attention_argument_errors(change, msg):
    a = _error_args()
    a.update(change(a))
    assert a["page_table"].shape[1] == 3
    with pytest.raises(RuntimeError, match=msg):
        ops.attention(**a)
