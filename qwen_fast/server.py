"""An OpenAI-compatible HTTP API over an Engine (FastAPI + uvicorn: ``pip install "qwen_fast[server]"``).

    qwen-fast serve --model Qwen-1_8B-Chat [--host 127.0.0.1] [--port 8000] [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="Qwen-1_8B-Chat", messages=[{"role": "user", "content": "Hi"}])

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id},
GET /health (never needs the key).

Design
------
* Only the Engine's public API is used (``generate``, ``stream``, ``sampling_params``,
  ``tokenizer``, ``cfg``, ``generation_config``), so that whatever scheduling the Engine does
  (calls taking turns today, continuous batching later) serves concurrent HTTP requests too.
* Chat prompts are built here with ``chat.make_context`` (the ChatML prompt ``Engine.chat``
  builds, history trimmed to ``max_window_size``) and generated with ``<|im_end|>`` and
  ``<|im_start|>`` as stop tokens, so a non-streamed answer comes from ``Engine.generate`` with
  its exact ``finish_reason`` and ``usage``. Leading whitespace of a chat answer is stripped,
  streamed or not, as ``Engine.chat_stream`` does (trailing whitespace is kept in both, so a
  streamed answer always equals the non-streamed one).
* Engine calls block, so they run in worker threads: a non-streamed request in starlette's
  thread pool; a stream in a thread of the server's own pool (``max_concurrency`` threads)
  that iterates the Engine's stream and hands each delta to the event loop through an
  asyncio.Queue. The response listens for the client's ``http.disconnect`` while it waits for
  deltas; on a disconnect (or a failed write, or the server shutting down) it tells the thread
  to stop, and the thread closes the Engine's stream after at most one more delta, which
  cancels the generation and frees the engine. A stream still queued for a thread is just
  dropped.
* Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``:
  400 for bad JSON, bad parameters and prompts that do not fit the context, 401 for a missing
  or wrong key, 404 for an unknown model or route, 413 for a body over ``max_body_bytes``; a
  500 only for a failure of the server or the model itself (``NumericalError``).

Parameters: ``temperature``, ``top_p``, ``max_tokens`` (chat: or ``max_completion_tokens``),
``stop`` (a string or up to 16 strings), ``seed``, ``n`` (1 only), ``stream``,
``stream_options.include_usage``, and the extensions ``top_k``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids`` and ``return_token_ids`` (true: the choice also carries
``token_ids``, the completion's token ids; streamed, they come once, whole, in the chunk that
has the ``finish_reason``). Missing ones take the checkpoint's generation_config.json
values (top_p 0.8, repetition_penalty 1.1, 512 new tokens), not OpenAI's defaults.
``presence_penalty``/``frequency_penalty`` other than 0, logprobs, tools, ``echo``,
``best_of`` > 1, ``suffix`` and non-text response formats are refused with a 400.

Every completion, streamed or not, runs as an ``Engine.stream`` iterated by a worker thread:
its ``result`` (a GenerationResult, once exhausted) gives the exact ``finish_reason`` and
``usage``, and a client that goes away, streaming or waiting for a whole completion, has its
generation cancelled (the stream is closed, which frees its slot in the engine's batch).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Dict, List, Optional

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:    # pragma: no cover - exercised through the CLI's own check
    raise ImportError(f"qwen_fast.server needs fastapi and uvicorn ({e}); install them with: "
                      'pip install "qwen_fast[server]"') from e

from . import chat as chatml
from .errors import CapacityError, NumericalError, QwenFastError, RequestError

__all__ = ["create_app", "serve", "BackgroundServer", "APIError", "INSTALL_HINT",
           "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MODEL_NAME"]

log = logging.getLogger("qwen_fast.server")

INSTALL_HINT = 'pip install "qwen_fast[server]"'
DEFAULT_MAX_BODY_BYTES = 4 * 2**20      # a 32k-token prompt is ~100-200 KB of JSON
DEFAULT_MODEL_NAME = "qwen-1.8b-chat"
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**32 - 1
# Engine parameter names that have another name in the OpenAI API (for error objects).
_API_NAME = {"max_new_tokens": "max_tokens"}
_ENGINE_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                  "seed", "stop", "stop_token_ids", "ignore_eos")


# ---- errors ------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _engine_error(e: BaseException) -> APIError:
    """The package's error types -> status and error object."""
    if isinstance(e, CapacityError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, RequestError):
        first = str(e).split(" ", 1)[0].split("[", 1)[0]
        param = _API_NAME.get(first, first) if first in _ENGINE_PARAMS else None
        return APIError(400, str(e), param=param)
    if isinstance(e, NumericalError):
        return APIError(500, f"the model failed on this request: {e}", type="server_error")
    if isinstance(e, QwenFastError):
        return APIError(500, f"{type(e).__name__}: {e}", type="server_error")
    log.error("internal error", exc_info=e)
    return APIError(500, "internal server error", type="server_error")


# ---- request parsing ---------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get_int(body: dict, name: str, lo: Optional[int] = None, hi: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = (f" >= {lo}" if hi is None else f" in [{lo}, {hi}]") if lo is not None else ""
        raise _bad(f"{name} must be an integer{rng}, got {json.dumps(v)[:60]}", param=name)
    return v


def _get_num(body: dict, name: str, what: str, ok) -> Optional[float]:
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v) or not ok(v):
        raise _bad(f"{name} must be {what}, got {json.dumps(v)[:60]}", param=name)
    return float(v)


def _get_bool(body: dict, name: str) -> Optional[bool]:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise _bad(f"{name} must be true or false, got {json.dumps(v)[:60]}", param=name)
    return v


def _refuse_unsupported(body: dict) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and (not _is_num(v) or v != 0):
            raise _bad(f"{name} is not supported (only 0); use repetition_penalty (the model's "
                       "own, default 1.1)", param=name, code="unsupported_parameter")
    unsupported = {
        "logprobs": lambda v: v not in (None, False, 0),
        "top_logprobs": lambda v: v not in (None, 0),
        "logit_bias": lambda v: v not in (None, {}),
        "tools": lambda v: v not in (None, []),
        "functions": lambda v: v not in (None, []),
        "tool_choice": lambda v: v not in (None, "none"),
        "echo": lambda v: v not in (None, False),
        "best_of": lambda v: v not in (None, 1),
        "suffix": lambda v: v not in (None, ""),
        "response_format": lambda v: v is not None and v != {"type": "text"},
    }
    for name, bad in unsupported.items():
        if bad(body.get(name)):
            raise _bad(f"{name} is not supported by this server", param=name,
                       code="unsupported_parameter")


class _Options:
    """What a request asks for, checked: sampling overrides and how to answer."""

    def __init__(self, overrides: dict, stream: bool, include_usage: bool,
                 max_tokens: Optional[int], return_token_ids: bool = False):
        self.overrides, self.stream, self.include_usage = overrides, stream, include_usage
        self.max_tokens = max_tokens
        self.return_token_ids = return_token_ids


def _parse_options(body: dict, chat: bool) -> _Options:
    _refuse_unsupported(body)
    n = _get_int(body, "n", lo=1)
    if n is not None and n != 1:
        raise _bad(f"n must be 1 (one choice per request), got {n}", param="n")
    ov: Dict[str, Any] = {}
    t = _get_num(body, "temperature", "a number >= 0 (0 = greedy)", lambda v: v >= 0)
    if t is not None:
        ov["temperature"] = t
    p = _get_num(body, "top_p", "a number in (0, 1]", lambda v: 0 < v <= 1)
    if p is not None:
        ov["top_p"] = p
    k = _get_int(body, "top_k", lo=-1)
    if k is not None:
        ov["top_k"] = max(k, 0)
    rp = _get_num(body, "repetition_penalty", "a number > 0 (1 = off)", lambda v: v > 0)
    if rp is not None:
        ov["repetition_penalty"] = rp
    mt = _get_int(body, "max_tokens", lo=1)
    if chat:
        mct = _get_int(body, "max_completion_tokens", lo=1)
        mt = mct if mct is not None else mt
    if mt is not None:
        ov["max_new_tokens"] = mt
    seed = _get_int(body, "seed", lo=0, hi=MAX_SEED)
    if seed is not None:
        ov["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
            raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                       f"of them, each at most {MAX_STOP_CHARS} characters", param="stop")
        if stops:
            ov["stop"] = list(stops)
    ie = _get_bool(body, "ignore_eos")
    if ie is not None:
        ov["ignore_eos"] = ie
    sti = body.get("stop_token_ids")
    if sti is not None:
        if not isinstance(sti, list) or not all(_is_int(t) and t >= 0 for t in sti):
            raise _bad("stop_token_ids must be a list of token ids", param="stop_token_ids")
        ov["stop_token_ids"] = list(sti)
    stream = bool(_get_bool(body, "stream"))
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise _bad("stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance(so, dict):
            raise _bad("stream_options must be an object", param="stream_options")
        include_usage = bool(_get_bool(so, "include_usage"))
    return _Options(ov, stream, include_usage, mt, bool(_get_bool(body, "return_token_ids")))


def _text_content(i: int, m: dict) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):      # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content[{j}]: only text parts "
                           '({"type": "text", "text": ...}) are supported', param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts, got "
               f"{type(content).__name__ if content is not None else 'null'}", param="messages")


def _chat_messages(body: dict) -> List[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with role and content", param="messages")
        role = m.get("role")
        if role == "developer":         # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role must be 'system', 'user' or 'assistant', got "
                       f"{json.dumps(role)[:40]}", param="messages")
        out.append({"role": role, "content": _text_content(i, m)})
    return out


# ---- preparing a request (runs in a worker thread: tokenizing a long prompt takes time) ---
class _Prepared:
    def __init__(self, ids: List[int], params, limit: int):
        self.ids, self.params, self.limit = ids, params, limit


def _prepare(engine, ids: List[int], opts: _Options, extra_stop_ids: List[int]) -> _Prepared:
    ctx = engine.cfg.max_context
    n = len(ids)
    if n >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has "
                            f"{n} tokens", param="messages" if extra_stop_ids else "prompt",
                       code="context_length_exceeded")
    if opts.max_tokens is not None and n + opts.max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens, but "
                            f"{n + opts.max_tokens} were requested ({n} in the prompt, "
                            f"{opts.max_tokens} for the completion); lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    ov = dict(opts.overrides)
    if extra_stop_ids:
        ov["stop_token_ids"] = list(ov.get("stop_token_ids", [])) + extra_stop_ids
    params = engine.sampling_params(**ov)
    return _Prepared(ids, params, min(params.max_new_tokens, ctx - n))


def _prepare_chat(engine, messages: List[dict], opts: _Options) -> _Prepared:
    gc = engine.generation_config
    if gc.chat_format != "chatml":
        raise _bad(f"this checkpoint's chat_format is {gc.chat_format!r}, not 'chatml' (a base "
                   "model?): use /v1/completions", param="messages")
    query, history, system = chatml.messages_to_chat(messages)
    _, ids = chatml.make_context(engine.tokenizer, query, history, system=system,
                                 max_window_size=gc.max_window_size)
    stop_ids = [t for seq in chatml.STOP_WORDS_IDS for t in seq]
    return _prepare(engine, ids, opts, stop_ids)


def _prompt_ids(engine, prompt) -> List[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]              # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt is empty", param="prompt")
        return engine.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        V = engine.cfg.vocab_size
        if not all(0 <= t < V for t in prompt):
            raise _bad(f"prompt token ids must be in [0, {V})", param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("one prompt per request: send a batch as separate requests", param="prompt")
    raise _bad("prompt must be a non-empty string or a list of token ids", param="prompt")


def _prepare_completion(engine, prompt, opts: _Options) -> _Prepared:
    return _prepare(engine, _prompt_ids(engine, prompt), opts, [])


# ---- streaming ---------------------------------------------------------------------------
class _StreamJob:
    """Iterates an Engine stream in a worker thread, handing deltas to the event loop."""

    def __init__(self, iterator, loop: asyncio.AbstractEventLoop):
        self.iterator = iterator
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop_event = threading.Event()
        self.future = None

    def start(self, executor: ThreadPoolExecutor) -> None:
        self.future = executor.submit(self._work)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:            # the loop is closed: nobody is listening any more
            self.stop_event.set()

    def _work(self) -> None:
        it = self.iterator
        try:
            for delta in it:
                if self.stop_event.is_set():
                    return
                self._put(("delta", delta))
                if self.stop_event.is_set():
                    return
            self._put(("end", getattr(it, "result", None)))
        except Exception as e:          # reported to the client as an error event
            self._put(("error", e))
        finally:
            it.close()                  # cancels the generation if it was not finished

    def cancel(self) -> None:
        """Stop the generation: at once if it has not started, else after at most one more delta."""
        self.stop_event.set()
        if self.future is not None and self.future.cancel():
            self.iterator.close()       # never started: nothing runs it, close it here


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _usage(result) -> dict:
    """OpenAI's usage object, with the prompt tokens the prefix cache supplied."""
    usage = dict(result.usage)
    usage["prompt_tokens_details"] = {"cached_tokens": result.cached_tokens}
    return usage


class _StreamRenderer:
    """Turns deltas into chat.completion.chunk / text_completion SSE events."""

    def __init__(self, chat: bool, model: str, include_usage: bool,
                 return_token_ids: bool = False):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.return_token_ids = return_token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.started = False

    def _chunk(self, delta: Optional[dict] = None, text: str = "", finish_reason=None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
            obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = {"id": self.id, "object": "text_completion", "created": self.created,
                   "model": self.model, "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return obj

    def head(self) -> List[bytes]:
        return [_sse(self._chunk({"role": "assistant", "content": ""}))] if self.chat else []

    def delta(self, d: str) -> List[bytes]:
        if self.chat and not self.started:     # as Engine.chat_stream: no leading whitespace
            d = d.lstrip()
        if not d:
            return []
        self.started = True
        return [_sse(self._chunk({"content": d}) if self.chat else self._chunk(text=d))]

    def end(self, result) -> List[bytes]:
        reason, usage = result.finish_reason, _usage(result)
        last = self._chunk(finish_reason=reason)
        if self.return_token_ids:
            last["choices"][0]["token_ids"] = list(result.token_ids)
        out = [_sse(last)]
        if self.include_usage:
            obj = self._chunk()
            obj["choices"] = []
            obj["usage"] = usage
            out.append(_sse(obj))
        return out + [b"data: [DONE]\n\n"]

    @staticmethod
    def error(exc: BaseException) -> List[bytes]:
        err = exc if isinstance(exc, APIError) else _engine_error(exc)
        return [_sse(err.body()), b"data: [DONE]\n\n"]


class _SSEResponse(Response):
    """A response that streams a _StreamJob as server-sent events and stops the job as soon as
    the client goes away (http.disconnect, a failed write, or cancellation)."""

    media_type = "text/event-stream"

    def __init__(self, job: _StreamJob, renderer: _StreamRenderer, executor: ThreadPoolExecutor):
        super().__init__(status_code=200, media_type=self.media_type)
        self.job, self.renderer, self.executor = job, renderer, executor

    async def __call__(self, scope, receive, send) -> None:
        async def wait_disconnect():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        listener = asyncio.ensure_future(wait_disconnect())
        getter = None
        try:
            self.job.start(self.executor)
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            for event in self.renderer.head():
                await send({"type": "http.response.body", "body": event, "more_body": True})
            while True:
                getter = asyncio.ensure_future(self.job.queue.get())
                done, _ = await asyncio.wait({getter, listener}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:          # the client went away
                    log.info("client disconnected from %s; generation stopped", self.renderer.id)
                    return
                kind, payload = getter.result()
                getter = None
                if kind == "delta":
                    events = self.renderer.delta(payload)
                elif kind == "end":
                    events = self.renderer.end(payload)
                else:
                    events = self.renderer.error(payload)
                for event in events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                if kind != "delta":
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
        except OSError:                         # the write failed: the client is gone
            log.info("client connection lost on %s; generation stopped", self.renderer.id)
        finally:
            self.job.cancel()                   # no-op when the job has finished
            listener.cancel()
            if getter is not None:
                getter.cancel()


async def _whole(job: _StreamJob, request: Request, executor: ThreadPoolExecutor):
    """Run a job to its end and return its GenerationResult, or None if the client disconnects
    first (the generation is then cancelled). Deltas are dropped: the result holds the text."""
    async def wait_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(wait_disconnect())
    getter = None
    job.start(executor)
    try:
        while True:
            getter = asyncio.ensure_future(job.queue.get())
            done, _ = await asyncio.wait({getter, listener}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                log.info("client disconnected before its completion; generation stopped")
                return None
            kind, payload = getter.result()
            getter = None
            if kind == "end":
                return payload
            if kind == "error":
                raise payload if isinstance(payload, APIError) else _engine_error(payload)
    finally:
        job.cancel()                            # no-op when the job has finished
        listener.cancel()
        if getter is not None:
            getter.cancel()


# ---- the app -----------------------------------------------------------------------------
async def _read_json(request: Request, limit: int) -> dict:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            declared = int(cl)
        except ValueError:
            raise _bad("bad Content-Length header") from None
        if declared > limit:
            raise APIError(413, f"request body of {declared} bytes is over this server's limit of "
                                f"{limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over this server's limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad(f"could not parse the request body as JSON: {str(e)[:200]}",
                   code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def create_app(engine, model_name: str = DEFAULT_MODEL_NAME, api_key: Optional[str] = None,
               max_body_bytes: Optional[int] = None, max_concurrency: int = 64) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``.

    api_key: if set, every /v1 route needs ``Authorization: Bearer <api_key>`` (401 otherwise).
    max_body_bytes: larger request bodies are refused with 413 (default 4 MiB).
    max_concurrency: threads that run streams at the same time (more wait their turn)."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("model_name must be a non-empty string")
    if max_body_bytes is None:
        max_body_bytes = DEFAULT_MAX_BODY_BYTES
    if not _is_int(max_body_bytes) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    if not _is_int(max_concurrency) or max_concurrency < 1:
        raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="qwen-fast-stream")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qwen_fast", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.state.model_name = model_name

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return _engine_error(exc).response()

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is None:
            return                      # lenient: the one model this server has
        if not isinstance(m, str):
            raise _bad("model must be a string", param="model")
        if m != model_name:
            raise APIError(404, f"The model {m!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "qwen_fast"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_auth(request)
        if model_id != model_name:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return model_card()

    async def complete(request: Request, chat: bool):
        check_auth(request)
        body = await _read_json(request, max_body_bytes)
        check_model(body)
        opts = _parse_options(body, chat)
        try:
            if chat:
                messages = _chat_messages(body)
                prep = await run_in_threadpool(_prepare_chat, engine, messages, opts)
            else:
                prep = await run_in_threadpool(_prepare_completion, engine, body.get("prompt"), opts)
            iterator = await run_in_threadpool(engine.stream, prep.ids, params=prep.params)
        except APIError:
            raise
        except RequestError as e:
            err = _engine_error(e)
            if chat and err.param is None and not isinstance(e, CapacityError):
                err.param = "messages"
            raise err from None
        except Exception as e:
            raise _engine_error(e) from None
        job = _StreamJob(iterator, asyncio.get_running_loop())
        if opts.stream:
            renderer = _StreamRenderer(chat, model_name, opts.include_usage,
                                       opts.return_token_ids)
            return _SSEResponse(job, renderer, executor)
        result = await _whole(job, request, executor)
        if result is None:                      # the client went away: nobody to answer
            return Response(status_code=499)
        text = result.text.lstrip() if chat else result.text
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": result.finish_reason}
        if opts.return_token_ids:
            choice["token_ids"] = list(result.token_ids)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name, "choices": [choice],
                "usage": _usage(result)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def serve(engine, host: str = "127.0.0.1", port: int = 8000, *, model_name: str = DEFAULT_MODEL_NAME,
          api_key: Optional[str] = None, max_body_bytes: Optional[int] = None,
          max_concurrency: int = 64, log_level: str = "info") -> None:
    """Serve ``engine`` until interrupted (uvicorn, one process, one event loop)."""
    app = create_app(engine, model_name=model_name, api_key=api_key,
                     max_body_bytes=max_body_bytes, max_concurrency=max_concurrency)
    # On Ctrl-C, streams still running get 10 s to finish, then they are cancelled (and with
    # them their generations).
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


class BackgroundServer:
    """A uvicorn server on a thread of this process, for tests and benchmarks.

        with BackgroundServer(create_app(engine)) as srv:
            requests.get(srv.url + "/health")

    port=0 picks a free port; ``url`` is the base URL once started."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 30.0):
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                     lifespan="on", access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="qwen-fast-server", daemon=True)
        self.start_timeout = start_timeout
        self.host = host
        self.port: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
