"""The server's API breadth, with the official openai client: logprobs and top_logprobs,
echo with prompt logprobs (lm-eval's loglikelihood requests), n > 1 and lists of prompts
decoded together, the sampling extensions, and vLLM's /tokenize and /detokenize."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from qwen_fast import chat as chatml                          # noqa: E402
from qwen_fast.server import BackgroundServer, create_app     # noqa: E402
from server_helpers import RecordingEngine                    # noqa: E402

MODEL = "qwen-api"


@pytest.fixture(scope="module")
def srv(tiny_engine):
    engine = RecordingEngine(tiny_engine)
    with BackgroundServer(create_app(engine, model_name=MODEL)) as s:
        s.engine = engine
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield s


def _user(text):
    return [{"role": "user", "content": text}]


def test_chat_logprobs_streamed_and_not(srv, tiny_engine):
    kw = dict(model=MODEL, messages=_user("logprobs please"), max_tokens=6, temperature=0,
              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True, "return_token_ids": True})
    r = srv.client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    ids = r.choices[0].model_extra["token_ids"]
    assert len(content) == len(ids) == r.usage.completion_tokens == 6
    for tid, c in zip(ids, content):
        assert bytes(c.bytes) == tiny_engine.tokenizer.id_to_bytes(tid)
        assert c.logprob <= 0 and len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token                      # greedy: the most likely
        assert c.top_logprobs[0].logprob == c.logprob
        assert all(a.logprob >= b.logprob for a, b in zip(c.top_logprobs, c.top_logprobs[1:]))
    # Streamed: the same entries, spread over the chunks.
    chunks = list(srv.client.chat.completions.create(stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # Without the flag: none.
    r = srv.client.chat.completions.create(model=MODEL, messages=_user("x"), max_tokens=2)
    assert r.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(srv, tiny_engine):
    r = srv.client.completions.create(model=MODEL, prompt="legacy logprobs", max_tokens=5,
                                      temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    lp = r.choices[0].logprobs
    ids = r.choices[0].model_extra["token_ids"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.tokens == [tiny_engine.tokenizer.id_to_bytes(t).decode("utf-8", "replace") for t in ids]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok in top and top[tok] == l and 2 <= len(top) <= 3
        assert l == max(top.values())                                   # greedy


def test_echo_scores_the_prompt_like_the_engine(srv, tiny_engine):
    """lm-eval's loglikelihood request: echo, max_tokens 0, logprobs 1, temperature 0, a batch
    of prompts; each token's logprob given the ones before it."""
    prompts = ["The capital of France is Paris", "One two three four"]
    r = srv.client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True,
                                      logprobs=1, temperature=0, seed=1234)
    assert [c.index for c in r.choices] == [0, 1]
    for c, text in zip(r.choices, prompts):
        ids = tiny_engine.tokenizer.encode(text)
        want = tiny_engine.prompt_logprobs(ids, 1)
        assert c.text == text and c.finish_reason == "length"
        assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
        assert c.logprobs.token_logprobs[1:] == [w.logprob for w in want[1:]]
        assert len(c.logprobs.tokens) == len(ids)
    assert r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(len(tiny_engine.tokenizer.encode(p)) for p in prompts)
    # Token ids as the prompt, and echo with a generation after it.
    ids = tiny_engine.tokenizer.encode(prompts[1])
    r = srv.client.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, logprobs=0,
                                      temperature=0, extra_body={"ignore_eos": True})
    c = r.choices[0]
    gen = tiny_engine.generate(ids, max_new_tokens=3, temperature=0, ignore_eos=True)
    assert c.text == prompts[1] + gen.text
    assert len(c.logprobs.token_logprobs) == len(ids) + 3
    assert c.logprobs.token_logprobs[1:len(ids)] == [w.logprob for w in tiny_engine.prompt_logprobs(ids)[1:]]


def test_n_choices_and_prompt_lists_decode_together(srv):
    cl = srv.client
    kw = dict(model=MODEL, max_tokens=4, temperature=1.0, top_p=1.0, extra_body={"ignore_eos": True})
    # n choices with a seed: choice j is what seed + j gives alone.
    r = cl.completions.create(prompt="n choices", n=3, seed=7, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [cl.completions.create(prompt="n choices", seed=7 + j, **kw).choices[0].text for j in range(3)]
    assert [c.text for c in r.choices] == alone
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == cl.completions.create(prompt="n choices", seed=1, **kw).usage.prompt_tokens
    # A list of prompts x n: prompt i's choices at i*n .. i*n + n - 1.
    r = cl.completions.create(prompt=["first", "second one"], n=2, seed=11, **kw)
    want = [cl.completions.create(prompt=p, seed=11 + j, **kw).choices[0].text
            for p in ("first", "second one") for j in range(2)]
    assert [c.text for c in r.choices] == want
    # The engine saw them as one submission of 4 sequences, all in the batch at once.
    reqs = [rec.request for rec in srv.engine.recorded[-8:-4]]
    assert all(rec.result.finish_reason == "length" for rec in srv.engine.recorded[-8:-4])
    assert max(r.t_admitted for r in reqs) < min(r.t_done for r in reqs)
    # Streamed: the chunks of every choice, assembled, are the non-streamed choices.
    chunks = list(cl.completions.create(prompt=["first", "second one"], n=2, seed=11, stream=True,
                                        stream_options={"include_usage": True}, **kw))
    texts = ["", "", "", ""]
    finish = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == want and finish == {0: "length", 1: "length", 2: "length", 3: "length"}
    assert chunks[-1].usage.completion_tokens == 16
    # Chat with n.
    r = cl.chat.completions.create(model=MODEL, messages=_user("hi"), n=2, seed=3, max_tokens=3,
                                   temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1]


def test_sampling_extensions_reach_the_engine(srv, tiny_engine):
    cl = srv.client
    r = cl.completions.create(model=MODEL, prompt="bias", max_tokens=4, temperature=0,
                              logit_bias={"1000": 100}, extra_body={"return_token_ids": True,
                                                                    "ignore_eos": True})
    assert r.choices[0].model_extra["token_ids"] == [1000] * 4
    for kw in (dict(presence_penalty=1.5, frequency_penalty=0.5), dict(extra_body={"min_p": 0.2})):
        r = cl.completions.create(model=MODEL, prompt="penalties", max_tokens=4, seed=5, **kw)
        assert r.choices[0].finish_reason in ("stop", "length")
    p = srv.engine.recorded[-1].request.params
    assert p.min_p == 0.2
    p = srv.engine.recorded[-2].request.params
    assert (p.presence_penalty, p.frequency_penalty) == (1.5, 0.5)


def test_tokenize_and_detokenize(srv, tiny_engine):
    url = srv.url
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "Hello world",
                                            "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tiny_engine.tokenizer.encode("Hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == tiny_engine.cfg.max_context
    assert "".join(body["token_strs"]) == "Hello world"
    r = httpx.post(url + "/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": "Hello world"}
    # Messages: the ChatML prompt a chat completion uses (its usage counts the same tokens).
    msgs = _user("count me")
    r = httpx.post(url + "/tokenize", json={"messages": msgs})
    chat = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert r.json()["count"] == chat.usage.prompt_tokens
    _, ids = chatml.make_context(tiny_engine.tokenizer, "count me", [],
                                 max_window_size=tiny_engine.generation_config.max_window_size)
    assert r.json()["tokens"] == ids
    for path, body, param in (("/tokenize", {"prompt": 5}, "prompt"),
                              ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/detokenize", {"tokens": "x"}, "tokens")):
        r = httpx.post(url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = httpx.post(url + "/tokenize", content=json.dumps({"prompt": "x"}), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_stop_token_logprob_is_the_last_entry(srv, tiny_engine):
    """A completion ended by a stop token lists that token's logprob last (not in the text):
    lm-eval's loglikelihood takes token_logprobs[ctxlen:-1], the last being the generated one."""
    eos = 151643
    prompt = "stop at once"
    n = len(tiny_engine.tokenizer.encode(prompt))
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0,
                  logit_bias={str(eos): 100})
        if stream:
            chunks = list(srv.client.completions.create(stream=True, **kw))
            tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
            text = "".join(c.text for ch in chunks for c in ch.choices)
            finish = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
        else:
            r = srv.client.completions.create(**kw)
            c = r.choices[0]
            tokens, text, finish = c.logprobs.tokens, c.text, [c.finish_reason]
            assert len(c.logprobs.token_logprobs) == n + 1 and c.logprobs.token_logprobs[-1] <= 0
        assert finish == ["stop"] and text == prompt
        assert len(tokens) == n + 1 and tokens[-1] == "<|endoftext|>"


def test_tokenizer_info_for_remote_tokenizers(srv, tiny_engine):
    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == tiny_engine.cfg.max_context
    # lm-eval's check: /tokenizer_info has eos_token, /tokenize answers this payload.
    r = httpx.post(srv.url + "/tokenize", json={"prompt": "test", "add_special_tokens": False})
    assert r.json()["tokens"] == tiny_engine.tokenizer.encode("test")
    assert httpx.post(srv.url + "/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"] == [151643]
    jinja2 = pytest.importorskip("jinja2")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    text = jinja2.Template(info["chat_template"]).render(messages=msgs, add_generation_prompt=True)
    _, ids = chatml.make_context(tiny_engine.tokenizer, "Bye", [("Hi", "Hello")],
                                 max_window_size=tiny_engine.generation_config.max_window_size)
    assert text == tiny_engine.tokenizer.decode(ids)


def test_speculation_per_request_and_by_default(srv, tiny_engine):
    """speculative / num_speculative_tokens / ngram_* reach the engine; the answer is the one
    without them; a server default (--speculative) applies unless a request says null; bad
    values are 400 naming the field."""
    cl = srv.client
    kw = dict(model=MODEL, prompt="one two three one two three one two", max_tokens=12,
              temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    plain = cl.completions.create(**kw)
    spec = cl.completions.create(**dict(kw, extra_body=dict(
        kw["extra_body"], speculative="ngram", num_speculative_tokens=3, ngram_max=2)))
    assert spec.choices[0].model_extra["token_ids"] == plain.choices[0].model_extra["token_ids"]
    p = srv.engine.recorded[-1].request.params
    assert (p.speculative, p.num_speculative_tokens, p.ngram_min, p.ngram_max) == ("ngram", 3, 1, 2)
    assert srv.engine.recorded[-1].request.spec is not None
    old = tiny_engine.default_params
    tiny_engine.default_params = old.replace(speculative="ngram", num_speculative_tokens=5)
    try:
        cl.completions.create(**kw)
        assert srv.engine.recorded[-1].request.params.num_speculative_tokens == 5
        assert srv.engine.recorded[-1].request.spec is not None
        cl.completions.create(**dict(kw, extra_body=dict(kw["extra_body"], speculative=None)))
        assert srv.engine.recorded[-1].request.spec is None
    finally:
        tiny_engine.default_params = old
    metrics = httpx.get(srv.url + "/metrics").text
    assert "qwen_fast_spec_decode_num_draft_tokens_total" in metrics
    assert "qwen_fast_spec_decode_num_accepted_tokens_total" in metrics
    for body, param in (({"speculative": "medusa"}, "speculative"),
                        ({"speculative": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                        ({"speculative": "ngram", "ngram_min": 4, "ngram_max": 2}, "ngram_min")):
        r = httpx.post(srv.url + "/v1/completions", json=dict(model=MODEL, prompt="x", max_tokens=2, **body))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
