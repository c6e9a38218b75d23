"""The int8 KV cache: the reference (quantize_kv's rounding, rotary_kv_cache writing codes and
scales, attention over them, with a stated error bound against the same attention over the
unquantized cache); the CPU kernels against it (rotary_kv_cache_int8's codes and scales bit for
bit, attention_int8 within the attention rule of test_attention.py, the same bits for a token
however the step is chunked, clear errors for bad scales); and the engine and the fused
DecodeLayer over an int8 cache."""
import math

import pytest
import torch

from kernel_cases import DTYPES, case_generator
from paged_cases import held_slots, paged_step
from qwen_fast import ops
from qwen_fast import reference as R
from tolerances import tolerance


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_quantize_kv_rounds_within_half_a_step(scale_dtype, group):
    x = torch.randn(64, 4, 128) * torch.logspace(-3, 1, 64)[:, None, None]
    x[3, 1] = 0
    q, s = R.quantize_kv(x.to(torch.bfloat16), scale_dtype, group)
    G = 1 if group is None else 128 // group
    assert q.dtype == torch.int8 and s.dtype == scale_dtype and s.shape == (64, 4, G)
    xf = x.to(torch.bfloat16).float().unflatten(-1, (G, -1))
    sf = s.float()
    assert (sf >= xf.abs().amax(-1) / 127).all()                # never clips
    # half a step, plus fp32's rounding of x / scale (|x / scale| <= 127: 127 * 2**-23 steps)
    slack = sf[..., None] * (0.5 + 127 * 2.0 ** -23)
    assert ((xf - sf[..., None] * q.float().unflatten(-1, (G, -1))).abs() <= slack).all()
    assert (s[3, 1] == 1).all() and (q[3, 1] == 0).all()
    assert torch.equal(R.dequantize_kv(q, s), (sf[..., None] * q.float().unflatten(-1, (G, -1))).flatten(-2))
    with pytest.raises(ValueError, match="must divide head_dim"):
        R.quantize_kv(x, scale_dtype, 48)


def _cache(int8, pages=6, H=2, P=16, D=64, G=1):
    dt = torch.int8 if int8 else torch.float32
    kp, vp = torch.zeros(pages, H, P, D, dtype=dt), torch.zeros(pages, H, P, D, dtype=dt)
    sc = (torch.zeros(pages, H, P, G), torch.zeros(pages, H, P, G)) if int8 else (None, None)
    return kp, vp, sc


@pytest.mark.parametrize("G", [1, 4])
def test_int8_cache_writes_codes_of_what_the_float_cache_holds_and_attention_reads_them(G):
    torch.manual_seed(0)
    H, D, P, n = 2, 64, 16, 40
    q, k, v = (torch.randn(n, H, D) for _ in range(3))
    ang = torch.arange(n, dtype=torch.float32)[:, None] * (1e-2 ** torch.linspace(0, 1, D // 2))[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    table = torch.tensor([[4, 1, 5]], dtype=torch.int32)
    seq, pos = torch.zeros(n, dtype=torch.int32), torch.arange(n, dtype=torch.int32)
    kf, vf, _ = _cache(False)
    k8, v8, (ks, vs) = _cache(True, G=G)
    qf = R.rotary_kv_cache(q, k, v, cos, sin, kf, vf, table, seq, pos)
    q8 = R.rotary_kv_cache(q, k, v, cos, sin, k8, v8, table, seq, pos, ks, vs)
    assert torch.equal(qf, q8)
    used = table[0].long()
    pg, off = used[pos.long() // P], pos.long() % P                     # the written positions
    for codes, scales, flt in ((k8, ks, kf), (v8, vs, vf)):
        want_q, want_s = R.quantize_kv(flt[pg, :, off], group=D // G)
        assert torch.equal(codes[pg, :, off], want_q) and torch.equal(scales[pg, :, off], want_s)
    # Attention over the int8 cache is attention over its dequantized values, exactly.
    out8 = R.attention(q8, k8, v8, table, seq, pos, k_scales=ks, v_scales=vs)
    deq_k, deq_v = R.dequantize_kv(k8, ks), R.dequantize_kv(v8, vs)
    assert torch.equal(out8, R.attention(q8, deq_k, deq_v, table, seq, pos))
    # Against the float cache: a key error of at most s_k / 2 an element (s_k the largest of the
    # key's G scales) moves score j by at most eps_j = D**-0.5 * sum|q| * s_kj / 2, so each
    # softmax weight by at most a factor exp(+-2 max eps); the output then moves by at most
    # (exp(2 eps) - 1) max|v| (weights) plus max s_v / 2 (values).
    outf = R.attention(qf, kf, vf, table, seq, pos)
    for i in range(n):
        keys = [(used[j // P], j % P) for j in range(i + 1)]
        s_k = torch.stack([ks[p, :, o].amax(-1) for p, o in keys])          # [i+1, H]
        s_v = torch.stack([vs[p, :, o].amax(-1) for p, o in keys])
        vmax = torch.stack([vf[p, :, o].abs().amax(-1) for p, o in keys]).amax(0)   # [H]
        eps = D ** -0.5 * qf[i].abs().sum(-1) * s_k.amax(0) / 2                     # [H]
        bound = (torch.exp(2 * eps) - 1) * vmax + s_v.amax(0) / 2
        err = (out8[i] - outf[i]).abs().amax(-1)
        assert (err <= bound + 1e-6).all(), (i, err, bound)
    # And the bound is not vacuous here: far below the values' own size.
    assert float((out8 - outf).abs().max()) < 0.05 * float(vf.abs().max())


def test_a_mixed_cache_is_refused():
    k8, v8, (ks, vs) = _cache(True)
    x = torch.randn(1, 2, 64)
    one = torch.ones(1, 64)
    args = (x, x, x, one, one * 0)
    idx = (torch.tensor([[0]], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
           torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="int8 cache needs k_scales and v_scales"):
        R.rotary_kv_cache(*args, k8, v8, *idx)
    kf, vf, _ = _cache(False)
    with pytest.raises(ValueError, match="int8 cache"):
        R.rotary_kv_cache(*args, kf, vf, *idx, ks, vs)
    assert math.isfinite(float(R.rotary_kv_cache(*args, k8, v8, *idx, ks, vs).sum()))


# ---- the CPU kernels ----------------------------------------------------------------------------

def _require_c():
    assert ops.HAVE_C, f"qwen_fast._C is not built: {ops.IMPORT_ERROR}"


def _rope_tables(N, R_dim, g):
    ang = torch.rand(N, R_dim // 2, generator=g) * 50
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


# (H, D, G, P, R, [(cached, new) per sequence]): odd page sizes, several sequences, a prefill
# chunk beside decode rows, a rotary dim below the head dim, groups of 16 and of 8.
ROTARY_CASES = [
    pytest.param(4, 128, 1, 16, 128, [(0, 37), (100, 1), (5, 1)], id="D128_G1_P16"),
    pytest.param(2, 128, 4, 5, 128, [(33, 11), (7, 1)], id="D128_G4_P5"),
    pytest.param(3, 64, 2, 64, 32, [(70, 3), (0, 2)], id="D64_G2_P64_R32"),
    pytest.param(2, 24, 3, 7, 24, [(10, 4), (0, 1)], id="D24_G3_P7"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,D,G,P,R_dim,seqs", ROTARY_CASES)
def test_rotary_kv_cache_int8_writes_the_reference_codes_and_scales(request, dtype, H, D, G, P,
                                                                    R_dim, seqs):
    """Codes and scales bit-identical to reference.rotary_kv_cache (quantize_kv of the rotated
    key rounded to q's dtype, and of the value), every other slot untouched, q out identical;
    values over six decades (the scales differ per position), an all-zero group (scale 1) and
    values on a half step (round half to even)."""
    _require_c()
    g = case_generator(request)
    step = paged_step(seqs, P, g)
    N = step.n_tokens
    mag = torch.logspace(-3, 3, N)[:, None, None, None]
    qkv = (torch.randn(N, 3, H, D, generator=g) * mag).to(dtype)
    qkv[0, 2, 0] = 0                                          # an all-zero value row: scale 1
    qkv[N - 1, 2, H - 1, :D // G] = torch.tensor([127.0, 0.5, 1.5, -2.5] * (D // G // 4)
                                                 + [0.5] * (D // G % 4)).to(dtype)
    q, k, v = qkv.unbind(1)
    cos, sin = _rope_tables(N, R_dim, g)
    pools = [torch.randint(-127, 128, (step.num_pages, H, P, D), dtype=torch.int8, generator=g)
             for _ in range(2)] + [torch.rand(step.num_pages, H, P, G, generator=g)
                                   for _ in range(2)]
    want = [t.clone() for t in pools]
    meta = (step.page_table, step.token_seq, step.token_pos)
    got_q = ops.rotary_kv_cache(q, k, v, cos, sin, pools[0], pools[1], *meta,
                                k_scales=pools[2], v_scales=pools[3])
    want_q = R.rotary_kv_cache(q, k, v, cos, sin, want[0], want[1], *meta, want[2], want[3])
    assert torch.equal(got_q, want_q)
    for name, got, ref in zip(("k_pages", "v_pages", "k_scales", "v_scales"), pools, want):
        assert torch.equal(got, ref), (name, (got.float() - ref.float()).abs().max())
    assert (pools[3] == 1).any()                               # the zero row's scale


def _int8_step(H, D, G, P, seqs, dtype, g, shuffle_rows=False):
    """q (a view of a qkv buffer), an int8 cache holding quantize_kv of random 16-bit keys and
    values with magnitudes that vary per position, and the step; the scales of every slot that
    holds no key are NaN, so that a kernel that reads one gives NaN."""
    step = paged_step(seqs, P, g, shuffle_rows=shuffle_rows)
    N = step.n_tokens
    q = torch.randn(N, 3, H, D, generator=g).to(dtype)[:, 0]
    cache = []
    for _ in range(2):
        x = torch.randn(step.num_pages, H, P, D, generator=g)
        x = x * torch.exp(torch.randn(step.num_pages, H, P, 1, generator=g))
        codes, scales = R.quantize_kv(x.to(dtype), group=D // G)
        scales.permute(0, 2, 1, 3)[~held_slots(step)] = float("nan")
        cache += [codes, scales]
    k8, ks, v8, vs = cache
    return q, k8, v8, ks, vs, step


def _check_int8(got, q, k8, v8, ks, vs, step, dtype, msg, scale=None):
    """test_attention's rule against the reference over the same int8 cache: fp32 within the
    tolerance table; 16-bit within twice the reference's own rounding error and bit-identical in
    almost every element."""
    meta = (step.page_table, step.token_seq, step.token_pos)
    sc = dict(k_scales=ks, v_scales=vs)
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous(), msg
    if dtype == torch.float32:
        # The table's fp32 atol is for values of about unit size; the output is a convex
        # combination of values, here up to ~30 in size (their magnitudes vary per position, so
        # that the scales matter), and fp32 reordering errors scale with them.
        vmax = float(R.dequantize_kv(v8, vs).nan_to_num(0.0).abs().max())
        tol = tolerance(torch.float32, "attention")
        torch.testing.assert_close(got, R.attention(q, k8, v8, *meta, scale, **sc),
                                   rtol=tol["rtol"], atol=tol["atol"] * max(1.0, vmax), msg=msg)
        return
    exact = R.attention(q.float(), k8, v8, *meta, scale, **sc)
    rounded = R.attention(q, k8, v8, *meta, scale, **sc)
    assert exact.isfinite().all(), "the reference read a poisoned slot: the case is wrong"
    err_kernel = (got.float() - exact).abs().max().item()
    err_ref = (rounded.float() - exact).abs().max().item()
    assert err_kernel <= 2 * err_ref + 1e-7, (msg, err_kernel, err_ref)
    assert (got == rounded).float().mean().item() >= 0.99, msg


# (H, D, G, P, [(cached, new) per sequence]): D = 128 and 64 with groups of 16 .. D run the
# AVX-512 kernel (on a CPU with AVX-512 BF16; bf16 q with D = 128 and G = 1 its VNNI variant),
# the others the portable one.
ATTENTION_CASES = [
    pytest.param(4, 128, 1, 16, [(299, 1), (0, 1), (17, 1), (150, 1)], id="decode_D128_G1_P16"),
    pytest.param(2, 128, 1, 5, [(40, 9), (3, 1), (130, 1)], id="chunk_D128_G1_P5"),
    pytest.param(2, 128, 4, 64, [(63, 1), (64, 1), (200, 1)], id="decode_D128_G4_P64"),
    pytest.param(2, 128, 8, 5, [(40, 9), (3, 1)], id="chunk_D128_G8_P5"),
    pytest.param(2, 128, 2, 24, [(50, 37), (10, 1), (40, 0), (200, 1)], id="mixed_D128_G2_P24"),
    pytest.param(3, 64, 1, 16, [(100, 5), (60, 1)], id="D64_G1_P16"),
    pytest.param(2, 64, 4, 7, [(30, 3), (0, 1)], id="D64_G4_P7"),
    pytest.param(2, 24, 3, 5, [(0, 5), (40, 5)], id="portable_D24_G3_P5"),
    pytest.param(2, 7, 1, 4, [(9, 2), (0, 1)], id="portable_D7_P4"),
    pytest.param(1, 256, 2, 16, [(70, 2)], id="portable_D256_G2"),
    pytest.param(2, 16, 1, 16, [(0, 1)], id="one_key"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,D,G,P,seqs", ATTENTION_CASES)
def test_attention_int8_matches_the_reference(request, dtype, H, D, G, P, seqs):
    _require_c()
    q, k8, v8, ks, vs, step = _int8_step(H, D, G, P, seqs, dtype, case_generator(request))
    got = ops.attention(q, k8, v8, step.page_table, step.token_seq, step.token_pos,
                        k_scales=ks, v_scales=vs)
    _check_int8(got, q, k8, v8, ks, vs, step, dtype, request.node.name)


def test_attention_int8_rows_in_any_order_into_out_with_scale(request):
    _require_c()
    q, k8, v8, ks, vs, step = _int8_step(2, 128, 1, 16, [(90, 3), (0, 2), (70, 1)],
                                         torch.bfloat16, case_generator(request),
                                         shuffle_rows=True)
    out = torch.empty(q.shape, dtype=q.dtype)
    got = ops.attention(q, k8, v8, step.page_table, step.token_seq, step.token_pos, 0.3,
                        out=out, k_scales=ks, v_scales=vs)
    assert got is out
    _check_int8(out, q, k8, v8, ks, vs, step, torch.bfloat16, request.node.name, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,D,G,P,cached,new", [(2, 128, 1, 64, 150, 45), (2, 128, 1, 7, 20, 23),
                                                (2, 128, 4, 5, 20, 23), (2, 24, 3, 16, 40, 19)])
def test_attention_int8_gives_a_token_the_same_bits_however_the_step_is_chunked(
        request, dtype, H, D, G, P, cached, new):
    """As test_attention's test of the same name (the prefix cache rests on it), over an int8
    cache: whole chunk, one token at a time, random chunks, packed with another sequence."""
    _require_c()
    g = case_generator(request)
    q, k8, v8, ks, vs, step = _int8_step(H, D, G, P, [(cached, new), (7, 1)], dtype, g)
    seq, pos, table = step.token_seq, step.token_pos, step.page_table
    sc = dict(k_scales=ks, v_scales=vs)
    whole = ops.attention(q, k8, v8, table, seq, pos, **sc)
    mine = seq == 0
    idx = torch.nonzero(mine).flatten()
    for sizes in ([1] * new, [int(c) for c in torch.randint(1, 12, (new,), generator=g)]):
        parts, at = [], 0
        for c in sizes:
            if at >= new:
                break
            rows = idx[at:at + c]
            parts.append(ops.attention(q[rows], k8, v8, table, seq[rows], pos[rows], **sc))
            at += c
        assert torch.equal(torch.cat(parts), whole[mine]), (request.node.name, sizes[:8])


def _int8_error_args(op):
    g = torch.Generator().manual_seed(3)
    q, k8, v8, ks, vs, step = _int8_step(4, 16, 1, 4, [(5, 1), (2, 1)], torch.float32, g)
    meta = dict(page_table=step.page_table, token_seq=step.token_seq, token_pos=step.token_pos)
    if op == "attention":
        return dict(q=q, k_pages=k8, v_pages=v8, k_scales=ks, v_scales=vs, **meta)
    N, H, D = q.shape
    k = torch.randn(N, 3, H, D, generator=g)
    one = torch.ones(N, D)
    return dict(q=k[:, 0], k=k[:, 1], v=k[:, 2], cos=one, sin=one * 0, k_pages=k8, v_pages=v8,
                k_scales=ks, v_scales=vs, **meta)


@pytest.mark.parametrize("op", ["attention", "rotary_kv_cache"])
@pytest.mark.parametrize("change,msg", [
    pytest.param(lambda a: dict(k_scales=None, v_scales=None),
                 "k_pages has dtype torch.int8.*needs k_scales and v_scales", id="no_scales"),
    pytest.param(lambda a: dict(v_scales=None), "needs both k_scales and v_scales, got only k_scales",
                 id="only_k_scales"),
    pytest.param(lambda a: dict(k_scales=a["k_scales"].expand(-1, -1, -1, 3).contiguous()),
                 r"k_scales must have shape \[\d+, 4, 4, G\].*G dividing head_dim 16",
                 id="G_not_dividing_D"),
    pytest.param(lambda a: dict(v_scales=a["v_scales"][:, :2].contiguous()),
                 "v_scales must have the shape of k_scales", id="v_scales_heads"),
    pytest.param(lambda a: dict(k_scales=a["k_scales"].half(), v_scales=a["v_scales"].half()),
                 "k_scales must have dtype torch.float32, got torch.float16", id="fp16_scales"),
    pytest.param(lambda a: dict(v_scales=a["v_scales"].transpose(1, 2).contiguous().transpose(1, 2)),
                 "v_scales must be contiguous", id="strided_scales"),
    pytest.param(lambda a: dict(k_pages=a["k_pages"].float(), v_pages=a["v_pages"].float()),
                 "k_pages must have dtype torch.int8 .k_scales and v_scales were given",
                 id="float_pages_with_scales"),
])
def test_int8_cache_argument_errors(op, change, msg):
    _require_c()
    a = _int8_error_args(op)
    a.update(change(a))
    with pytest.raises(RuntimeError, match=msg):
        getattr(ops, op)(**a)


# ---- the engine and the model's fused layers ------------------------------------------------------

@pytest.mark.parametrize("kv_group", [None, 16])
def test_the_fused_decode_layers_equal_the_python_loop_over_an_int8_cache(kv_group):
    """_C.DecodeLayer with an int8 cache (the scales passed through to rotary_kv_cache and
    attention) gives the Python layer loop's logits bit for bit: prefill, decode steps of some
    sequences, a step packing a chunk with decode rows. Head dim 64: the AVX-512 kernel."""
    _require_c()
    from qwen_fast import Engine
    from qwen_fast.testing import PagedBatch, tiny_config
    cfg = tiny_config(hidden_size=128, num_attention_heads=2, kv_channels=64)
    m = Engine.from_pretrained(load_format="dummy", config=cfg, dtype="bfloat16",
                               backend="auto").model
    outs = []
    for fused in (True, False):
        m.fused_decode = fused
        batch = PagedBatch(m, 5, 128, page_size=16, kv_dtype=torch.int8, kv_group=kv_group)
        prompt = list(range(1, 41))
        batch.forward([prompt, prompt[:20], prompt[:33], prompt[:5]])
        steps = [batch.forward([[5 + i], [6 + i], [7 + i]], rows=[0, 2, 3]) for i in range(3)]
        steps.append(batch.forward([[9], prompt[:17], [8]], rows=[0, 4, 1]))   # mixed step
        outs.append(torch.cat(steps))
        if fused:
            assert m._decode_layers is not None
            assert batch.pool.k[0].dtype == torch.int8 and batch.pool.k_scales[0].shape[-1] == \
                (1 if kv_group is None else 64 // kv_group)
    assert torch.equal(outs[0], outs[1])


def test_engine_with_an_int8_cache_native_equals_reference(tiny_ckpt):
    """fp32 through the compiled kernels (the fused layers) and through the reference backend,
    both over an int8 cache: the same greedy tokens, logits within fp32 reordering."""
    _require_c()
    from qwen_fast import Engine
    kw = dict(dtype="float32", kv_cache_budget=64 * 2**20, kv_cache_dtype="int8")
    nat = Engine.from_pretrained(tiny_ckpt, **kw)
    ref = Engine.from_pretrained(tiny_ckpt, backend="reference", **kw)
    try:
        assert nat.model._fused_layers() is not None and ref.model._fused_layers() is None
        ids = nat.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
        a, b = nat.logits(ids), ref.logits(ids)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        p = dict(max_new_tokens=8, temperature=0.0)
        assert nat.generate(ids, **p).token_ids == ref.generate(ids, **p).token_ids
    finally:
        nat.close()
        ref.close()


def test_engine_with_an_int8_cache(tiny_ckpt):
    from qwen_fast import Engine
    from qwen_fast.errors import ConfigError
    budget = 64 * 2**20
    base = Engine.from_pretrained(tiny_ckpt, dtype="float32", kv_cache_budget=budget)
    q8 = Engine.from_pretrained(tiny_ckpt, dtype="float32", kv_cache_budget=budget,
                                kv_cache_dtype="int8")
    try:
        assert q8.kv_pool.k[0].dtype == torch.int8 and q8.kv_pool.k_scales is not None
        assert base.kv_pool.k_scales is None
        # Same budget, more positions: fp32 pages 4 bytes an element, int8 1 + 4 / D.
        assert q8.kv_pool.num_pages >= 3 * base.kv_pool.num_pages
        ids = base.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
        a, b = base.logits(ids), q8.logits(ids)
        # Quantized, and close (the reference tests bound the attention itself; here the
        # rounding passes through the random layers, so a loose check of size).
        d = (a - b).abs()
        assert 0 < float(d.mean()) < 0.02 * float(a.std()) and float(d.max()) < 0.2 * float(a.std())
        # Decode through the batch path (the compiled kernels, fused layers): the int8 pages are
        # written and read step by step.
        p = dict(max_new_tokens=6, temperature=0.0)
        ga, gb = base.generate(ids, **p), q8.generate(ids, **p)
        assert len(gb.token_ids) == 6 and gb.token_ids[0] == ga.token_ids[0]
        # The prefix cache's keys name the format: the same prompt, different salts.
        sa, sb = base.scheduler._salt, q8.scheduler._salt
        r = type("R", (), {"alpha": 1.0})()
        assert sa(r) != sb(r) and b"int8" in sb(r)
    finally:
        base.close()
        q8.close()
    with pytest.raises(ConfigError, match="kv_cache_dtype must be 'auto'"):
        Engine.from_pretrained(tiny_ckpt, kv_cache_dtype="fp8")


def test_cli_takes_the_int8_cache(tiny_ckpt, capsys):
    from qwen_fast.cli import build_parser, main
    assert build_parser().parse_args(["serve", "--model", "m", "--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    assert main(["generate", "--model", str(tiny_ckpt), "--kv-cache-dtype", "int8",
                 "--max-new-tokens", "3", "--temperature", "0", "hello"]) == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8", "x"])


def test_release_use_cache_quantization_maps_to_the_int8_cache(tmp_path):
    """config.json's use_cache_quantization: true (the release's own int8 cache) -> our int8
    cache under kv_cache_dtype="auto"; a non-boolean value is a ConfigError naming it."""
    import json

    from qwen_fast import Engine
    from qwen_fast.config import QwenConfig
    from qwen_fast.errors import ConfigError
    from qwen_fast.testing import tiny_config, write_checkpoint
    d = write_checkpoint(tmp_path / "q", tiny_config(), dtype=torch.bfloat16)
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_cache_quantization"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    e = Engine.from_pretrained(d, kv_cache_budget=2**24)
    try:
        assert e.kv_pool.kv_dtype == torch.int8 and e.kv_pool.k_scales is not None
        assert len(e.generate("hello", max_new_tokens=3, temperature=0).token_ids) == 3
    finally:
        e.close()
    with pytest.raises(ConfigError, match="use_cache_quantization"):
        QwenConfig.from_dict(dict(cfg, use_cache_quantization="yes"))


# ---- the CUDA kernels (on a GPU only; the SIMT emulator runs them everywhere: test_simt_kv_int8) --

CUDA_READY = ops.HAVE_C and ops.build_info()["cuda"] and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA build of qwen_fast._C and a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_int8_kernels_match_the_reference(request, dtype):
    """rotary_kv_cache_int8 writes the reference's codes and scales bit for bit on the GPU too,
    and attention_int8 meets the attention rule, over the CPU cases the CUDA kernels take (a
    group of a multiple of 16 elements)."""
    g = case_generator(request)
    for p in ROTARY_CASES:
        H, D, G, P, R_dim, seqs = p.values
        if (D // G) % 16:
            continue
        step = paged_step(seqs, P, g)
        N = step.n_tokens
        q, k, v = (torch.randn(N, 3, H, D, generator=g) * 3).to(dtype).unbind(1)
        cos, sin = _rope_tables(N, R_dim, g)
        pools = [torch.zeros(step.num_pages, H, P, D, dtype=torch.int8) for _ in range(2)] + \
                [torch.ones(step.num_pages, H, P, G) for _ in range(2)]
        meta = (step.page_table, step.token_seq, step.token_pos)
        want_q = R.rotary_kv_cache(q, k, v, cos, sin, *pools[:2], *meta, *pools[2:])
        dev = [t.cuda() for t in pools]
        got_q = ops.rotary_kv_cache(q.cuda(), k.cuda(), v.cuda(), cos.cuda(), sin.cuda(),
                                    dev[0], dev[1], *(m.cuda() for m in meta),
                                    k_scales=dev[2], v_scales=dev[3])
        assert torch.equal(got_q.cpu(), want_q), p.id
        for got, ref in zip(dev, pools):
            assert torch.equal(got.cpu(), ref), p.id
    for p in ATTENTION_CASES:
        H, D, G, P, seqs = p.values
        if (D // G) % 16 or D > 256:
            continue
        q, k8, v8, ks, vs, step = _int8_step(H, D, G, P, seqs, dtype, g)
        got = ops.attention(q.cuda(), k8.cuda(), v8.cuda(), step.page_table.cuda(),
                            step.token_seq.cuda(), step.token_pos.cuda(),
                            max_keys=int(step.token_pos.max()) + 1,
                            k_scales=ks.cuda(), v_scales=vs.cuda())
        _check_int8(got.cpu(), q, k8, v8, ks, vs, step, dtype, p.id)
