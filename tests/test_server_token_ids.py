"""The server's ``return_token_ids`` extension (qwen_fast/server.py): a completion's token ids,
whole, in the non-streamed choice and in the streamed chunk that has the finish_reason; the
same ids Engine.generate gives. benchmarks/bench_prefix.py (c) builds each chat turn's history
from them."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from qwen_fast.server import BackgroundServer, create_app     # noqa: E402

PROMPT = [9707, 11, 1879, 0, 42, 7, 1000, 2000]
PARAMS = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def url(tiny_engine):
    with BackgroundServer(create_app(tiny_engine, model_name="qwen-tiny")) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def expected(tiny_engine):
    return tiny_engine.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids


def _events(text: str):
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_whole_completion(url, expected):
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "return_token_ids": True,
                                                   **PARAMS}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == expected and len(expected) == 6
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, **PARAMS}, timeout=60)
    assert "token_ids" not in r.json()["choices"][0]


def test_streamed_completion(url, expected):
    body = {"prompt": PROMPT, "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True}, **PARAMS}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    events = _events(r.text)
    with_ids = [e for e in events if e["choices"] and "token_ids" in e["choices"][0]]
    assert len(with_ids) == 1
    assert with_ids[0]["choices"][0]["finish_reason"] == "length"
    assert with_ids[0]["choices"][0]["token_ids"] == expected
    assert events[-1]["usage"]["completion_tokens"] == 6
    r = httpx.post(url + "/v1/completions", json={**body, "return_token_ids": False}, timeout=60)
    assert not any(e["choices"] and "token_ids" in e["choices"][0] for e in _events(r.text))


def test_chat(url):
    body = {"messages": [{"role": "user", "content": "hi"}], "return_token_ids": True,
            "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["token_ids"]
    assert 1 <= len(ids) <= 4 and len(ids) == r.json()["usage"]["completion_tokens"]


def test_not_a_bool(url):
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "return_token_ids": "yes",
                                                   **PARAMS}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_token_ids"
