"""The server in operation: metrics, request ids, overload control (a bounded queue, deadlines,
readiness), disconnects while queued, CORS, content types and option checks.

The engine here has one batch row, and its steps can be held at a gate (its runner waits for
an Event before each forward), so the queue's state is set by the test, not by timing."""
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families    # noqa: E402

from qwen_fast.errors import OverloadedError                            # noqa: E402
from qwen_fast.server import BackgroundServer, ServerOptions, create_app   # noqa: E402
from server_helpers import RecordingEngine                              # noqa: E402

MODEL = "qwen-ops"
KEY = "sk-ops"
ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {KEY}"}


class Gate:
    """Holds the engine's steps: while closed, the runner waits before every forward."""

    def __init__(self, engine):
        self.open_event = threading.Event()
        self.open_event.set()
        runner = engine._core.runner
        self.runner, self.execute = runner, runner.execute

        def gated(plan):
            self.open_event.wait(30)
            return self.execute(plan)
        runner.execute = gated

    def close(self):
        self.open_event.clear()

    def open(self):
        self.open_event.set()

    def restore(self):
        self.runner.execute = self.execute
        self.open_event.set()


@pytest.fixture(scope="module")
def engine1(tiny_ckpt):
    from qwen_fast import Engine
    eng = Engine.from_pretrained(tiny_ckpt, dtype="bfloat16", backend="reference", max_batch_size=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def gate(engine1):
    g = Gate(engine1)
    yield g
    g.restore()


@pytest.fixture(scope="module")
def ops(engine1, gate):
    engine = RecordingEngine(engine1)
    app = create_app(engine, model_name=MODEL, api_key=KEY, max_waiting=1)
    with BackgroundServer(app) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture()
def open_gate(gate):
    gate.open()
    yield gate
    gate.open()


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _body(**kw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    body.update(kw)
    return body


def _post(srv, path="/v1/chat/completions", timeout=30, headers=None, **kw):
    return httpx.post(srv.url + path, json=_body(**kw), headers={**AUTH, **(headers or {})},
                      timeout=timeout)


def _metrics(srv) -> dict:
    """{(sample name, frozenset(labels)): value} of GET /metrics (no key needed)."""
    r = httpx.get(srv.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _idle(engine):
    return _wait(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)


# ---- request ids and metrics -------------------------------------------------------------
def test_request_id_is_echoed_or_made(ops, open_gate):
    r = _post(ops, headers={"X-Request-Id": "trace-42.a:b_c"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42.a:b_c"
    made = _post(ops).headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    # Unsafe ids are replaced, not echoed (no header injection, no log spoofing).
    for bad in ("has space", "x" * 129, "semi;colon"):
        rid = _post(ops, headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert rid != bad and len(rid) == 32
    # Errors and unknown routes carry one too.
    r = httpx.get(ops.url + "/nope", headers={"X-Request-Id": "e1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "e1"
    r = httpx.post(ops.url + "/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "e2"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "e2"


def test_metrics_count_requests_tokens_and_latencies(ops, open_gate):
    engine = ops.engine
    assert _idle(engine)
    before = _metrics(ops)

    def get(m, name, **labels):
        return m.get((name, frozenset(labels.items())), 0.0)

    client = openai.OpenAI(base_url=ops.url + "/v1", api_key=KEY, max_retries=0)
    a = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "same"}],
                                       max_tokens=5, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt="a streamed prompt", max_tokens=4,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    usage_b = chunks[-1].usage
    # The same chat again: its prompt pages come from the prefix cache.
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "same"}],
                                       max_tokens=5, extra_body={"ignore_eos": True})
    assert _idle(engine)
    after = _metrics(ops)
    d = {k: after[k] - before.get(k, 0.0) for k in after}

    assert get(d, "qwen_fast_http_requests_total", endpoint="/v1/chat/completions", method="POST",
               status="200") == 2
    assert get(d, "qwen_fast_http_requests_total", endpoint="/v1/completions", method="POST",
               status="200") == 1
    prompt = a.usage.prompt_tokens + usage_b.prompt_tokens + c.usage.prompt_tokens
    assert get(d, "qwen_fast_prompt_tokens_total") == prompt
    assert get(d, "qwen_fast_generation_tokens_total") == 5 + 4 + 5
    assert get(d, "qwen_fast_request_finished_total", finish_reason="length") == 3
    assert get(d, "qwen_fast_time_to_first_token_seconds_count") == 3
    assert get(d, "qwen_fast_e2e_request_latency_seconds_count") == 3
    assert get(d, "qwen_fast_request_queue_time_seconds_count") == 3
    assert get(d, "qwen_fast_inter_token_latency_seconds_count") == 4 + 3 + 4
    assert 0 < get(d, "qwen_fast_inter_token_latency_seconds_sum") < get(
        d, "qwen_fast_e2e_request_latency_seconds_sum")
    # The prefix cache: the repeated chat found its first page(s).
    assert c.usage.prompt_tokens_details.cached_tokens > 0
    assert get(d, "qwen_fast_prefix_cache_hits_total") >= 1
    assert get(d, "qwen_fast_prefix_cache_hit_tokens_total") >= c.usage.prompt_tokens_details.cached_tokens
    # Gauges: the engine's state now.
    s = engine.stats()
    assert get(after, "qwen_fast_kv_pages_total") == s["kv_pages_total"] > 0
    assert get(after, "qwen_fast_kv_pages_used") + get(after, "qwen_fast_kv_pages_free") == s["kv_pages_total"]
    assert get(after, "qwen_fast_num_requests_running") == 0
    assert get(after, "qwen_fast_num_requests_waiting") == 0


# ---- overload control ----------------------------------------------------------------------
def _start_stream(srv, results, key, **kw):
    """A streamed chat on its own thread; results[key] = (status, [events]) when it ends."""
    def run():
        with httpx.stream("POST", srv.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                          json=_body(stream=True, **kw)) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
            results[key] = (r.status_code, events, dict(r.headers))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_queue_limit_refuses_with_503_and_ready_follows(ops, gate):
    engine = ops.engine
    assert _idle(engine)
    n0 = len(engine.recorded)
    assert httpx.get(ops.url + "/ready").status_code == 200
    gate.close()
    results = {}
    try:
        ta = _start_stream(ops, results, "a", max_tokens=3)
        assert _wait(lambda: engine.stats()["running"] == 1)           # a holds the one row
        tb = _start_stream(ops, results, "b", max_tokens=3)
        assert _wait(lambda: engine.stats()["waiting"] == 1)           # b waits: the limit
        # /ready says full (a load balancer stops sending), HEAD too.
        r = httpx.get(ops.url + "/ready")
        assert r.status_code == 503 and r.json()["status"] == "overloaded"
        assert r.headers["retry-after"] == "1"
        assert httpx.head(ops.url + "/ready").status_code == 503
        # c is refused before it is queued: 503, Retry-After, an OpenAI error object.
        r = _post(ops, max_tokens=3)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "server_overloaded" and err["type"] == "server_error"
        assert "max_waiting=1" in err["message"]
        assert len(engine.recorded) == n0 + 2                            # c never reached it
        # The official client sees a 503 (an InternalServerError) and, with retries, would wait.
        client = openai.OpenAI(base_url=ops.url + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 503
    finally:
        gate.open()
    ta.join(30)
    tb.join(30)
    for k in ("a", "b"):
        status, events, _ = results[k]
        assert status == 200 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    assert _idle(engine)
    assert httpx.get(ops.url + "/ready").json()["status"] == "ready"
    m = _metrics(ops)
    assert m[("qwen_fast_requests_rejected_total", frozenset({("reason", "overloaded")}))] >= 2


def test_under_load_nothing_accepted_is_lost_nothing_refused_started(ops, open_gate):
    """24 concurrent requests against one row and a queue of one: each is answered whole (200,
    finish_reason, usage) or refused with 503 before the engine saw it."""
    engine = ops.engine
    assert _idle(engine)
    n0 = len(engine.recorded)

    def one(i):
        kind = i % 3
        if kind == 2:          # streamed
            with httpx.stream("POST", ops.url + "/v1/completions", headers=AUTH, timeout=60,
                              json={"model": MODEL, "prompt": f"load {i}", "max_tokens": 6,
                                    "stream": True, "ignore_eos": True}) as r:
                if r.status_code != 200:
                    r.read()
                    return r.status_code, r.json()
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
                return 200, events
        path = "/v1/chat/completions" if kind == 0 else "/v1/completions"
        body = (_body(max_tokens=6, ignore_eos=True) if kind == 0 else
                {"model": MODEL, "prompt": f"load {i}", "max_tokens": 6, "ignore_eos": True})
        r = httpx.post(ops.url + path, json=body, headers=AUTH, timeout=60)
        return r.status_code, r.json()

    with ThreadPoolExecutor(24) as ex:
        outs = list(ex.map(one, range(24)))
    accepted = refused = 0
    for i, (status, body) in enumerate(outs):
        if status == 503:
            refused += 1
            assert body["error"]["code"] == "server_overloaded"
            continue
        assert status == 200, (i, body)
        accepted += 1
        if i % 3 == 2:
            assert body[-1] == "data: [DONE]"
            last = json.loads(body[-2][6:])
            assert last["choices"][0]["finish_reason"] == "length"
        else:
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == 6
    assert accepted >= 2 and accepted + refused == 24
    assert len(engine.recorded) == n0 + accepted                 # refused ones never started
    assert all(rec.result is not None and rec.result.finish_reason == "length"
               for rec in engine.recorded[n0:])
    print(f"under load: {accepted} accepted, {refused} refused")


def test_engine_max_waiting_is_atomic(engine1, gate):
    """Engine.generate/stream(max_waiting=...): refused with OverloadedError before queueing."""
    assert _idle(engine1)
    gate.close()
    try:
        a = engine1.stream("a", max_new_tokens=2, max_waiting=0)      # takes the free row
        with pytest.raises(OverloadedError, match="max_waiting=0"):
            engine1.stream("b", max_new_tokens=2, max_waiting=0)
        b = engine1.stream("b", max_new_tokens=2, max_waiting=1)
        assert engine1.stats()["waiting"] + engine1.stats()["running"] == 2
        from qwen_fast.errors import RequestError
        with pytest.raises(RequestError, match="max_waiting"):
            engine1.stream("c", max_waiting=-1)
    finally:
        gate.open()
    list(a), list(b)
    assert a.result.finish_reason in ("stop", "length") and b.result.finish_reason in ("stop", "length")


# ---- deadlines -----------------------------------------------------------------------------
def test_deadline_drops_a_queued_request_with_503_and_stops_a_running_one_with_504(ops, gate):
    engine = ops.engine
    assert _idle(engine)
    gate.close()
    results = {}
    try:
        ta = _start_stream(ops, results, "a", max_tokens=3)
        assert _wait(lambda: engine.stats()["running"] == 1)
        n0 = len(engine.recorded)
        t0 = time.monotonic()
        r = _post(ops, max_tokens=3, request_timeout=0.3)               # queued behind a
        assert time.monotonic() - t0 < 5
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "request_timeout" and r.headers["retry-after"] == "1"
        rec = engine.recorded[n0]
        assert rec.request.t_admitted is None                          # it never started
        assert _wait(lambda: engine.stats()["waiting"] == 0)           # and left the queue
    finally:
        gate.open()
    ta.join(30)
    assert results["a"][0] == 200
    # A running request past its deadline: 504, its generation stopped.
    gate_slow = threading.Event()
    orig = gate.runner.execute

    def slow(plan):
        gate_slow.wait(0.05)
        return orig(plan)
    gate.runner.execute = slow
    try:
        r = _post(ops, max_tokens=400, ignore_eos=True, request_timeout=0.5)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "request_timeout"
        rec = engine.recorded[-1]
        assert _wait(lambda: rec.result is not None and rec.result.finish_reason == "abort")
        # Streamed: an error event, then [DONE].
        results = {}
        t = _start_stream(ops, results, "s", max_tokens=400, ignore_eos=True, request_timeout=0.5)
        t.join(30)
        status, events, _ = results["s"]
        assert status == 200 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
    finally:
        gate.runner.execute = orig
    assert _idle(engine)
    r = _post(ops, request_timeout=0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_timeout"


# ---- disconnects ---------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_while_queued_leaves_the_queue_at_once(ops, gate, stream):
    """A client that goes away while its request waits for a batch row: the request leaves the
    engine's queue then, not after the running request frees the row."""
    engine = ops.engine
    assert _idle(engine)
    gate.close()
    results = {}
    try:
        ta = _start_stream(ops, results, "a", max_tokens=3)
        assert _wait(lambda: engine.stats()["running"] == 1)
        n0 = len(engine.recorded)
        if stream:
            client = httpx.Client(timeout=30)
            req = client.build_request("POST", ops.url + "/v1/chat/completions", headers=AUTH,
                                       json=_body(stream=True, max_tokens=3))
            resp = client.send(req, stream=True)
        else:                                             # a raw socket we can close under it
            body = json.dumps(_body(max_tokens=3)).encode()
            sock = socket.create_connection((ops.host, ops.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert _wait(lambda: engine.stats()["waiting"] == 1)
        if stream:                                        # the client goes away
            resp.close()
            client.close()
        else:
            sock.close()
        assert _wait(lambda: engine.stats()["waiting"] == 0, 5), "the queued request stayed"
        assert engine.stats()["running"] == 1             # a is still held at the gate
        rec = engine.recorded[n0]
        assert rec.request.t_admitted is None and rec.closed.is_set()
    finally:
        gate.open()
    ta.join(30)
    assert results["a"][0] == 200


# ---- routes, CORS, fields ----------------------------------------------------------------
def test_head_and_probes_need_no_key(ops):
    for path in ("/health", "/ready"):
        assert httpx.head(ops.url + path).status_code == 200
        assert httpx.get(ops.url + path).status_code == 200
    assert httpx.get(ops.url + "/metrics").status_code == 200


def test_cors_is_opt_in(ops, tiny_engine):
    pre = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(ops.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    app = create_app(tiny_engine, model_name=MODEL, allowed_origins=["http://page.example"])
    with BackgroundServer(app) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers=pre)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://page.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = httpx.options(srv.url + "/v1/chat/completions",
                          headers=dict(pre, Origin="http://evil.example"))
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.post(srv.url + "/v1/completions", headers={"Origin": "http://page.example"},
                       json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://page.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_unknown_fields_are_named_and_output_changing_ones_refused(ops, open_gate):
    r = _post(ops, user="u1", metadata={"k": "v"}, some_tracing_id="t")
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "some_tracing_id"
    assert "x-ignored-fields" not in _post(ops, user="u1").headers
    # Any name, even one a header cannot carry as it is (found by schemathesis: a 500 before).
    r = _post(ops, **{"é✳ x": 1, "a,b": 2})
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "a%2Cb,%C3%A9%E2%9C%B3%20x"
    for name, value in (("typical_p", 0.9), ("min_tokens", 3),
                        ("guided_json", {"type": "object"}), ("use_beam_search", True)):
        r = _post(ops, **{name: value})
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == name and err["code"] == "unsupported_parameter"


def test_max_completion_tokens_on_both_endpoints(ops, open_gate):
    client = openai.OpenAI(base_url=ops.url + "/v1", api_key=KEY, max_retries=0)
    r = client.completions.create(model=MODEL, prompt="count", max_tokens=50,
                                  extra_body={"max_completion_tokens": 3, "ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2
    r = _post(ops, path="/v1/completions", max_completion_tokens=0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


# ---- options, checked before anything loads ------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"api_key": "clé"}, "printable ASCII"),
    ({"api_key": "a b"}, "printable ASCII"),
    ({"max_waiting": -1}, "max_waiting"),
    ({"request_timeout": 0}, "request_timeout"),
    ({"allowed_origins": ["page.example"]}, "allowed_origins"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
])
def test_server_options_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        ServerOptions(**kw)


@pytest.mark.parametrize("args, option", [
    (["--port", "99999"], "--port"),
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--max-body-bytes", "0"], "--max-body-bytes"),
    (["--max-waiting", "-1"], "--max-waiting"),
    (["--api-key", "clé"], "--api-key"),
    (["--request-timeout", "-2"], "--request-timeout"),
    (["--allowed-origins", "nope"], "--allowed-origins"),
])
def test_cli_serve_checks_options_before_loading(tmp_path, args, option):
    """A bad option is reported, naming it, before the model is loaded: the model directory
    here does not exist, so a check made after loading would report that instead."""
    missing = tmp_path / "no-such-model"
    p = subprocess.run([sys.executable, "-m", "qwen_fast.cli", "serve", "--model", str(missing)]
                       + args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert option in p.stderr and "Traceback" not in p.stderr
    assert "no-such-model" not in p.stderr
