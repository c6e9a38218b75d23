"""The prefix cache (kv_cache.PagePool's index, scheduler.Scheduler's lookup and publication): a
prompt that starts like an earlier one (a chat's history, a shared system prompt) computes only
the rest, with the same greedy tokens as without the cache (fp32); pages are keyed by their
tokens and the NTK alpha; a partly written page is never published (a finished request's last
page is kept as a tail, whose computed positions a continuing prompt copies); cached pages are
evicted before anyone waits or is preempted."""
from __future__ import annotations

import threading

import pytest
import torch

from qwen_fast import Engine
from qwen_fast.chat import make_context
from qwen_fast.kv_cache import PagePool, bytes_per_token
from qwen_fast.request import Request
from qwen_fast.sampling import SamplingParams
from qwen_fast.scheduler import Scheduler
from qwen_fast.testing import tiny_config

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines():
    """fp32, the compiled kernels, and a seq_length of 4096 so that these prompts all share NTK
    alpha 1 (test_keys_include_the_ntk_alpha crosses the boundary on purpose)."""
    cfg = tiny_config(seq_length=4096, max_position_embeddings=4096)
    on = Engine.from_pretrained(load_format="dummy", config=cfg, dtype="float32", backend="auto")
    off = Engine(on.model, on.tokenizer, on.generation_config, prefix_caching=False)
    yield on, off
    off.close()


def _ids(n, first=1000):
    return list(range(first, first + n))


def test_a_longer_prompt_reuses_the_full_pages_of_an_earlier_one(engines):
    on, off = engines
    on.clear_prefix_cache()
    p = _ids(200)
    first = on.generate(p, max_new_tokens=8, **GREEDY)
    assert first.cached_tokens == 0
    second = on.generate(p + [7, 8, 9], max_new_tokens=8, **GREEDY)
    assert first.token_ids[0] != 7
    assert second.cached_tokens == 200                       # 3 full pages of 64, 8 of a tail
    assert second.token_ids == off.generate(p + [7, 8, 9], max_new_tokens=8, **GREEDY).token_ids
    same = on.generate(p, max_new_tokens=8, **GREEDY)        # all cached but the last token
    assert same.cached_tokens == 199 and same.token_ids == first.token_ids


def test_a_prefix_that_ends_mid_page_reuses_the_full_pages_and_the_tail(engines):
    on, off = engines
    on.clear_prefix_cache()
    on.generate(_ids(100), max_new_tokens=2, **GREEDY)       # computes 101: page 0, a tail of 37
    assert on.kv_pool.num_cached == 1 and on.kv_pool.num_tails == 1
    other = _ids(100)[:90] + _ids(40, first=5000)            # shares 90 tokens: 64 + 26
    r = on.generate(other, max_new_tokens=8, **GREEDY)
    assert r.cached_tokens == 90
    assert r.token_ids == off.generate(other, max_new_tokens=8, **GREEDY).token_ids


@pytest.mark.parametrize("sampling", [GREEDY, dict(temperature=0.9, top_p=0.9, seed=11,
                                                      ignore_eos=True)], ids=["greedy", "seeded"])
def test_multi_turn_chat_prefills_only_the_new_turn(engines, sampling):
    on, off = engines
    on.clear_prefix_cache()
    tok = on.tokenizer
    history, turns = [], ["Tell me about the sea. " * 6, "And the mountains? " * 6, "Why? " * 5]
    for i, q in enumerate(turns):
        _, ids = make_context(tok, q, history)
        r = on.generate(ids, max_new_tokens=12, **sampling)
        assert r.token_ids == off.generate(ids, max_new_tokens=12, **sampling).token_ids
        if i:
            assert r.cached_tokens >= prev_len                  # the whole previous prompt
        prev_len = len(ids)
        history.append((q, tok.decode(r.token_ids)))


def test_a_system_prompt_shared_by_concurrent_requests(engines):
    on, off = engines
    on.clear_prefix_cache()
    system = _ids(150, first=3000)
    on.generate(system + [1], max_new_tokens=1, **GREEDY)    # the system prompt, cached
    questions = [system + _ids(20, first=6000 + 100 * i) for i in range(4)]
    out = [None] * 4

    def run(i):
        out[i] = on.generate(questions[i], max_new_tokens=8, **GREEDY)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.cached_tokens for r in out] == [150] * 4       # 2 full pages, 22 of a tail
    assert [r.token_ids for r in out] == [off.generate(q, max_new_tokens=8, **GREEDY).token_ids
                                          for q in questions]
    assert on.kv_pool.num_used == 0                          # shared pages all given back


def test_keys_include_the_ntk_alpha():
    """tiny config: seq_length 32, so a 32-token prompt has alpha 1 and a 40-token one alpha 3:
    the longer prompt never reuses keys computed under the other alpha."""
    e = Engine.from_pretrained(load_format="dummy", config=tiny_config(), dtype="float32",
                               kv_page_size=8)
    off = Engine(e.model, e.tokenizer, e.generation_config, prefix_caching=False, kv_page_size=8)
    base = _ids(32)
    e.generate(base, max_new_tokens=1, **GREEDY)             # alpha 1: 4 pages published
    longer = base + _ids(8, first=9000)                      # alpha 3
    r = e.generate(longer, max_new_tokens=6, **GREEDY)
    assert r.cached_tokens == 0
    assert r.token_ids == off.generate(longer, max_new_tokens=6, **GREEDY).token_ids
    again = e.generate(base[:31] + [5], max_new_tokens=6, **GREEDY)   # alpha 1 again: reused
    assert again.cached_tokens == 24
    assert again.token_ids == off.generate(base[:31] + [5], max_new_tokens=6, **GREEDY).token_ids


def test_cached_pages_are_evicted_before_anyone_waits_or_is_preempted(tiny_ckpt):
    probe = Engine.from_pretrained(tiny_ckpt, dtype="float32")
    per = bytes_per_token(probe.cfg, probe.model.dtype)
    e = Engine.from_pretrained(tiny_ckpt, dtype="float32", kv_page_size=16,
                               kv_cache_budget=10 * 16 * per)            # 10 pages
    off = Engine(e.model, e.tokenizer, e.generation_config, prefix_caching=False, kv_page_size=16)
    for i in range(6):                                       # 6 x 3 full pages: evictions
        p = _ids(50, first=1000 + 100 * i)
        r = e.generate(p, max_new_tokens=4, **GREEDY)
        assert r.token_ids == off.generate(p, max_new_tokens=4, **GREEDY).token_ids
        assert e.kv_pool.num_used == 0 and e.kv_pool.num_cached <= 10
    assert e.kv_pool.evictions > 0 and e.scheduler.stats["preemptions"] == 0
    # the most recent prompt is still cached (3 pages and its tail), the first was evicted
    assert e.generate(_ids(50, first=1500), max_new_tokens=1, **GREEDY).cached_tokens == 49
    assert e.generate(_ids(50, first=1000), max_new_tokens=1, **GREEDY).cached_tokens == 0


def test_off_and_cleared():
    e = Engine.from_pretrained(load_format="dummy", config=tiny_config(), dtype="float32",
                               prefix_caching=False)
    e.generate(_ids(130), max_new_tokens=1, **GREEDY)
    assert e.generate(_ids(130), max_new_tokens=1, **GREEDY).cached_tokens == 0
    assert e.kv_pool.num_cached == 0
    on = Engine(e.model, e.tokenizer, e.generation_config)
    on.generate(_ids(130), max_new_tokens=1, **GREEDY)
    assert on.kv_pool.num_cached == 2 and on.kv_pool.num_tails == 1
    on.clear_prefix_cache()
    assert on.kv_pool.num_cached == 0 and on.kv_pool.num_tails == 0
    assert on.generate(_ids(130), max_new_tokens=1, **GREEDY).cached_tokens == 0


def test_a_request_cancelled_mid_prefill_publishes_no_partly_written_page():
    pool = PagePool(tiny_config(), 20, 16, torch.float32)
    sched = Scheduler(pool, prefill_chunk=40, prefill_tokens=40, prefix_caching=True)
    r = Request(_ids(100), SamplingParams(), 10)
    sched.add(r)
    plan = sched.schedule()                                  # 40 of 100 prompt tokens
    assert [(s.start, s.count) for s in plan.seqs] == [(0, 40)]
    sched.update(plan, {})
    assert pool.num_cached == 2                              # pages 0-1 full; page 2 has 8 of 16
    sched.abort(r)
    sched.schedule()                                         # r leaves, its pages go back
    assert r.finished and pool.num_cached == 2 and pool.num_used == 0 and pool.num_tails == 0
    again = Request(_ids(100), SamplingParams(), 10)
    sched.add(again)
    plan = sched.schedule()
    assert again.cached_tokens == 32 and [(s.start, s.count) for s in plan.seqs] == [(32, 40)]


def test_fp32_rows_are_invariant_so_a_cached_prefix_is_exact(engines):
    """fp32 on the CPU: every op gives a token the same bits however the step's tokens are
    batched or chunked (linear always runs our kernel in fp32; attention's blocks follow the
    pages), so a prompt's logits from one 200-token prefill, from chunks of 64 + 136, beside
    another sequence's tokens, and through the engine with its prefix cached, are equal bit for
    bit."""
    from qwen_fast.testing import PagedBatch
    on, off = engines
    m, ids = on.model, _ids(200, first=7000)
    one = PagedBatch(m, 1, 256, page_size=64).forward([ids])
    b = PagedBatch(m, 1, 256, page_size=64, seed=3)
    b.forward([ids[:64]])
    assert torch.equal(b.forward([ids[64:]]), one)
    mixed = PagedBatch(m, 2, 256, page_size=64).forward([_ids(37, first=20000), ids])
    assert torch.equal(mixed[1:], one)
    on.clear_prefix_cache()
    on.generate(ids[:150], max_new_tokens=1, **GREEDY)
    logits = {}
    for name, e in (("on", on), ("off", off)):
        forward = e.model.forward

        def record(*a, **k):
            out = forward(*a, **k)
            logits.setdefault(name, out.clone())
            return out
        e.model.forward = record
        try:
            r = e.generate(ids, max_new_tokens=1, **GREEDY)
        finally:
            del e.model.forward
        assert r.cached_tokens == (150 if name == "on" else 0)    # 128 + a tail of 22
    assert torch.equal(logits["on"], logits["off"]) and torch.equal(logits["on"], one)


@pytest.mark.parametrize("dtype,quant", [("bfloat16", "int4"), ("float16", "int8")])
def test_quantized_16_bit_rows_are_invariant_too(dtype, quant):
    """int4/int8 weights run our quant_linear at every row count (per row), and 16-bit attention
    gives a token the same bits in any chunk (bf16 x 128 through the tile kernel): a prompt whose
    first 170 tokens are cached, 128 in pages and 42 in a tail, gets the same logits bit for bit
    as with no cache."""
    cfg = tiny_config(hidden_size=256, num_attention_heads=2, kv_channels=128,
                      intermediate_size=1024, seq_length=4096, max_position_embeddings=4096)
    on = Engine.from_pretrained(load_format="dummy", config=cfg, dtype=dtype, quant=quant,
                                lm_head_quant=quant)
    off = Engine(on.model, on.tokenizer, on.generation_config, prefix_caching=False)
    ids = _ids(300)
    on.generate(ids[:170], max_new_tokens=1, **GREEDY)
    logits = {}
    for name, e in (("on", on), ("off", off)):
        forward = e.model.forward

        def record(*a, _name=name, _forward=forward, **k):
            out = _forward(*a, **k)
            logits.setdefault(_name, out.clone())
            return out
        e.model.forward = record
        try:
            r = e.generate(ids, max_new_tokens=1, **GREEDY)
        finally:
            del e.model.forward
        assert r.cached_tokens == (170 if name == "on" else 0)
    assert torch.equal(logits["on"], logits["off"])
    off.close()
    on.close()
