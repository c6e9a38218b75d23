"""An OpenAI-compatible HTTP API over an Engine (FastAPI + uvicorn: ``pip install "qwen_fast[server]"``).

    qwen-fast serve --model Qwen-1_8B-Chat [--host 127.0.0.1] [--port 8000] [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="Qwen-1_8B-Chat", messages=[{"role": "user", "content": "Hi"}])

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id};
and, never needing the key: GET|HEAD /health (liveness), GET|HEAD /ready (readiness: 503 with
Retry-After while the queue is full or the server shuts down), GET /metrics (Prometheus,
qwen_fast/metrics.py).

Operations
----------
* Every response carries ``X-Request-Id`` (the client's, if it sent a sane one, else a new one),
  and gets one log line with that id, the route, the status and the duration.
* Overload: at most ``max_waiting`` requests wait for a row of the engine's batch (checked
  atomically when the engine queues the request); beyond it a request gets 503
  ``server_overloaded`` with ``Retry-After`` before anything of it is queued.
* Deadlines: ``request_timeout`` (the server's default, or the request's own field, in seconds
  from arrival). A request still waiting for a batch row at its deadline is dropped with 503
  (nothing was computed: safe to retry elsewhere); one already generating is stopped with 504,
  or, streamed, an error event ``request_timeout``.
* POST bodies must be ``Content-Type: application/json`` (415 otherwise: a text/plain POST is a
  cross-origin request any web page could send). CORS is off unless ``allowed_origins`` is set.
* Fields: the ones read here and the ones that only describe the caller (``user``,
  ``metadata``, ...) are accepted; other servers' sampling fields that would change the answer
  (``min_p``, ``typical_p``, ``min_tokens``, guided decoding, ...) are refused with 400 by
  name; any other unknown field is accepted, logged as a warning and named in the response's
  ``X-Ignored-Fields`` header (clients and frameworks add fields of their own, and refusing
  those would break them for nothing).

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
  to stop and closes the Engine's stream at once (TextStream.close is thread-safe): a request
  still waiting for a batch row leaves the queue then, one generating leaves the batch before
  the next step.
* Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``:
  400 for bad JSON, bad parameters and prompts that do not fit the context, 401 for a missing
  or wrong key, 404 for an unknown model or route, 405 (with ``Allow``) for a wrong method, 413
  for a body over ``max_body_bytes``, 415 for a body that is not JSON, 503 for overload or
  shutdown, 504 past a deadline; a 500 only for a failure of the server or the model itself
  (``NumericalError``).

Parameters: ``temperature``, ``top_p``, ``max_tokens`` (or ``max_completion_tokens``, which wins),
``stop`` (a string or up to 16 strings), ``seed``, ``n`` (1 only), ``stream``,
``stream_options.include_usage``, and the extensions ``top_k``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, ``request_timeout`` and ``return_token_ids`` (true: the choice also carries
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
from .errors import CapacityError, NumericalError, OverloadedError, QwenFastError, RequestError

try:
    from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
except ImportError as e:    # pragma: no cover - exercised through the CLI's own check
    raise ImportError(f"qwen_fast.server needs prometheus_client ({e}); install it with: "
                      'pip install "qwen_fast[server]"') from e

__all__ = ["create_app", "serve", "BackgroundServer", "APIError", "ServerOptions", "INSTALL_HINT",
           "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_WAITING", "DEFAULT_MODEL_NAME"]

log = logging.getLogger("qwen_fast.server")

INSTALL_HINT = 'pip install "qwen_fast[server]"'
DEFAULT_MAX_BODY_BYTES = 4 * 2**20      # a 32k-token prompt is ~100-200 KB of JSON
DEFAULT_MODEL_NAME = "qwen-1.8b-chat"
DEFAULT_MAX_WAITING = 128               # requests queued beyond the batch before 503s
RETRY_AFTER_S = 1                       # the Retry-After of a 503 (overloaded, shutting down)
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


# ---- which body fields a request may carry -------------------------------------------------
# Fields of both endpoints that this server reads, or that only describe the caller and change
# nothing in the answer (user, metadata, store, service_tier, ...): accepted.
_COMMON_FIELDS = frozenset({
    "model", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "seed",
    "stream", "stream_options", "presence_penalty", "frequency_penalty", "logprobs",
    "logit_bias", "user", "metadata", "store", "service_tier",
    # extensions (vLLM's names where vLLM has them)
    "top_k", "repetition_penalty", "ignore_eos", "stop_token_ids", "return_token_ids",
    "request_timeout"})
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "top_logprobs", "tools", "functions", "tool_choice",
                                 "function_call", "parallel_tool_calls", "response_format",
                                 "modalities", "reasoning_effort"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
# Other servers' sampling and decoding fields that would change the answer: refused by name
# rather than ignored, so a client that relies on one learns that it had no effect.
_REFUSED_EXTENSIONS = frozenset({
    "min_p", "typical_p", "top_a", "tfs_z", "min_tokens", "length_penalty", "use_beam_search",
    "early_stopping", "mirostat", "mirostat_tau", "mirostat_eta", "repeat_penalty",
    "repeat_last_n", "penalize_nl", "dry_multiplier", "xtc_probability", "n_probs", "grammar",
    "json_schema", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "structured_outputs", "prompt_logprobs", "bad_words",
    "allowed_token_ids", "include_stop_str_in_output", "truncate_prompt_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "logits_processors",
    "min_new_tokens", "do_sample", "num_beams", "no_repeat_ngram_size"})


def _check_fields(body: dict, chat: bool) -> List[str]:
    """Refuse known fields this server cannot honour; return the unknown ones (accepted, and
    named in a warning and the X-Ignored-Fields header). Why accept unknown fields: clients
    and frameworks add fields of their own (tracing ids, newer OpenAI options that describe the
    caller), and refusing them would break those clients for nothing; the fields that would
    change an answer are the ones refused above."""
    known = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name in body:
        if name in _REFUSED_EXTENSIONS:
            raise _bad(f"{name} is not supported by this server (it would change the answer, so "
                       "it is refused rather than ignored)", param=name,
                       code="unsupported_parameter")
    return sorted(name for name in body if name not in known)


class _Options:
    """What a request asks for, checked: sampling overrides and how to answer."""

    def __init__(self, overrides: dict, stream: bool, include_usage: bool,
                 max_tokens: Optional[int], return_token_ids: bool = False,
                 timeout: Optional[float] = None, ignored: Optional[List[str]] = None):
        self.overrides, self.stream, self.include_usage = overrides, stream, include_usage
        self.max_tokens = max_tokens
        self.max_tokens_param = "max_tokens"
        self.return_token_ids = return_token_ids
        self.timeout = timeout              # seconds from arrival, or None
        self.ignored = ignored or []        # unknown fields, accepted and named in a warning


def _parse_options(body: dict, chat: bool, default_timeout: Optional[float] = None) -> _Options:
    ignored = _check_fields(body, chat)
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
    # max_completion_tokens (OpenAI's newer name) wins over max_tokens, on both endpoints.
    mt = _get_int(body, "max_tokens", lo=1)
    mct = _get_int(body, "max_completion_tokens", lo=1)
    mt_param = "max_tokens"
    if mct is not None:
        mt, mt_param = mct, "max_completion_tokens"
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
    timeout = _get_num(body, "request_timeout", "a number of seconds > 0", lambda v: v > 0)
    opts = _Options(ov, stream, include_usage, mt, bool(_get_bool(body, "return_token_ids")),
                    timeout if timeout is not None else default_timeout, ignored)
    opts.max_tokens_param = mt_param
    return opts


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
                            f"{opts.max_tokens} for the completion); lower {opts.max_tokens_param}",
                       param=opts.max_tokens_param, code="context_length_exceeded")
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
    """Iterates an Engine stream in a worker thread, handing deltas to the event loop.

    on_end(job, finish_reason) is called once when the job is over, however it ended (the
    metrics): at the stream's end, on an error, or when it is cancelled."""

    def __init__(self, iterator, loop: asyncio.AbstractEventLoop, on_end=None):
        self.iterator = iterator
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop_event = threading.Event()
        self.future = None
        self._on_end = on_end
        self._ended = threading.Lock()
        self.timed_out = False

    def start(self, executor: ThreadPoolExecutor) -> None:
        self.future = executor.submit(self._work)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:            # the loop is closed: nobody is listening any more
            self.stop_event.set()

    def _end(self, finish_reason: Optional[str]) -> None:
        if self._on_end is not None and self._ended.acquire(blocking=False):
            try:
                self._on_end(self, finish_reason)
            except Exception:           # metrics must never break an answer
                log.exception("recording a finished request failed")

    def _work(self) -> None:
        it = self.iterator
        reason = "abort"
        try:
            for delta in it:
                if self.stop_event.is_set():
                    return
                self._put(("delta", delta))
                if self.stop_event.is_set():
                    return
            result = getattr(it, "result", None)
            reason = getattr(result, "finish_reason", None) or "abort"
            self._put(("end", result))
        except Exception as e:          # reported to the client as an error event
            reason = "error"
            self._put(("error", e))
        finally:
            it.close()                  # cancels the generation if it was not finished
            self._end(reason)

    def cancel(self) -> None:
        """Stop the generation now, whether it runs, waits for a batch row, or has not started:
        the Engine's stream is closed from here (TextStream.close is safe from any thread, and
        wakes the worker blocked on it), so a queued request leaves the queue at once."""
        self.stop_event.set()
        never_started = self.future is None or self.future.cancel()
        self.iterator.close()
        if never_started:
            self._end("abort")

def _timeout_error(job: _StreamJob, timeout: float) -> APIError:
    """The error of a request past its deadline: 503 (retry elsewhere) if it never reached the
    batch, 504 if it had started generating."""
    job.timed_out = True
    req = getattr(job.iterator, "request", None)
    started = req is None or getattr(req, "t_admitted", None) is not None
    if started:
        return APIError(504, f"the request ran past its deadline of {timeout:g} s and was "
                             "stopped", type="server_error", code="request_timeout")
    return APIError(503, f"the request waited {timeout:g} s (its deadline) for a batch row "
                         "and was dropped before it started", type="server_error",
                    code="request_timeout", headers={"Retry-After": str(RETRY_AFTER_S)})


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

    def __init__(self, job: _StreamJob, renderer: _StreamRenderer, executor: ThreadPoolExecutor,
                 timeout: Optional[float] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(status_code=200, media_type=self.media_type)
        self.job, self.renderer, self.executor = job, renderer, executor
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.extra_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                              for k, v in (headers or {}).items()]

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
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
                + self.extra_headers})
            for event in self.renderer.head():
                await send({"type": "http.response.body", "body": event, "more_body": True})
            while True:
                getter = asyncio.ensure_future(self.job.queue.get())
                left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                done, _ = await asyncio.wait({getter, listener}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:                    # past the deadline: an error event, then [DONE]
                    err = _timeout_error(self.job, self.timeout)
                    self.job.cancel()
                    log.info("%s: %s", self.renderer.id, err.message)
                    for event in self.renderer.error(err):
                        await send({"type": "http.response.body", "body": event, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
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


async def _whole(job: _StreamJob, request: Request, executor: ThreadPoolExecutor,
                 timeout: Optional[float] = None):
    """Run a job to its end and return its GenerationResult, or None if the client disconnects
    first (the generation is then cancelled). Deltas are dropped: the result holds the text.
    Past `timeout` seconds the generation is cancelled and the timeout's APIError raised."""
    deadline = None if timeout is None else time.monotonic() + timeout
    async def wait_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(wait_disconnect())
    getter = None
    job.start(executor)
    try:
        while True:
            getter = asyncio.ensure_future(job.queue.get())
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({getter, listener}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                err = _timeout_error(job, timeout)
                job.cancel()
                raise err
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
def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_json(request: Request, limit: int) -> dict:
    # Only JSON: a text/plain or form POST is a "simple" cross-origin request that any web page
    # can send without a CORS preflight, so accepting it would let pages drive a local server.
    mt = _media_type(request)
    if mt != "application/json" and not (mt.startswith("application/") and mt.endswith("+json")):
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: "
                            f"application/json', got {json.dumps(mt or None)}",
                       code="unsupported_media_type")
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


class ServerOptions:
    """The server's settings, checked before anything is loaded (the CLI checks them before
    the model load; create_app again).

    api_key: if set, every /v1 route needs ``Authorization: Bearer <api_key>``. Printable ASCII
        only: HTTP header values are bytes that servers read as Latin-1, so a key with other
        characters could never match what a client sends.
    max_body_bytes: larger request bodies are refused with 413 (default 4 MiB).
    max_concurrency: threads that run engine streams at the same time.
    max_waiting: requests that may wait for a row of the engine's batch; more get 503 with
        Retry-After (None: no limit).
    request_timeout: the default deadline of a request in seconds (None: none); a request's own
        ``request_timeout`` field overrides it.
    allowed_origins: origins allowed by CORS (["*"] for any); None or [] = no CORS headers (a
        browser page on another origin cannot read the answers)."""

    def __init__(self, model_name: str = DEFAULT_MODEL_NAME, api_key: Optional[str] = None,
                 max_body_bytes: Optional[int] = None, max_concurrency: int = 64,
                 max_waiting: Optional[int] = DEFAULT_MAX_WAITING,
                 request_timeout: Optional[float] = None,
                 allowed_origins: Optional[List[str]] = None):
        if not isinstance(model_name, str) or not model_name:
            raise ValueError("model_name must be a non-empty string")
        if max_body_bytes is None:
            max_body_bytes = DEFAULT_MAX_BODY_BYTES
        if not _is_int(max_body_bytes) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
        if not _is_int(max_concurrency) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        if max_waiting is not None and (not _is_int(max_waiting) or max_waiting < 0):
            raise ValueError(f"max_waiting must be None or an integer >= 0, got {max_waiting!r}")
        if request_timeout is not None and (not _is_num(request_timeout) or request_timeout <= 0):
            raise ValueError(f"request_timeout must be None or a number of seconds > 0, got "
                             f"{request_timeout!r}")
        if api_key is not None:
            if not isinstance(api_key, str) or not api_key:
                raise ValueError("api_key must be a non-empty string or None")
            bad = [c for c in api_key if not 0x21 <= ord(c) <= 0x7E]
            if bad:
                raise ValueError(f"api_key must be printable ASCII without spaces (HTTP headers "
                                 f"carry nothing else reliably); it has {bad[0]!r}")
        origins = list(allowed_origins or [])
        for o in origins:
            if not isinstance(o, str) or not (o == "*" or o.startswith(("http://", "https://"))):
                raise ValueError(f"allowed_origins entries must be '*' or origins like "
                                 f"'https://example.com', got {o!r}")
        self.model_name, self.api_key = model_name, api_key
        self.max_body_bytes, self.max_concurrency = max_body_bytes, max_concurrency
        self.max_waiting, self.request_timeout = max_waiting, request_timeout
        self.allowed_origins = origins


_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready",
              "/metrics")


def _request_id(scope) -> str:
    """The client's X-Request-Id if it is a sane token (1-128 of [A-Za-z0-9-_.:]), else a new one."""
    for k, v in scope.get("headers", ()):
        if k == b"x-request-id":
            try:
                text = v.decode("ascii")
            except UnicodeDecodeError:
                break
            if 0 < len(text) <= 128 and set(text) <= _REQUEST_ID_CHARS:
                return text
            break
    return uuid.uuid4().hex


class _RequestIdMiddleware:
    """Every HTTP response carries X-Request-Id (the client's, or a new one), is counted in the
    metrics by endpoint, method and status, and gets one log line with its id and duration."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        status = [0]
        t0 = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=list(message.get("headers", []))
                               + [(b"x-request-id", rid.encode())])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            if status[0]:
                raise                   # the answer had started: nothing more to send
            status[0] = 500
            await _engine_error(e).response()(scope, receive, send_with_id)
        finally:
            path, method = scope.get("path", ""), scope.get("method", "")
            endpoint = path if path in _ENDPOINTS else (
                "/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            self.metrics.http_requests.labels(endpoint, method, str(status[0] or 500)).inc()
            log.info("%s %s %s %d %.3fs", rid, method, path, status[0] or 500,
                     time.perf_counter() - t0)


def create_app(engine, model_name: str = DEFAULT_MODEL_NAME, api_key: Optional[str] = None,
               max_body_bytes: Optional[int] = None, max_concurrency: int = 64,
               max_waiting: Optional[int] = DEFAULT_MAX_WAITING,
               request_timeout: Optional[float] = None,
               allowed_origins: Optional[List[str]] = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name`` (the settings: ServerOptions)."""
    o = ServerOptions(model_name, api_key, max_body_bytes, max_concurrency, max_waiting,
                      request_timeout, allowed_origins)
    executor = ThreadPoolExecutor(max_workers=o.max_concurrency, thread_name_prefix="qwen-fast-stream")
    metrics = ServerMetrics(engine)
    created = int(time.time())
    state = {"shutting_down": False}

    @asynccontextmanager
    async def lifespan(app):
        yield
        state["shutting_down"] = True
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qwen_fast", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.state.model_name = o.model_name
    app.state.metrics = metrics
    app.state.options = o
    app.state.begin_shutdown = lambda: state.update(shutting_down=True)   # _Server calls it
    if o.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=o.allowed_origins,
                           allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "X-Ignored-Fields", "Retry-After"],
                           max_age=600)
    app.add_middleware(_RequestIdMiddleware, metrics=metrics)     # outermost: sees every answer

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        if exc.code == "server_overloaded":
            metrics.rejected.labels("overloaded").inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return _engine_error(exc).response()

    def check_auth(request: Request) -> None:
        if o.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1", "replace"), o.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is None:
            return                      # lenient: the one model this server has
        if not isinstance(m, str):
            raise _bad("model must be a string", param="model")
        if m != o.model_name:
            raise APIError(404, f"The model {m!r} does not exist; this server serves {o.model_name!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": o.model_name, "object": "model", "created": created, "owned_by": "qwen_fast"}

    def overloaded(message: str) -> APIError:
        return APIError(503, message, type="server_error", code="server_overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """Liveness: the process answers (never needs the key)."""
        return {"status": "ok", "model": o.model_name}

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready():
        """Readiness for a load balancer: 200 while the server takes new requests, 503 (with
        Retry-After) while its queue is full or it is shutting down (never needs the key)."""
        s = engine.stats()
        body = {"status": "ready", "model": o.model_name, "running": s["running"],
                "waiting": s["waiting"], "max_waiting": o.max_waiting}
        headers = None
        if state["shutting_down"]:
            body["status"], headers = "shutting_down", {"Retry-After": str(RETRY_AFTER_S)}
        elif (o.max_waiting is not None
              and s["waiting"] - max(0, s["max_batch_size"] - s["running"]) >= o.max_waiting):
            body["status"], headers = "overloaded", {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse(body, status_code=200 if headers is None else 503, headers=headers)

    @app.get("/metrics")
    async def metrics_route():
        """Prometheus metrics (qwen_fast/metrics.py); never needs the key, like /health."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_auth(request)
        if model_id != o.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return model_card()

    def on_end(job: _StreamJob, finish_reason) -> None:
        if job.timed_out:
            metrics.rejected.labels("timeout").inc()
        metrics.observe_request(getattr(job.iterator, "request", None), finish_reason)

    async def complete(request: Request, chat: bool):
        check_auth(request)
        if state["shutting_down"]:
            raise overloaded("the server is shutting down; retry on another replica")
        body = await _read_json(request, o.max_body_bytes)
        check_model(body)
        opts = _parse_options(body, chat, o.request_timeout)
        rid = request.scope.get("state", {}).get("request_id", "-")
        headers = {}
        if opts.ignored:
            log.warning("%s: ignored unknown fields %s", rid, ", ".join(opts.ignored))
            headers["X-Ignored-Fields"] = ",".join(opts.ignored)[:1024]
        try:
            if chat:
                messages = _chat_messages(body)
                prep = await run_in_threadpool(_prepare_chat, engine, messages, opts)
            else:
                prep = await run_in_threadpool(_prepare_completion, engine, body.get("prompt"), opts)
            iterator = await run_in_threadpool(engine.stream, prep.ids, params=prep.params,
                                               max_waiting=o.max_waiting)
        except APIError:
            raise
        except OverloadedError as e:
            raise overloaded(str(e)) from None
        except RequestError as e:
            err = _engine_error(e)
            if chat and err.param is None and not isinstance(e, CapacityError):
                err.param = "messages"
            raise err from None
        except Exception as e:
            raise _engine_error(e) from None
        job = _StreamJob(iterator, asyncio.get_running_loop(), on_end)
        if opts.stream:
            renderer = _StreamRenderer(chat, o.model_name, opts.include_usage,
                                       opts.return_token_ids)
            return _SSEResponse(job, renderer, executor, opts.timeout, headers)
        result = await _whole(job, request, executor, opts.timeout)
        if result is None:                      # the client went away: nobody to answer
            return Response(status_code=499)
        text = result.text.lstrip() if chat else result.text
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": result.finish_reason}
        if opts.return_token_ids:
            choice["token_ids"] = list(result.token_ids)
        return JSONResponse({"id": cid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": o.model_name,
                             "choices": [choice], "usage": _usage(result)}, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def serve(engine, host: str = "127.0.0.1", port: int = 8000, *, model_name: str = DEFAULT_MODEL_NAME,
          api_key: Optional[str] = None, max_body_bytes: Optional[int] = None,
          max_concurrency: int = 64, max_waiting: Optional[int] = DEFAULT_MAX_WAITING,
          request_timeout: Optional[float] = None, allowed_origins: Optional[List[str]] = None,
          log_level: str = "info") -> None:
    """Serve ``engine`` until interrupted (uvicorn, one process, one event loop)."""
    app = create_app(engine, model_name=model_name, api_key=api_key,
                     max_body_bytes=max_body_bytes, max_concurrency=max_concurrency,
                     max_waiting=max_waiting, request_timeout=request_timeout,
                     allowed_origins=allowed_origins)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(log_level.upper())
    # On Ctrl-C, streams still running get 10 s to finish, then they are cancelled (and with
    # them their generations). The per-request log line (with its X-Request-Id) replaces
    # uvicorn's access log.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=10, access_log=False)
    _Server(config).run()


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when shutdown begins (Ctrl-C, SIGTERM), so that /ready
    turns 503 and new requests on open connections get 503 while running streams finish."""

    def handle_exit(self, sig, frame) -> None:
        begin = getattr(getattr(self.config.app, "state", None), "begin_shutdown", None)
        if begin is not None:
            begin()
        super().handle_exit(sig, frame)


class BackgroundServer:
    """A uvicorn server on a thread of this process, for tests and benchmarks.

        with BackgroundServer(create_app(engine)) as srv:
            requests.get(srv.url + "/health")

    port=0 picks a free port; ``url`` is the base URL once started."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 30.0):
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                     lifespan="on", access_log=False, timeout_graceful_shutdown=5)
        self.server = _Server(self.config)
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
