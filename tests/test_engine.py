"""Engine: generate / stream / batch / chat / logits, stop logic and bad input, on the tiny
random-weight checkpoint."""
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


def test_from_pretrained_argument_errors(tiny_ckpt):
    with pytest.raises(ValueError, match="backend must be one of"):
        Engine.from_pretrained(tiny_ckpt, backend="tensorrt")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Engine.from_pretrained(tiny_ckpt, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            Engine.from_pretrained(tiny_ckpt, device="cuda")


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
