"""The API's bodies (qwen_fast/protocol.py): /openapi.json and /docs document them, and every
kind of response the server sends validates against its model (extra fields forbidden)."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from qwen_fast import api, protocol as P                        # noqa: E402
from qwen_fast.server import BackgroundServer, create_app       # noqa: E402

MODEL = "qwen-proto"


@pytest.fixture(scope="module")
def srv(tiny_engine):
    with BackgroundServer(create_app(tiny_engine, model_name=MODEL)) as s:
        yield s


def test_openapi_documents_the_bodies(srv):
    r = httpx.get(srv.url + "/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    comps = doc["components"]["schemas"]
    for path, model in P.REQUEST_MODELS.items():
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert set(comps[model.__name__]["properties"]) == set(model.model_fields)
    chat = comps["ChatCompletionRequest"]["properties"]
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert "messages" in comps["ChatCompletionRequest"]["required"]
    ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert ok["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert ok["200"]["content"]["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionChunk")
    assert ok["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    for name in ("ChatCompletion", "ChatCompletionChunk", "Completion", "ErrorResponse", "Usage",
                 "CompletionLogprobs", "TokenizeResponse"):
        assert name in comps
    assert doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"]["$ref"].endswith("/ModelList")
    r = httpx.get(srv.url + "/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()


def test_the_known_fields_are_the_models_fields():
    assert api._CHAT_FIELDS == set(P.ChatCompletionRequest.model_fields)
    assert api._COMPLETION_FIELDS == set(P.CompletionRequest.model_fields)
    assert not (api._REFUSED_EXTENSIONS & (api._CHAT_FIELDS | api._COMPLETION_FIELDS))


def _sse(r):
    return [json.loads(line[6:]) for line in r.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_every_response_matches_its_model(srv):
    url = srv.url
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "validate me"}],
            "max_tokens": 4, "n": 2, "seed": 1, "logprobs": True, "top_logprobs": 2,
            "return_token_ids": True}
    P.ChatCompletion.model_validate(httpx.post(url + "/v1/chat/completions", json=chat).json())
    with httpx.stream("POST", url + "/v1/chat/completions",
                      json=dict(chat, stream=True, stream_options={"include_usage": True})) as r:
        chunks = _sse(r)
    assert chunks and all(P.ChatCompletionChunk.model_validate(c) for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    comp = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3, "echo": True, "logprobs": 1,
            "return_token_ids": True}
    P.Completion.model_validate(httpx.post(url + "/v1/completions", json=comp).json())
    P.Completion.model_validate(httpx.post(url + "/v1/completions",
                                           json=dict(comp, max_tokens=0)).json())
    with httpx.stream("POST", url + "/v1/completions",
                      json=dict(comp, stream=True, stream_options={"include_usage": True})) as r:
        chunks = _sse(r)
    assert all(P.Completion.model_validate(c) for c in chunks)
    for bad in ({"messages": []}, {"messages": [{"role": "user", "content": "x"}], "n": 0}):
        r = httpx.post(url + "/v1/chat/completions", json=bad)
        assert r.status_code == 400
        P.ErrorResponse.model_validate(r.json())
    P.ErrorResponse.model_validate(httpx.get(url + "/nope").json())
    P.ModelList.model_validate(httpx.get(url + "/v1/models").json())
    P.ModelCard.model_validate(httpx.get(url + f"/v1/models/{MODEL}").json())
    P.TokenizeResponse.model_validate(httpx.post(url + "/tokenize", json={"prompt": "x"}).json())
    P.DetokenizeResponse.model_validate(httpx.post(url + "/detokenize", json={"tokens": [1]}).json())
    P.TokenizerInfo.model_validate(httpx.get(url + "/tokenizer_info").json())


def test_the_request_models_accept_what_the_server_accepts():
    """The documented models accept the bodies the tests send (and unknown fields)."""
    P.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "some_extension": 1, "logit_bias": {"5": -1}})
    P.CompletionRequest.model_validate({"prompt": [[1, 2], [3]], "n": 2, "echo": True, "max_tokens": 0})
    with pytest.raises(Exception):
        P.CompletionRequest.model_validate({"prompt": "x", "n": 65})
