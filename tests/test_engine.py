"""Engine: generate / stream / batch / chat / logits, stop logic and bad input, on the tiny
random-weight checkpoint."""
import numpy as np
import pytest
import torch

from qwen_fast import Engine
from qwen_fast.chat import make_context
from qwen_fast.errors import RequestError
from qwen_fast.tokenizer import EOD_ID, IM_END_ID, IM_START_ID

GREEDY = dict(temperature=0, repetition_penalty=1.0)


@pytest.fixture()
def fresh(tiny_ckpt):
    """An engine whose weights a test may edit."""
    return Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference")


def test_greedy_generation_is_consistent_with_full_forward(tiny_engine_fp32):
    e = tiny_engine_fp32
    prompt = e.tokenizer.encode("Hello world, this is")
    r = e.generate(prompt, max_new_tokens=12, **GREEDY)
    assert r.finish_reason in ("length", "stop") and r.prompt_tokens == len(prompt)
    seq = prompt + r.token_ids
    logits = e.logits(seq)
    for i, tok in enumerate(r.token_ids):
        assert logits[len(prompt) - 1 + i].argmax().item() == tok
    assert r.usage == {"prompt_tokens": len(prompt), "completion_tokens": len(r.token_ids),
                       "total_tokens": len(seq)}
    assert r.prefill_s > 0 and r.decode_s >= 0
    assert r.text == e.tokenizer.decode(r.token_ids)


def test_length_finish_and_text_prompt(tiny_engine):
    r = tiny_engine.generate("Once upon a time", max_new_tokens=5, ignore_eos=True, seed=0)
    assert r.finish_reason == "length" and len(r.token_ids) == 5


def test_seed_reproducible_and_stream_matches_generate(tiny_engine):
    e = tiny_engine
    a = e.generate("abc", max_new_tokens=16, seed=123, top_p=0.95, ignore_eos=True)
    b = e.generate("abc", max_new_tokens=16, seed=123, top_p=0.95, ignore_eos=True)
    assert a.token_ids == b.token_ids
    others = {tuple(e.generate("abc", max_new_tokens=16, seed=s, top_p=0.95, ignore_eos=True).token_ids)
              for s in range(4)}
    assert len(others) > 1
    deltas = list(e.stream("abc", max_new_tokens=16, seed=123, top_p=0.95, ignore_eos=True))
    assert "".join(deltas) == a.text
    assert all(d for d in deltas) and all("\ufffd" not in d for d in deltas if "\ufffd" not in a.text)


def test_stop_token_ids(tiny_engine_fp32):
    e = tiny_engine_fp32
    base = e.generate("The", max_new_tokens=10, ignore_eos=True, **GREEDY)
    stop = base.token_ids[3]
    first = base.token_ids.index(stop)
    r = e.generate("The", max_new_tokens=10, stop_token_ids=[stop], **GREEDY)
    assert r.finish_reason == "stop" and r.stop_reason == stop
    assert r.token_ids == base.token_ids[:first]


def test_stop_strings_truncate_and_are_never_streamed(tiny_engine_fp32):
    e = tiny_engine_fp32
    base = e.generate("x", max_new_tokens=24, ignore_eos=True, **GREEDY)
    text = base.text
    assert len(text) > 6
    stop = text[len(text) // 2: len(text) // 2 + 3]
    want = text[:text.find(stop)]
    r = e.generate("x", max_new_tokens=24, ignore_eos=True, stop=[stop, "\x00never"], **GREEDY)
    assert (r.text, r.finish_reason, r.stop_reason) == (want, "stop", stop)
    deltas = list(e.stream("x", max_new_tokens=24, ignore_eos=True, stop=stop, **GREEDY))
    assert "".join(deltas) == want


def _make_greedy_pick(engine, token_id):
    """Wrap the model so that token_id has the largest logit at every step."""
    forward = engine.model.forward

    def biased(*args, **kwargs):
        out = forward(*args, **kwargs).clone()
        out[..., token_id] = out.max() + 10
        return out
    engine.model.forward = biased


def test_eos_stops_unless_ignored(fresh):
    _make_greedy_pick(fresh, EOD_ID)
    r = fresh.generate("hi", max_new_tokens=4, **GREEDY)
    assert r.finish_reason == "stop" and r.stop_reason == EOD_ID and r.token_ids == []
    r = fresh.generate("hi", max_new_tokens=4, ignore_eos=True, **GREEDY)
    assert r.finish_reason == "length" and len(r.token_ids) == 4


def test_chat_stops_at_im_end_and_builds_history(fresh):
    _make_greedy_pick(fresh, IM_END_ID)
    resp, hist = fresh.chat("你好", **GREEDY)
    assert resp == "" and hist == [("你好", "")]
    resp2, hist2 = fresh.chat("again", history=hist, **GREEDY)
    assert hist2 == [("你好", ""), ("again", "")]
    assert hist == [("你好", "")]                     # the input history is not modified


def test_chat_prompt_layout_and_stream(tiny_engine_fp32):
    e = tiny_engine_fp32
    hist = [("hi", "hello there")]
    resp, new_hist = e.chat("how are you?", history=hist, max_new_tokens=8, seed=1)
    assert new_hist[:-1] == hist and new_hist[-1] == ("how are you?", resp)
    streamed = "".join(e.chat_stream("how are you?", history=hist, max_new_tokens=8, seed=1))
    assert streamed.strip() == resp
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "how are you?"}]
    resp2, _ = e.chat(msgs, max_new_tokens=8, seed=1)
    assert resp2 == resp


def test_chat_prompt_ids_match_spec(tiny_engine):
    _, ids = make_context(tiny_engine.tokenizer, "你好", [], system="You are a helpful assistant.")
    assert ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644,
                   872, 198, 108386, 151645, 198, 151644, 77091, 198]


def test_batch_generation_matches_single_requests(tiny_engine_fp32):
    e = tiny_engine_fp32
    prompts = ["a", "The quick brown fox jumps over", "1 2 3"]
    single = [e.generate(p, max_new_tokens=6, ignore_eos=True, **GREEDY) for p in prompts]
    batch = e.generate(prompts, max_new_tokens=6, ignore_eos=True, **GREEDY)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    ids_batch = e.generate([e.tokenizer.encode(p) for p in prompts], max_new_tokens=6,
                           ignore_eos=True, **GREEDY)
    assert [r.token_ids for r in ids_batch] == [r.token_ids for r in single]


def test_batch_rows_finish_independently(tiny_engine_fp32):
    e = tiny_engine_fp32
    base = e.generate("zz", max_new_tokens=8, ignore_eos=True, **GREEDY)
    stop = base.token_ids[2]
    out = e.generate(["zz", "other prompt"], max_new_tokens=8, ignore_eos=True,
                     stop_token_ids=[stop], **GREEDY)
    assert out[0].finish_reason == "stop" and out[0].token_ids == base.token_ids[:base.token_ids.index(stop)]
    alone = e.generate("other prompt", max_new_tokens=8, ignore_eos=True, stop_token_ids=[stop], **GREEDY)
    assert out[1].token_ids == alone.token_ids


def test_logits_api(tiny_engine):
    out = tiny_engine.logits(tiny_engine.tokenizer.encode("score me"))
    assert out.shape == (2, 151936) and out.dtype == torch.float32


@pytest.mark.parametrize("call,exc,msg", [
    (lambda e: e.generate("", max_new_tokens=2), ValueError, "prompt is empty"),
    (lambda e: e.generate([1, 999999]), ValueError, "token ids must be integers in"),
    (lambda e: e.generate([0] * 40000), ValueError, "at most 32767 tokens"),
    (lambda e: e.generate("a", top_p=2), ValueError, "top_p"),
    (lambda e: e.generate("a", max_tokens=2), RequestError, "max_tokens"),
    (lambda e: e.chat(5), RequestError, "query must be a str"),
    (lambda e: e.chat([{"role": "user", "content": "x"}], history=[]), ValueError, "not both"),
    (lambda e: e.logits([]), RequestError, "token_ids is empty"),
])
def test_bad_requests(tiny_engine, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(tiny_engine)


@pytest.mark.parametrize("kw,msg", [
    (dict(backend="tensorrt"), "backend must be one of"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(device="bogus"), r"device must be 'cpu', 'cuda' or 'cuda:N', got 'bogus'"),
    (dict(device=None), "device must be"),
    (dict(device="meta"), "device type 'meta' is not supported"),
    (dict(device="cuda:99"), "cuda:99"),
    (dict(load_format="pickle"), "load_format must be"),
    (dict(config="qwen-1.8b-chat"), "config= is only used with load_format='dummy'"),
    (dict(kv_cache_budget=0), "kv_cache_budget must be"),
    (dict(kv_cache_budget="lots"), "kv_cache_budget must be"),
])
def test_from_pretrained_argument_errors(tiny_ckpt, kw, msg):
    from qwen_fast.errors import ConfigError
    with pytest.raises(ConfigError, match=msg):
        Engine.from_pretrained(tiny_ckpt, **kw)


def test_from_pretrained_path_and_seed_types():
    from qwen_fast.errors import ConfigError
    with pytest.raises(ConfigError, match="path must be a checkpoint directory"):
        Engine.from_pretrained(5)
    with pytest.raises(ConfigError, match="seed .* must be an integer"):
        Engine.from_pretrained(load_format="dummy", seed="x")


def test_generation_config_stop_words_and_tensor_batches(fresh):
    fresh.generation_config.stop_words_ids = [[IM_START_ID]]
    _make_greedy_pick(fresh, IM_START_ID)
    r = fresh.generate("hi", max_new_tokens=4, **GREEDY)
    assert (r.finish_reason, r.stop_reason) == ("stop", IM_START_ID)
    out = fresh.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=2, **GREEDY)
    assert len(out) == 2 and all(x.prompt_tokens == 3 for x in out)
    fresh.generation_config.stop_words_ids = [[1, 2]]
    with pytest.raises(ValueError, match="single-token stop words"):
        fresh.generate("hi", max_new_tokens=2)


# ---- prompt types: what is a prompt, what is a batch, and what is refused ------------------

def test_prompt_forms_give_the_same_ids(tiny_engine_fp32):
    import numpy as np
    e = tiny_engine_fp32
    ids = e.tokenizer.encode("one two three")
    want = e.generate(ids, max_new_tokens=3, **GREEDY).token_ids
    for form in (tuple(ids), [np.int64(t) for t in ids], np.array(ids, dtype=np.int32),
                 torch.tensor(ids), torch.tensor(ids, dtype=torch.int16)):
        assert e.generate(form, max_new_tokens=3, **GREEDY).token_ids == want
        assert "".join(e.stream(form, max_new_tokens=3, **GREEDY)) == e.tokenizer.decode(want)
    torch.testing.assert_close(e.logits(np.array(ids)), e.logits(ids))
    # Batches: a list or tuple of prompts, or a 2-D tensor/array.
    for batch in (("one two three", "one two three"), [ids, tuple(ids)], np.array([ids, ids]),
                  torch.tensor([ids, ids])):
        out = e.generate(batch, max_new_tokens=3, **GREEDY)
        assert [r.token_ids for r in out] == [want, want]
    # stop ids as an array too; an array of floats is still refused
    stop = want[1]
    for ids_form in (np.array([stop]), torch.tensor([stop])):
        assert e.generate(ids, max_new_tokens=3, stop_token_ids=ids_form, **GREEDY).token_ids == want[:want.index(stop)]
    with pytest.raises(RequestError, match="stop_token_ids must be a list"):
        e.generate(ids, stop_token_ids=np.array([1.5]))
    # params as a dict or a SamplingParams
    assert e.generate(ids, params={"max_new_tokens": 3, **GREEDY}).token_ids == want
    assert e.generate(ids, params=e.sampling_params(max_new_tokens=3, **GREEDY)).token_ids == want


@pytest.mark.parametrize("call,msg", [
    (lambda e: e.generate(None), "prompt must be a str, a list of token ids"),
    (lambda e: e.generate(b"bytes"), "prompt must be a str"),
    (lambda e: e.generate(bytearray(b"ab")), "prompt must be a str"),
    (lambda e: e.generate({1: 2}), "prompt must be a str"),
    (lambda e: e.generate({1, 2}), "prompt must be a str"),
    (lambda e: e.generate(3), "prompt must be a str"),
    (lambda e: e.generate([1, "a"]), r"prompt\[1\] must be a token id"),
    (lambda e: e.generate([True, 2]), r"prompt\[0\] must be a token id"),
    (lambda e: e.generate([1.0, 2.0]), r"prompt\[0\] must be a token id"),
    (lambda e: e.generate(["ok", b"x"]), r"prompt\[1\] must be a str"),
    (lambda e: e.generate(["ok", ""]), r"prompt\[1\] is empty"),
    (lambda e: e.generate([]), "prompt is empty"),
    (lambda e: e.generate(torch.tensor([1.0, 2.0])), "1-D integer tensor"),
    (lambda e: e.generate(torch.zeros(2, 2, 2, dtype=torch.long)), "1-D integer tensor"),
    (lambda e: e.stream(torch.tensor([[1, 2], [3, 4]])), "1-D integer tensor"),
    (lambda e: e.logits(torch.tensor([[1, 2], [3, 4]])), r"token_ids must be a 1-D integer tensor.*\(2, 2\)"),
    (lambda e: e.generate([-1]), r"token ids must be integers in \[0, 151936\)"),
    (lambda e: e.generate("a", params={"temperature": 0, "nope": 1}), r"unknown generation parameter\(s\) \['nope'\]"),
    (lambda e: e.generate("a", params=[("temperature", 0)]), "params must be a SamplingParams or a dict"),
    (lambda e: e.generate("a", params="greedy"), "params must be a SamplingParams or a dict"),
    (lambda e: e.chat(None), "query must be a str"),
    (lambda e: e.chat("hi", history="hello"), "history must be a list"),
    (lambda e: e.chat("hi", history=[("q",)]), "exactly 2 items"),
    (lambda e: e.chat("hi", system=None), "system must be str"),
    (lambda e: e.chat([{"role": "bot", "content": "x"}]), "unknown role"),
])
def test_bad_prompts_are_named(tiny_engine, call, msg):
    with pytest.raises(RequestError, match=msg):
        call(tiny_engine)


@pytest.mark.parametrize("kw,msg", [
    (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*32 - 1\]"),
    (dict(seed=2**32), "seed must be an integer"),
    (dict(seed=1.0), "seed must be an integer"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(repetition_penalty=-1e-45), "repetition_penalty"),
    (dict(stop_token_ids=[10**12]), "outside the vocabulary"),
    (dict(temperature=10**400), r"temperature must be a finite number >= 0 \(0 = greedy\), got 10{56}\.\.\.$"),
])
def test_refused_sampling_values_are_named(tiny_engine, kw, msg):
    with pytest.raises(RequestError, match=msg):
        tiny_engine.generate("a", max_new_tokens=2, **kw)


@pytest.mark.parametrize("kw", [
    dict(temperature=1e-38), dict(temperature=5e-324), dict(temperature=3.5e38),
    dict(temperature=1.7e308), dict(repetition_penalty=1e-45), dict(repetition_penalty=1.7e308),
    dict(repetition_penalty=5e-324), dict(repetition_penalty=5e-324, temperature=5e-324),
    dict(temperature=0, repetition_penalty=1e-45), dict(top_p=5e-324), dict(top_k=10**12),
    dict(seed=2**32 - 1), dict(max_new_tokens=10**30, stop_token_ids=list(range(151936))),
])
def test_extreme_accepted_values_work(tiny_engine, kw):
    """Every value validation accepts must work (they used to crash inside torch.multinomial)."""
    r = tiny_engine.generate("Hello", **{"max_new_tokens": 3, **kw})
    assert r.finish_reason in ("stop", "length")


def test_numpy_seeds_equal_int_seeds(tiny_engine):
    import numpy as np
    a = tiny_engine.generate("abc", max_new_tokens=5, seed=np.int64(9), ignore_eos=True)
    b = tiny_engine.generate("abc", max_new_tokens=5, seed=9, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_tiny_temperature_is_greedy_in_the_limit(tiny_engine_fp32):
    e = tiny_engine_fp32
    want = e.generate("limit", max_new_tokens=6, ignore_eos=True, temperature=0).token_ids
    for t in (1e-30, 1e-38, 5e-324):
        got = e.generate("limit", max_new_tokens=6, ignore_eos=True, temperature=t, seed=3).token_ids
        assert got == want, t


# ---- memory: KV pages are taken as positions are written; only a prompt that cannot fit is refused

def test_kv_cache_grows_with_use_not_with_max_new_tokens(tiny_ckpt):
    e = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference",
                               kv_cache_budget=2**30)
    _make_greedy_pick(e, EOD_ID)
    out = e.generate(["Hello"] * 32, max_new_tokens=10**9, **GREEDY)
    # Worst case 32 x 32767 positions; used: the 1-token prompts, one page each.
    assert all(r.finish_reason == "stop" for r in out)
    assert all(r.kv_cache_bytes == e.kv_pool.bytes_per_page for r in out)
    assert e.kv_pool.num_used == 0                  # every page given back


@pytest.mark.parametrize("page_size", [1, 7, 256])
def test_decoding_across_page_boundaries_matches_any_page_size(tiny_engine_fp32, page_size):
    """150 tokens from a 3-token prompt cross two page boundaries at 64 positions a page (3 pages
    held at the end); the same greedy tokens with pages of 1, 7 or 256 positions."""
    e = tiny_engine_fp32
    prompt = e.tokenizer.encode("a b c")
    r = e.generate(prompt, max_new_tokens=150, ignore_eos=True, **GREEDY)
    assert len(r.token_ids) == 150 and e.kv_pool.page_size == 64
    assert r.kv_cache_bytes == 3 * e.kv_pool.bytes_per_page
    other = Engine(e.model, e.tokenizer, e.generation_config, kv_page_size=page_size)
    try:
        assert other.generate(prompt, max_new_tokens=150, ignore_eos=True, **GREEDY).token_ids == r.token_ids
    finally:
        other.close()


def test_only_a_prompt_that_cannot_fit_the_pool_is_refused(tiny_ckpt):
    from qwen_fast.errors import CapacityError
    e = Engine.from_pretrained(tiny_ckpt, dtype="bfloat16", backend="reference",
                               kv_cache_budget=4 * 2**20)
    per_token = 2 * e.cfg.num_hidden_layers * e.cfg.hidden_size * 2        # 512 bytes
    assert e.kv_pool.capacity_tokens == 4 * 2**20 // per_token == 8192
    with pytest.raises(CapacityError, match=r"the prompt has 8200 tokens, which need 4.0 MiB of "
                                            r"KV cache; the engine's pool holds 8192 tokens \(4.0 MiB"):
        e.generate([[1] * 8200, [2] * 3], max_new_tokens=1)
    assert not e.scheduler.has_work()                           # all or none: nothing queued
    with pytest.raises(CapacityError, match="kv_cache_budget"):
        e.stream([5] * 9000)                                    # refused when called
    with pytest.raises(CapacityError, match="fp32 logits"):
        e.logits([1] * 8000)                                    # 8000 x 151936 x 4 bytes
    # max_new_tokens far past the pool is no reason to refuse: pages are taken as written.
    s = e.stream("Hello", max_new_tokens=10**9, ignore_eos=True, temperature=0)
    assert next(iter(s)) is not None
    s.close()
    with pytest.raises(ValueError, match="kv_cache_budget must be"):
        Engine(e.model, e.tokenizer, kv_cache_budget=-1)
    with pytest.raises(ValueError, match="holds no KV page"):
        Engine(e.model, e.tokenizer, kv_cache_budget=100)


def test_logits_are_computed_in_chunks_with_the_same_values(tiny_engine, monkeypatch):
    ids = list(range(100, 140))
    whole = tiny_engine.logits(ids)
    monkeypatch.setattr(type(tiny_engine.model), "LOGITS_CHUNK", 7)
    assert torch.equal(tiny_engine.logits(ids), whole)


def test_full_size_kv_cache_arithmetic():
    """qwen-spec §4: 2 x 24 x 2048 x 2 bytes = 192 KiB per token; 6 GiB at 32k."""
    from qwen_fast.config import QwenConfig
    from qwen_fast.kv_cache import bytes_per_token
    per = bytes_per_token(QwenConfig(), torch.bfloat16)
    assert per == 192 * 1024 and per * 32768 == 6 * 2**30


def test_chunked_prefill_of_a_batch_matches_whole_prefill(tiny_engine_fp32, monkeypatch):
    """A batch of long prompts is prefilled PREFILL_TOKENS positions at a time; the NTK alpha
    still comes from each whole prompt (40 tokens > seq_length 32: alpha 3)."""
    e = tiny_engine_fp32
    prompts = [list(range(1000, 1040)), list(range(2000, 2011)), list(range(3000, 3033))]
    whole = e.generate(prompts, max_new_tokens=5, ignore_eos=True, **GREEDY)
    monkeypatch.setattr(e.scheduler, "prefill_tokens", 12)    # 4 positions per sequence a step
    chunked = e.generate(prompts, max_new_tokens=5, ignore_eos=True, **GREEDY)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in whole]
    for ids, r in zip(prompts, chunked):                       # first token = full forward's
        assert e.logits(ids)[-1].argmax().item() == r.token_ids[0]


def test_reference_attention_bounds_its_scores(monkeypatch):
    from qwen_fast import reference
    g = torch.Generator().manual_seed(0)
    q = torch.randn(100, 4, 16, generator=g)                   # 50 tokens of each of 2 sequences
    kp, vp = torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 4, 16, 16, generator=g)
    table = torch.tensor([[3, 0, 6, 1], [2, 7, 5, 4]], dtype=torch.int32)
    seq = torch.tensor([0] * 50 + [1] * 50, dtype=torch.int32)
    pos = torch.cat([torch.arange(10, 60), torch.arange(3, 53)]).to(torch.int32)
    want = reference.attention(q, kp, vp, table, seq, pos)
    monkeypatch.setattr(reference, "ATTENTION_SCORES_BYTES", 4 * 4 * 60 * 7)   # 7 queries
    torch.testing.assert_close(reference.attention(q, kp, vp, table, seq, pos), want,
                               rtol=1e-6, atol=1e-6)


def test_a_stream_carries_its_result_once_exhausted(tiny_engine_fp32):
    e = tiny_engine_fp32
    want = e.generate("result please", max_new_tokens=7, ignore_eos=True, **GREEDY)
    s = e.stream("result please", max_new_tokens=7, ignore_eos=True, **GREEDY)
    assert s.result is None
    text = "".join(s)
    assert text == want.text and s.result is not None
    assert s.result.token_ids == want.token_ids and s.result.finish_reason == "length"
    assert s.result.usage == want.usage


@pytest.mark.parametrize("batch", [np.zeros((0, 5), dtype=np.int64), torch.zeros(0, 3, dtype=torch.long)],
                         ids=["numpy", "torch"])
def test_an_empty_2d_batch_is_a_request_error(tiny_engine_fp32, batch):
    from qwen_fast.errors import RequestError
    with pytest.raises(RequestError, match="empty batch"):
        tiny_engine_fp32.generate(batch, max_new_tokens=1)
