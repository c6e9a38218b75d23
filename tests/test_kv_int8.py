"""The int8 KV cache's reference (issue 19 groundwork): quantize_kv's rounding, rotary_kv_cache
writing codes and scales, and attention over them, with a stated error bound against the same
attention over the unquantized cache."""
import math

import pytest
import torch

from qwen_fast import reference as R


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
        # Decode through the batch path: the int8 pages are written and read step by step.
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
