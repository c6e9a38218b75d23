"""The int8 KV cache's CUDA kernels (issue 19), run by the SIMT emulator against reference.py:
cuda::rotary_kv_cache_int8 (codes and scales bit-identical to reference.quantize_kv of what a
16-bit cache would hold, q_out bit-identical to the rotation, every other slot untouched) and
cuda::attention_int8 (reference.attention over the int8 cache, within the attention rule of
tests/test_attention.py), for G = 1 and 4 scales a slot, T = fp32, bf16 and fp16, packed steps
of several sequences (decode rows, prefill chunks after cached tokens, sequences sitting out),
page sizes that are not powers of two, rows long enough that the keys split into chunks (the
combine runs), and the kernels' scalar paths (unaligned q, k, v; unaligned pools).
"""
from __future__ import annotations

import pytest
import torch

import simt_ops
from kernel_cases import DTYPES, case_generator
from paged_cases import paged_step, poison_pools
from qwen_fast import reference
from test_rotary_embedding import _step_inputs
from tolerances import assert_close

pytestmark = [pytest.mark.simt, pytest.mark.skipif(not simt_ops.HAVE_SIMT, reason=simt_ops.SKIP)]

CODE_SENTINEL, SCALE_SENTINEL = 99, -5.0   # every pool slot before a step


def _int8_pools(num_pages, H, P, D, G, aligned=True):
    """k_pages, v_pages int8 (views one byte into a buffer when not aligned: the scalar path),
    k_scales, v_scales fp32, all sentinel-filled."""
    def pool():
        n = num_pages * H * P * D
        buf = torch.full((n + (0 if aligned else 1),), CODE_SENTINEL, dtype=torch.int8)
        return buf[len(buf) - n:].view(num_pages, H, P, D)
    return (pool(), pool(), torch.full((num_pages, H, P, G), SCALE_SENTINEL),
            torch.full((num_pages, H, P, G), SCALE_SENTINEL))


# ---- rotary_kv_cache_int8 ---------------------------------------------------------------------

# (id, H, D, R, P, [(cached, new) per sequence], layout of q, k, v, aligned pools)
ROPE_CASES = [
    ("decode_batch_P16", 2, 128, 128, 16, [(40, 1), (0, 1), (17, 1)], "qkv", True),
    ("prefill_chunks_P24", 2, 64, 64, 24, [(0, 9), (30, 7), (5, 0), (23, 2)], "qkv", True),
    ("partial_R32_unaligned_P5", 3, 64, 32, 5, [(3, 4), (11, 1)], "unaligned", True),
    ("R0_unaligned_pools_P1", 1, 64, 0, 1, [(2, 3)], "qkv", False),
]


def _scaled_inputs(args, gen):
    """q, k, v rows (per token and head) over five decades of magnitude, one k row all zeros,
    and one v row whose quotients are ties (x / 1 = 0.5, 1.5, 2.5, -0.5, -2.5: round half even)."""
    q, k, v = args[:3]
    mag = 10.0 ** torch.empty(q.shape[0], q.shape[1], 1).uniform_(-3, 2, generator=gen)
    for t in (q, k, v):
        t.copy_((t.float() * mag).to(t.dtype))
    k[0, 0] = 0
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5])
    v[-1, -1, :8] = ties.to(v.dtype)
    v[-1, -1, 8:] = 0


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in ROPE_CASES])
def test_rotary_kv_cache_int8_is_bit_exact(request, case, dtype, G):
    _, H, D, R, P, seqs, layout, aligned = case
    gen = case_generator(request)
    args, step = _step_inputs(H, D, R, P, seqs, layout, dtype, gen, "cpu")
    _scaled_inputs(args, gen)
    q, k, v, cos, sin = args[:5]
    pools = _int8_pools(step.num_pages, H, P, D, G, aligned)
    want_pools = tuple(p.clone() for p in pools)
    meta = (step.page_table, step.token_seq, step.token_pos)
    got = simt_ops.rotary_kv_cache_int8(q, k, v, cos, sin, *pools, *meta)
    want = reference.rotary_kv_cache(q, k, v, cos, sin, want_pools[0], want_pools[1], *meta,
                                     want_pools[2], want_pools[3])
    assert torch.equal(got, want), "q_out"
    for name, g, w in zip(("k_pages", "v_pages", "k_scales", "v_scales"), pools, want_pools):
        assert torch.equal(g, w), (name, (g.float() - w.float()).abs().max())
    # The step wrote its slots (the sentinels elsewhere are compared above).
    pages = step.page_table.long()[step.token_seq.long(), step.token_pos.long() // P]
    written = pools[2][pages, :, step.token_pos.long() % P]
    assert (written > 0).all()
    # The ties row: scale 1 (127 / 127), codes rounded half to even.
    pg, off = int(pages[-1]), int(step.token_pos[-1]) % P
    assert (pools[3][pg, -1, off] == 1.0).all()
    assert pools[1][pg, -1, off, :8].tolist() == [127, 0, 2, 2, 0, -2, 126, -126]
    # The zero key row: scale 1, codes 0.
    pg, off = int(pages[0]), int(step.token_pos[0]) % P
    assert (pools[2][pg, 0, off] == 1.0).all() and (pools[0][pg, 0, off] == 0).all()


def test_rotary_kv_cache_int8_refuses_bad_groups():
    args, step = _step_inputs(1, 64, 64, 4, [(0, 2)], "qkv", torch.float32,
                              torch.Generator().manual_seed(0), "cpu")
    meta = (step.page_table, step.token_seq, step.token_pos)
    for G in (3, 8):  # 64 % 3 != 0; 64 / 8 = 8 elements, not a multiple of 16
        pools = _int8_pools(step.num_pages, 1, 4, 64, G)
        with pytest.raises(RuntimeError, match="rotary_kv_cache_int8"):
            simt_ops.rotary_kv_cache_int8(*args[:5], *pools, *meta)
        with pytest.raises(RuntimeError, match="attention_int8"):
            simt_ops.attention_int8(args[0], *pools, *meta)


# ---- attention_int8 ---------------------------------------------------------------------------

# (id, H, D, P, [(cached, new) per sequence], Gs, q layout, aligned pools). The rows are long
# enough that their keys split into 64-key chunks (test_simt_int8_cases_split_the_keys).
ATTN_CASES = [
    ("decode_own_lengths_P16", 2, 128, 16, [(599, 1), (130, 1)], (1, 4), "qkv", True),
    ("mixed_chunk_3_and_decodes_P24", 2, 64, 24, [(200, 3), (299, 1), (7, 0), (0, 1)], (1, 4),
     "qkv", True),
    ("prefill_37_after_cached_P24", 1, 64, 24, [(100, 37), (300, 1), (0, 1)], (1, 4), "qkv",
     True),
    # q one element off 16 bytes (read element by element), then pools one byte off (the scalar
    # path: one code at a time).
    ("unaligned_q_P5", 2, 64, 5, [(150, 2), (70, 1)], (1, 4), "unaligned", True),
    ("unaligned_pools_P5", 2, 64, 5, [(130, 1), (70, 2)], (1, 4), "qkv", False),
    ("d256_P16", 1, 256, 16, [(100, 1)], (1, 4), "qkv", True),
    ("d16_one_key_P16", 2, 16, 16, [(0, 1), (80, 1)], (1,), "qkv", True),
]


def _attention_inputs(H, D, P, seqs, G, dtype, gen, layout, aligned):
    """q (a view of a qkv buffer, see test_attention.py), an int8 cache of random codes and
    positive scales whose unused slots have NaN scales (a kernel reading one gives NaN)."""
    step = paged_step(seqs, P, gen)
    N = step.n_tokens
    extra = 1 if layout == "unaligned" else 0
    q = torch.randn(N, 3 * H * D + extra, generator=gen)[:, extra:].to(dtype).view(N, 3, H, D)[:, 0]
    kp, vp, ks, vs = _int8_pools(step.num_pages, H, P, D, G, aligned)
    for codes, scales in ((kp, ks), (vp, vs)):
        codes.copy_(torch.randint(-127, 128, codes.shape, generator=gen, dtype=torch.int8))
        scales.copy_(torch.rand(scales.shape, generator=gen) * 0.03 + 0.002)
    poison_pools(ks, vs, step)
    return (q, kp, vp, ks, vs), step


def _attention_params():
    return [pytest.param(*c[1:5], G, *c[6:], id=f"{c[0]}-G{G}") for c in ATTN_CASES
            for G in c[5]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,D,P,seqs,G,layout,aligned", _attention_params())
def test_attention_int8_matches_reference(request, H, D, P, seqs, G, layout, aligned, dtype):
    """The attention rule (tests/test_attention.py) with the int8 cache: fp32 outputs within the
    tolerance table; 16-bit ones at most twice the reference's own error (computed in the low
    dtype) against the fp32 reference, and bit-identical in almost every element."""
    (q, kp, vp, ks, vs), step = _attention_inputs(H, D, P, seqs, G, dtype,
                                                  case_generator(request), layout, aligned)
    meta = (step.page_table, step.token_seq, step.token_pos)
    out = torch.empty(q.shape, dtype=dtype)
    got = simt_ops.attention_int8(q, kp, vp, ks, vs, *meta, out=out)
    assert got is out
    scales = dict(k_scales=ks, v_scales=vs)
    if dtype == torch.float32:
        assert_close(got, reference.attention(q, kp, vp, *meta, **scales), "attention")
        return
    exact = reference.attention(q.float(), kp, vp, *meta, **scales)
    rounded = reference.attention(q, kp, vp, *meta, **scales)
    assert exact.isfinite().all(), "the reference read a poisoned slot: the case is wrong"
    err_kernel = (got.float() - exact).abs().max().item()
    err_ref = (rounded.float() - exact).abs().max().item()
    assert err_kernel <= 2 * err_ref + 1e-7, (err_kernel, err_ref)
    assert (got == rounded).float().mean().item() >= 0.99


def test_attention_int8_scale_and_a_wrong_page_reads_poison(request):
    """An explicit scale is used; a page table entry moved to a spare page (NaN scales) gives NaN
    for the row that reads it, and only for it."""
    (q, kp, vp, ks, vs), step = _attention_inputs(2, 64, 4, [(9, 1), (20, 1)], 4, torch.float32,
                                                  case_generator(request), "qkv", True)
    meta = (step.page_table, step.token_seq, step.token_pos)
    assert_close(simt_ops.attention_int8(q, kp, vp, ks, vs, *meta, 0.3),
                 reference.attention(q, kp, vp, *meta, 0.3, k_scales=ks, v_scales=vs),
                 "attention")
    step.page_table[0, 1] = int(step.spare[0])
    got = simt_ops.attention_int8(q, kp, vp, ks, vs, *meta)
    assert got[0].isnan().all() and got[1].isfinite().all()


def test_simt_int8_cases_split_the_keys():
    """The attention cases reach the split and the combine (as test_attention.py's simt cases)."""
    ws = simt_ops._simt.attention_workspace_bytes
    for name, H, D, P, seqs, *_ in ATTN_CASES:
        n_tokens, max_keys = sum(n for _, n in seqs), max(c + n for c, n in seqs)
        assert ws(n_tokens, H, D, max_keys) > 0, name


# ---- both: a sequence prefilled in chunks, then decoded ---------------------------------------

@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_int8_cache_written_by_steps_then_read(request, dtype, G):
    """Steps as the engine runs them (two sequences: prefill chunks of 37 and 20 tokens, then
    chunks packed with decode rows, then decodes) write the cache through rotary_kv_cache_int8;
    the cache equals the reference's bit for bit after every step, and attention_int8 over it
    matches the reference's attention over the reference's cache."""
    gen = case_generator(request)
    H, D, P, R = 2, 64, 24, 64
    plan = [[(0, 37), (0, 20)], [(37, 30), (20, 1)], [(67, 1), (21, 1)], [(68, 1), (22, 1)]]
    table = torch.randperm(8, generator=gen).view(2, 4).to(torch.int32)  # 4 pages a sequence
    pools = _int8_pools(8, H, P, D, G)
    want = tuple(p.clone() for p in pools)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    for st in plan:
        seq = torch.tensor([s for s, (c, n) in enumerate(st) for _ in range(n)], dtype=torch.int32)
        pos = torch.tensor([p for c, n in st for p in range(c, c + n)], dtype=torch.int32)
        N = seq.numel()
        q, k, v = (2 * torch.randn(N, 3, H, D, generator=gen)).to(dtype).unbind(1)
        emb = torch.cat([pos.float()[:, None] * inv_freq] * 2, -1)
        cos, sin = emb.cos(), emb.sin()
        qr = simt_ops.rotary_kv_cache_int8(q, k, v, cos, sin, *pools, table, seq, pos)
        qw = reference.rotary_kv_cache(q, k, v, cos, sin, want[0], want[1], table, seq, pos,
                                       want[2], want[3])
        assert torch.equal(qr, qw) and all(torch.equal(a, b) for a, b in zip(pools, want))
        got = simt_ops.attention_int8(qr, *pools, table, seq, pos)
        ref = reference.attention(qw, want[0], want[1], table, seq, pos, k_scales=want[2],
                                  v_scales=want[3])
        # The fp32 reference's own error grows with these inputs' size (about 4e-6 here, past
        # the fp32 table's atol): both are measured against fp64 instead.
        exact = _attention_f64(qw, *want, table, seq, pos)
        err_ref = (ref.double() - exact).abs().max().item()
        # (the fp64 twin agrees with the reference: its rounding to the dtype, at most)
        assert err_ref <= (1e-5 if dtype == torch.float32 else 2**-8) * exact.abs().max().item()
        assert (got.double() - exact).abs().max().item() <= 2 * err_ref + 1e-7
        if dtype != torch.float32:
            assert (got == ref).float().mean().item() >= 0.99


def _attention_f64(q, k_pages, v_pages, k_scales, v_scales, page_table, token_seq, token_pos):
    """reference.attention over the int8 cache in fp64 (no rounding to q's dtype)."""
    P, D = k_pages.shape[2], q.shape[-1]
    kd = reference.dequantize_kv(k_pages, k_scales).double()
    vd = reference.dequantize_kv(v_pages, v_scales).double()
    out = torch.empty(q.shape, dtype=torch.float64)
    for s in token_seq.unique().tolist():
        rows = torch.nonzero(token_seq == s).flatten()
        pos = token_pos[rows].long()
        j = torch.arange(int(pos.max()) + 1)
        pages = page_table[s].long()[j // P]
        keys, values = kd[pages, :, j % P], vd[pages, :, j % P]           # [n, H, D]
        scores = torch.einsum("rhd,nhd->rhn", q[rows].double(), keys) * D ** -0.5
        scores = scores.masked_fill((j[None, :] > pos[:, None])[:, None], float("-inf"))
        out[rows] = torch.einsum("rhn,nhd->rhd", scores.softmax(-1), values)
    return out
