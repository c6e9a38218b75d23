"""The model against an independent transcription of the release forward, and the KV cache
against full forwards: short prompts, dynamic NTK and logn past seq_length (32 in the tiny
config), alpha kept from prefill while decoding, per-row alpha in a batch."""
import pytest
import torch

from qwen_fast.config import ntk_alpha
from qwen_fast.model import KVCache

import hf_like


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151643, (n,), generator=g).tolist()


def _weights(engine):
    m = engine.model
    sd = {"transformer.wte.weight": m.wte, "transformer.ln_f.weight": m.ln_f, "lm_head.weight": m.lm_head}
    for i, L in enumerate(m.layers):
        sd.update({f"transformer.h.{i}.{k}": v for k, v in L.items()})
    return sd


def _decode_all(engine, ids, n_prefill):
    """Prefill n_prefill tokens, then feed the rest one at a time; logits at every position."""
    m = engine.model
    cache = KVCache(m.cfg, 1, len(ids), m.dtype)
    out = [m.forward(torch.tensor([ids[:n_prefill]]), cache, all_logits=True)[0]]
    for t in ids[n_prefill:]:
        out.append(m.forward(torch.tensor([[t]]), cache))
    return torch.cat(out).float()


def test_ntk_alpha_table():
    assert [ntk_alpha(n, 8192) for n in (1, 8192, 8193, 16384, 16385, 32768)] == [1, 1, 3, 3, 7, 7]


@pytest.mark.parametrize("n", [1, 9, 32, 33, 50, 70], ids=lambda n: f"len{n}")
def test_full_forward_matches_release_transcription_fp32(tiny_engine_fp32, n):
    e = tiny_engine_fp32
    ids = _ids(n, seed=n)
    got = e.logits(ids)
    want = hf_like.forward(e.cfg, _weights(e), ids).float()
    assert got.shape == (n, e.cfg.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [9, 50], ids=lambda n: f"len{n}")
def test_full_forward_matches_release_transcription_bf16(tiny_engine, n):
    e = tiny_engine
    ids = _ids(n, seed=n)
    got = e.logits(ids)
    want = hf_like.forward(e.cfg, _weights(e), ids).float()
    # Same ops in the same dtype; only GEMM blocking may differ: about one bf16 ulp of a logit.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n_prefill,total", [(1, 20), (7, 30), (40, 60)],
                         ids=["p1", "p7", "p40-ntk-logn"])
def test_prefill_then_decode_equals_full_forward(tiny_engine_fp32, n_prefill, total):
    e = tiny_engine_fp32
    ids = _ids(total, seed=total)
    assert ntk_alpha(n_prefill, 32) == ntk_alpha(total, 32)  # same alpha, so same maths
    full = e.logits(ids)
    inc = _decode_all(e, ids, n_prefill)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)


def test_prefill_then_decode_bf16(tiny_engine):
    e = tiny_engine
    ids = _ids(24, seed=3)
    full = e.logits(ids)
    inc = _decode_all(e, ids, 5)
    torch.testing.assert_close(inc, full, rtol=2e-2, atol=3e-2)
    assert (inc.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_alpha_is_chosen_at_prefill_and_kept_while_decoding(tiny_engine_fp32):
    """Prompt of 20 (alpha 1) decoded to 45 tokens: past seq_length=32 the release keeps alpha 1
    but applies logn; a fresh prefill of 45 tokens would use alpha 3."""
    e = tiny_engine_fp32
    ids = _ids(45, seed=11)
    inc = _decode_all(e, ids, 20)
    kept = hf_like.forward(e.cfg, _weights(e), ids, alpha=1).float()
    fresh = hf_like.forward(e.cfg, _weights(e), ids).float()
    torch.testing.assert_close(inc, kept, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(inc[32:], fresh[32:], rtol=1e-3, atol=1e-3)


def test_logn_changes_queries_past_seq_length(tiny_ckpt):
    """With logn off, logits past position 32 differ; before it they are the same."""
    from qwen_fast import Engine
    on = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference")
    off = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference")
    off.model.cfg.use_logn_attn = False
    ids = _ids(40, seed=5)
    off.model.cfg.use_dynamic_ntk = on.model.cfg.use_dynamic_ntk = False
    a, b = on.logits(ids), off.logits(ids)
    torch.testing.assert_close(a[:32], b[:32])
    assert not torch.allclose(a[32:], b[32:], rtol=1e-4, atol=1e-4)


def test_batch_rows_match_single_sequences_with_per_row_alpha(tiny_engine_fp32):
    e, m = tiny_engine_fp32, tiny_engine_fp32.model
    a, b = _ids(20, seed=1), _ids(40, seed=2)           # alpha 1 and alpha 3
    cache = KVCache(m.cfg, 2, 48, m.dtype)
    batch = torch.zeros(2, 40, dtype=torch.long)
    batch[0, :20], batch[1] = torch.tensor(a), torch.tensor(b)
    first = m.forward(batch, cache, num_new=[20, 40])
    assert cache.alpha == [1, 3] and cache.lengths == [20, 40]
    torch.testing.assert_close(first[0].float(), e.logits(a)[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[1].float(), e.logits(b)[-1], rtol=1e-4, atol=1e-4)
    # Decode only row 1 (row 0 has finished): row selection must hit the right cache slot.
    nxt = m.forward(torch.tensor([[7]]), cache, rows=[1])
    assert cache.lengths == [20, 41]
    want = _decode_all(e, b + [7], 40)[-1]
    torch.testing.assert_close(nxt[0].float(), want, rtol=1e-4, atol=1e-4)


def test_forward_rejects_bad_arguments(tiny_engine_fp32):
    m = tiny_engine_fp32.model
    cache = KVCache(m.cfg, 1, 4, m.dtype)
    with pytest.raises(ValueError, match="capacity"):
        m.forward(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="rows"):
        m.forward(torch.zeros(2, 1, dtype=torch.long), cache, rows=[0, 0])
    with pytest.raises(ValueError, match="num_new"):
        m.forward(torch.zeros(1, 2, dtype=torch.long), cache, num_new=[3])


def test_native_backend_matches_reference(tiny_ckpt):
    """backend='auto' swaps in the compiled rms_norm kernels: same logits as the reference."""
    from qwen_fast import Engine, ops
    if not ops.HAVE_C:
        pytest.skip(f"qwen_fast._C is not built: {ops.IMPORT_ERROR}")
    ids = _ids(40, seed=9)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 3e-2)):
        ref = Engine.from_pretrained(tiny_ckpt, dtype=dtype, backend="reference")
        nat = Engine.from_pretrained(tiny_ckpt, dtype=dtype, backend="auto")
        assert nat.model.ops["rms_norm"] is ops.rms_norm
        torch.testing.assert_close(nat.logits(ids), ref.logits(ids), rtol=tol, atol=tol)


def test_native_rope_and_swiglu_match_reference_fp32(tiny_ckpt):
    """backend='auto' also swaps in the compiled rotary_embedding and swiglu kernels: in fp32 the
    logits stay within 1e-5 (relative to the largest logit) of the reference backend's and greedy
    decoding picks the same tokens. 40 tokens pass seq_length (32): NTK alpha and logn are on."""
    from qwen_fast import Engine, ops
    if not ops.HAVE_C:
        pytest.skip(f"qwen_fast._C is not built: {ops.IMPORT_ERROR}")
    ref = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference")
    nat = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="auto")
    assert nat.model.ops["rotary_embedding"] is ops.rotary_embedding
    assert nat.model.ops["swiglu"] is ops.swiglu
    ids = _ids(40, seed=9)
    want = ref.logits(ids)
    scale = want.abs().max().item()
    torch.testing.assert_close(nat.logits(ids), want, rtol=1e-5, atol=1e-5 * scale)
    greedy = dict(max_new_tokens=24, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    assert nat.generate(ids, **greedy).token_ids == ref.generate(ids, **greedy).token_ids
