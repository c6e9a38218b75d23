"""The OpenAI-compatible server (qwen_fast/server.py), live: uvicorn on 127.0.0.1 in a thread,
the tiny checkpoint, driven by the official openai client (and raw httpx where a client would
not send the request: bad JSON, huge bodies, no key)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from qwen_fast import chat as chatml                          # noqa: E402
from qwen_fast.server import BackgroundServer, create_app     # noqa: E402
from server_helpers import RecordingEngine                    # noqa: E402

MODEL = "qwen-tiny"
KEY = "sk-test-key"
MAX_BODY = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tiny_engine):
    engine = RecordingEngine(tiny_engine)
    app = create_app(engine, model_name=MODEL, api_key=KEY, max_body_bytes=MAX_BODY)
    with BackgroundServer(app) as srv:
        srv.engine = engine
        yield srv
    assert not srv.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _user(text, system=None):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": text}]


def _chat_stream(client, **kw):
    """(first chunk, content deltas, finish_reason, usage) of a streamed chat completion."""
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    content = [c.choices[0].delta.content for c in chunks
               if c.choices and c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    return chunks[0], content, finish, usage


# ---- the happy paths -----------------------------------------------------------------------
def test_health_and_models(server, client):
    r = httpx.get(server.url + "/health")          # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.status_code == 404 and e.value.body["type"] == "invalid_request_error"


def test_usage_reports_the_prompt_tokens_the_prefix_cache_supplied(server, client, tiny_engine):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: 0 for a new prompt, all but the last
    token of a repeated one (its full pages and its tail; streamed usage too)."""
    tiny_engine.clear_prefix_cache()
    prompt = "The same long prompt, sent twice. " * 20
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    page = tiny_engine.kv_pool.page_size
    assert first.usage.prompt_tokens > page
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens


def test_chat(server, client, tiny_engine):
    msgs = _user("What is 2 + 2?", system="Answer briefly.")
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # The prompt is Engine.chat's ChatML prompt; the answer is Engine.chat's (which also strips
    # trailing whitespace; the server strips leading whitespace only, as a stream must).
    _, ids = chatml.make_context(tiny_engine.tokenizer, "What is 2 + 2?", [], system="Answer briefly.")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 6
    expected, _ = tiny_engine.chat(msgs, max_new_tokens=6, temperature=0)
    assert choice.message.content.strip() == expected
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 6


def test_chat_stream(server, client):
    msgs = _user("Tell me a story.")
    kw = dict(messages=msgs, max_tokens=7, temperature=0, seed=3)
    plain = client.chat.completions.create(model=MODEL, **kw)
    first, content, finish, usage = _chat_stream(client, stream_options={"include_usage": True}, **kw)
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    assert "".join(content) == plain.choices[0].message.content
    assert finish == [plain.choices[0].finish_reason]
    (u,) = usage
    assert u.prompt_tokens == plain.usage.prompt_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 7
    # Without include_usage: no usage chunk.
    _, content2, finish2, usage2 = _chat_stream(client, **kw)
    # The same text; how it is cut into chunks depends on how many tokens were ready when the
    # stream was written (timing), so the chunks themselves are not compared.
    assert "".join(content2) == "".join(content) and finish2 == finish and usage2 == []


def test_chat_history_and_sampling(client, tiny_engine):
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}]
    kw = dict(max_tokens=5, temperature=0.8, top_p=0.9, seed=11)
    a = client.chat.completions.create(model=MODEL, messages=msgs, extra_body={"top_k": 20}, **kw)
    b = client.chat.completions.create(model=MODEL, messages=msgs, extra_body={"top_k": 20}, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content     # same seed
    expected, _ = tiny_engine.chat(msgs, max_new_tokens=5, temperature=0.8, top_p=0.9, top_k=20, seed=11)
    assert a.choices[0].message.content.strip() == expected


def test_completions(client, tiny_engine):
    prompt = "Once upon a time"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    ref = tiny_engine.generate(prompt, max_new_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    # token ids as the prompt
    ids = tiny_engine.tokenizer.encode(prompt)
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == ref.text
    # streamed
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == [ref.finish_reason]
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    # a stop string cuts the text (and is not part of it), streamed or not
    cut = next(i for i in range(2, len(ref.text)) if ref.text[i].strip())
    stop = ref.text[cut:cut + 2]
    want = ref.text[:ref.text.find(stop)]
    r3 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert r3.choices[0].text == want and r3.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want


# ---- errors --------------------------------------------------------------------------------
def _error(exc_info, status):
    e = exc_info.value
    assert e.status_code == status, e
    assert set(e.body) == {"message", "type", "param", "code"}
    assert e.body["type"] == "invalid_request_error" and e.body["message"]
    return e.body


@pytest.mark.parametrize("kw, param", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
    (dict(n=65), "n"),
    (dict(seed=-1), "seed"),
    (dict(stop=["a"] * 17), "stop"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={"5": 300}), "logit_bias"),
    (dict(top_logprobs=3), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(extra_body={"min_p": 2}), "min_p"),
    (dict(extra_body={"top_k": -3}), "top_k"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages"),
    (dict(messages=[{"role": "tool", "content": "hi"}]), "messages"),
    (dict(messages=[{"role": "system", "content": "only a system message"}]), "messages"),
    (dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "messages"),
    (dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), "messages"),
    (dict(messages=[{"role": "user", "content": 42}]), "messages"),
    (dict(messages=[{"role": "user"}]), "messages"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_bad_parameters(client, kw, param, stream):
    kw = {"messages": _user("hi"), **kw}
    with pytest.raises(openai.BadRequestError) as e:
        r = client.chat.completions.create(model=MODEL, stream=stream, **kw)
        list(r) if stream else None
    assert _error(e, 400)["param"] == param


def test_completion_bad_parameters(client):
    for kw, param in ((dict(prompt=""), "prompt"), (dict(prompt=["a", 5]), "prompt"),
                      (dict(prompt=["a", ""]), "prompt"), (dict(prompt=[[]]), "prompt"),
                      (dict(prompt="x", temperature=-1), "temperature"), (dict(prompt=[10**9]), "prompt"),
                      (dict(prompt="x", max_tokens=0), "max_tokens"),
                      (dict(prompt="x", logprobs=21), "logprobs"), (dict(prompt="x", best_of=3), "best_of"),
                      (dict(prompt=["a"] * 33, n=2), "n"), (dict(prompt="x", suffix="y"), "suffix")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, **kw)
        assert _error(e, 400)["param"] == param, kw


def test_unknown_model(client):
    for call in (lambda: client.chat.completions.create(model="gpt-4o", messages=_user("hi")),
                 lambda: client.completions.create(model="davinci", prompt="hi")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert _error(e, 404)["code"] == "model_not_found"


def test_too_long(client):
    # A prompt longer than the context (32767 tokens): refused before any work.
    t0 = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * 33000, max_tokens=1)
    assert _error(e, 400)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_user("hello " * 33000), max_tokens=1)
    assert _error(e, 400)["code"] == "context_length_exceeded"
    # More tokens requested than the context holds.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_user("hi"), max_tokens=40000)
    body = _error(e, 400)
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10**30)
    assert _error(e, 400)["code"] == "context_length_exceeded"
    assert time.perf_counter() - t0 < 20


def test_raw_http_errors(server):
    url = server.url
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def check(r, status, code=None):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error"
        if code:
            assert err["code"] == code
        return err

    chat = url + "/v1/chat/completions"
    check(httpx.post(chat, content=b'{"messages": [', headers=auth), 400, "invalid_json")
    check(httpx.post(chat, content=b"\xff\xfe{", headers=auth), 400, "invalid_json")
    check(httpx.post(chat, content=b"[1, 2]", headers=auth), 400)
    check(httpx.post(chat, content=b"[" * 100000, headers=auth), 400)
    check(httpx.post(chat, content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                     headers=auth), 400)
    check(httpx.post(chat, json={"messages": _user("x"), "max_tokens": 1.5}, headers=auth), 400)
    check(httpx.post(chat, json={"messages": _user("x"), "stream": "yes"}, headers=auth), 400)
    check(httpx.post(chat, json={"messages": _user("x"), "stream_options": {"include_usage": True}},
                     headers=auth), 400)
    check(httpx.post(chat, json={"messages": _user("x"), "model": 7}, headers=auth), 400)
    # Bodies over max_body_bytes: 413, whether declared or not.
    big = json.dumps({"messages": _user("x" * MAX_BODY)}).encode()
    check(httpx.post(chat, content=big, headers=auth), 413, "request_too_large")
    check(httpx.post(chat, content=iter([big[:MAX_BODY], big[MAX_BODY:]]), headers=auth), 413)
    # Keys: missing, wrong, wrong scheme.
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        check(httpx.post(chat, json={"messages": _user("x")}, headers=headers), 401, "invalid_api_key")
        check(httpx.get(url + "/v1/models", headers=headers), 401, "invalid_api_key")
    # Unknown routes and methods (a 405 names the methods that are allowed).
    check(httpx.get(url + "/v1/nothing", headers=auth), 404)
    r = httpx.get(chat, headers=auth)
    check(r, 405)
    assert r.headers["allow"] == "POST"
    # Bodies that are not declared JSON: 415, before the key or the body is looked at.
    body = json.dumps({"messages": _user("x")}).encode()
    for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": ctype} if ctype else {})
        err = check(httpx.post(chat, content=body, headers=headers), 415, "unsupported_media_type")
        assert "application/json" in err["message"]
    r = httpx.post(chat, content=json.dumps({"messages": _user("x"), "max_tokens": 1}).encode(),
                   headers={"Authorization": f"Bearer {KEY}",
                            "Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_wrong_key_with_client(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=_user("hi"), max_tokens=1)
    _error(e, 401)


def test_engine_errors_mapped(tiny_engine):
    """Errors the Engine raises: CapacityError (here a prompt longer than its whole KV page pool
    of 64 positions) is a 400, a NumericalError (the model failed) a 500 server_error, streamed
    or not."""
    from qwen_fast import Engine
    from qwen_fast.errors import NumericalError

    small = Engine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.generation_config,
                   kv_cache_budget=64 * 512)        # one page of 64 positions of 512 bytes

    class Broken(RecordingEngine):
        def generate(self, *a, **k):
            raise NumericalError("logits are NaN")

        def streams(self, *a, **k):
            def gen():
                yield "x"
                raise NumericalError("logits are NaN")
            return [gen()]

    with BackgroundServer(create_app(small, model_name=MODEL)) as srv:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            cl.chat.completions.create(model=MODEL, messages=_user("hi " * 80), max_tokens=5)
        assert _error(e, 400)["code"] == "context_length_exceeded"
        assert "kv_cache_budget" in e.value.body["message"]
    with BackgroundServer(create_app(Broken(tiny_engine), model_name=MODEL)) as srv:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            cl.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 500 and e.value.body["type"] == "server_error"
        with pytest.raises(openai.APIError) as e:
            list(cl.chat.completions.create(model=MODEL, messages=_user("hi"), stream=True))
        assert e.value.body["type"] == "server_error" and "NaN" in e.value.body["message"]


# ---- load and disconnects ------------------------------------------------------------------
def test_concurrent_streams(server, client):
    """16 streaming clients at once, each with its own prompt and seed: every one completes with
    exactly what it gets when alone (greedy or seeded sampling)."""
    n = 16
    reqs = [dict(messages=_user(f"Client {i}: say something about the number {i}."), max_tokens=5,
                 seed=100 + i, temperature=0 if i % 2 == 0 else 0.9) for i in range(n)]
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(timeout=30)
            _, content, finish, _ = _chat_stream(client, **reqs[i])
            results[i] = ("".join(content), finish)
        except Exception as e:   # reported below
            errors.append((i, repr(e)))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and all(r is not None for r in results), errors
    elapsed = time.perf_counter() - t0
    for i, req in enumerate(reqs):            # the same requests, one at a time
        alone = client.chat.completions.create(model=MODEL, **req).choices[0]
        assert results[i] == (alone.message.content, [alone.finish_reason]), i
    assert len({text for text, _ in results}) > 1
    # ... and the server answers normally afterwards.
    r = client.chat.completions.create(model=MODEL, messages=_user("still there?"), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    print(f"16 concurrent streams: {elapsed:.1f} s")


def _aborted(rec):
    """The stream ended by being closed, not by running to its end (closing it makes the
    worker's next() stop at once, with finish_reason "abort")."""
    return rec.result is None or rec.result.finish_reason == "abort"


def _wait(pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_disconnect_stops_generation(server, client):
    engine = server.engine
    before = len(engine.recorded)
    stream = client.chat.completions.create(
        model=MODEL, messages=_user("Go on forever."), max_tokens=400, temperature=1.0, seed=5,
        stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    stream.close()                             # the client goes away mid-stream
    assert len(engine.recorded) == before + 1
    rec = engine.recorded[before]
    assert _wait(rec.closed.is_set, 10), "the server did not close the engine's stream"
    assert _aborted(rec) and rec.deltas < 100, rec.deltas
    # The engine is free: the next request is answered at once.
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=MODEL, messages=_user("next"), max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert time.perf_counter() - t0 < 10


def test_disconnect_while_waiting(server, client):
    """A stream whose client leaves while it waits for the engine (another stream holds it)
    is closed without generating more than one delta."""
    engine = server.engine
    before = len(engine.recorded)
    a = client.chat.completions.create(model=MODEL, messages=_user("first"), max_tokens=400,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(a))                              # a's role chunk: a is running
    b = client.chat.completions.create(model=MODEL, messages=_user("second"), max_tokens=400,
                                       stream=True, extra_body={"ignore_eos": True})
    assert _wait(lambda: len(engine.recorded) == before + 2, 10)
    b.close()
    time.sleep(0.3)
    a.close()
    rec_a, rec_b = engine.recorded[before:before + 2]
    assert _wait(lambda: rec_a.closed.is_set() and rec_b.closed.is_set(), 10)
    assert rec_b.deltas <= 1 and _aborted(rec_b) and _aborted(rec_a)


def test_disconnect_stops_a_non_streamed_completion(server):
    """A client waiting for a whole completion that goes away: its generation is cancelled."""
    engine = server.engine
    before = len(engine.recorded)
    body = json.dumps({"model": MODEL, "prompt": "never finish", "max_tokens": 3000,
                       "ignore_eos": True}).encode()
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert _wait(lambda: len(engine.recorded) == before + 1, 10)
        time.sleep(0.3)                        # generating now
    rec = engine.recorded[before]
    assert _wait(rec.closed.is_set, 10), "the server did not cancel the completion"
    assert _aborted(rec)


# ---- the command line ----------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve(tiny_ckpt):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_fast.cli", "serve", "--model", str(tiny_ckpt), "--port", str(port),
         "--backend", "reference", "--api-key", "k", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        assert _wait(up, 60) and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        cl = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in cl.models.list().data] == [tiny_ckpt.name]
        r = cl.chat.completions.create(model=tiny_ckpt.name, messages=_user("hi"), max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
