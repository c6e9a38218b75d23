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

Parameters (qwen_fast/api.py parses them): ``temperature``, ``top_p``, ``max_tokens`` (or
``max_completion_tokens``, which wins), ``stop`` (a string or up to 16), ``seed``, ``n``,
``stream``, ``stream_options.include_usage``, ``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``logprobs`` (+ ``top_logprobs`` on chat), ``echo`` (completions), and the
extensions ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``,
``request_timeout`` and ``return_token_ids`` (true: the choice also carries ``token_ids``, the
completion's token ids; streamed, they come once, whole, in the chunk that has the
``finish_reason``). Missing ones take the checkpoint's generation_config.json values (top_p 0.8,
repetition_penalty 1.1, 512 new tokens), not OpenAI's defaults. ``tools`` / ``functions`` use
the release's ReAct prompt (qwen_fast/tools.py); ``response_format`` json_object / json_schema
constrains decoding (qwen_fast/constrained.py). ``suffix``, ``best_of`` other than ``n`` and a
forced ``tool_choice`` are refused with a 400.

A request's choices (``n`` for each of its prompts) are submitted to the engine together
(``Engine.streams``: all or none, one queue check) and decode in the same batch; each is an
Engine stream iterated by a worker thread of its own. Log-probabilities come from the engine with
the tokens (the model's log-softmax in fp32, before the sampling parameters); a streamed chunk
carries those of the tokens consumed since the previous chunk. ``echo`` scores the prompt with
``Engine.prompt_logprobs`` (one more prefill of it).

Every completion, streamed or not, runs as Engine streams iterated by worker threads: their
``result`` (a GenerationResult, once exhausted) gives the exact ``finish_reason`` and ``usage``, and a client that goes away, streaming or waiting for a whole completion, has its
generation cancelled (the stream is closed, which frees its slot in the engine's batch).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from urllib.parse import quote
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Dict, List, Optional

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:    # pragma: no cover - exercised through the CLI's own check
    raise ImportError(f"qwen_fast.server needs fastapi and uvicorn ({e}); install them with: "
                      'pip install "qwen_fast[server]"') from e

from . import api
from . import protocol as P
from . import tools as tools_mod
from .api import APIError, bad as _bad, engine_error as _engine_error, is_int as _is_int, is_num as _is_num
from .errors import CapacityError, OverloadedError, RequestError

try:
    from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
except ImportError as e:    # pragma: no cover - exercised through the CLI's own check
    raise ImportError(f"qwen_fast.server needs prometheus_client ({e}); install it with: "
                      'pip install "qwen_fast[server]"') from e

__all__ = ["create_app", "serve", "BackgroundServer", "APIError", "ServerOptions", "INSTALL_HINT",
           "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_WAITING", "DEFAULT_MODEL_NAME"]

log = logging.getLogger("qwen_fast.server")


def _response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

INSTALL_HINT = 'pip install "qwen_fast[server]"'
DEFAULT_MAX_BODY_BYTES = 4 * 2**20      # a 32k-token prompt is ~100-200 KB of JSON
DEFAULT_MODEL_NAME = "qwen-1.8b-chat"
DEFAULT_MAX_WAITING = 128               # requests queued beyond the batch before 503s
RETRY_AFTER_S = 1                       # the Retry-After of a 503 (overloaded, shutting down)


# ---- running a request's choices ---------------------------------------------------------
class _StreamJob:
    """Iterates a request's Engine streams (one per choice), each on a worker thread, handing
    (choice, kind, payload) items to the event loop:

        ("delta", (text, logprobs)): a text delta and the TokenLogprobs of the tokens consumed
                                     since the last item (with logprobs on; else [])
        ("end", (result, logprobs)): the GenerationResult, and the tokens not yet reported
        ("error", exception)

    on_end(job, stream, finish_reason) is called once per stream when it is over, however it
    ended (the metrics): at its end, on an error, or when it is cancelled."""

    def __init__(self, iterators: list, loop: asyncio.AbstractEventLoop, on_end=None,
                 logprobs: bool = False):
        self.iterators = list(iterators)
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop_event = threading.Event()
        self.futures: list = []
        self._on_end = on_end
        self._ended = [threading.Lock() for _ in self.iterators]
        self.logprobs = logprobs
        self.timed_out = False

    def start(self, executor: ThreadPoolExecutor) -> None:
        self.futures = [executor.submit(self._work, i) for i in range(len(self.iterators))]

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:            # the loop is closed: nobody is listening any more
            self.stop_event.set()

    def _end(self, i: int, finish_reason: Optional[str]) -> None:
        if self._on_end is not None and self._ended[i].acquire(blocking=False):
            try:
                self._on_end(self, self.iterators[i], finish_reason)
            except Exception:           # metrics must never break an answer
                log.exception("recording a finished request failed")

    def _logprobs(self, it, read: int):
        """The TokenLogprobs of the tokens `it` consumed since `read`, and the new count."""
        if not self.logprobs:
            return [], read
        now = it.tokens_read
        req = it.request
        with req.lock:
            return list(req.logprobs[read:now]), now

    def _work(self, i: int) -> None:
        it = self.iterators[i]
        reason, read = "abort", 0
        try:
            for delta in it:
                if self.stop_event.is_set():
                    return
                lps, read = self._logprobs(it, read)
                self._put((i, "delta", (delta, lps)))
                if self.stop_event.is_set():
                    return
            result = getattr(it, "result", None)
            reason = getattr(result, "finish_reason", None) or "abort"
            lps, read = self._logprobs(it, read)
            self._put((i, "end", (result, lps)))
        except Exception as e:          # reported to the client as an error event
            reason = "error"
            self._put((i, "error", e))
        finally:
            it.close()                  # cancels the generation if it was not finished
            self._end(i, reason)

    def cancel(self) -> None:
        """Stop every choice now, whether it runs, waits for a batch row, or has not started:
        the Engine's streams are closed from here (TextStream.close is safe from any thread, and
        wakes the worker blocked on it), so a queued request leaves the queue at once."""
        self.stop_event.set()
        for i, it in enumerate(self.iterators):
            never_started = i >= len(self.futures) or self.futures[i].cancel()
            it.close()
            if never_started:
                self._end(i, "abort")


def _timeout_error(job: _StreamJob, timeout: float) -> APIError:
    """The error of a request past its deadline: 503 (retry elsewhere) if none of its choices
    reached the batch, 504 if one had started generating."""
    job.timed_out = True
    reqs = [getattr(it, "request", None) for it in job.iterators]
    started = any(r is None or getattr(r, "t_admitted", None) is not None for r in reqs)
    if started:
        return APIError(504, f"the request ran past its deadline of {timeout:g} s and was "
                             "stopped", type="server_error", code="request_timeout")
    return APIError(503, f"the request waited {timeout:g} s (its deadline) for a batch row "
                         "and was dropped before it started", type="server_error",
                    code="request_timeout", headers={"Retry-After": str(RETRY_AFTER_S)})


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _usage(results: list, n: int) -> dict:
    """OpenAI's usage object over a request's choices: each prompt counted once (choices
    results[i*n : (i+1)*n] share prompt i), every completion token, and the prompt tokens the
    prefix cache supplied."""
    firsts = results[::n]
    prompt = sum(r.prompt_tokens for r in firsts)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in firsts)}}


class _Logprobs:
    """OpenAI's logprobs objects from TokenLogprobs (chat: ``content``; completions: the legacy
    ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` lists). A token's text
    is its bytes decoded as UTF-8 with replacement characters (a token may hold part of a
    character); chat entries carry the exact ``bytes`` too."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: Dict[int, tuple] = {}

    def token(self, tid: int) -> tuple:
        t = self._cache.get(tid)
        if t is None:
            raw = self.tok.id_to_bytes(tid)
            t = self._cache[tid] = (raw.decode("utf-8", "replace"), list(raw))
        return t

    def chat(self, entries: list) -> list:
        out = []
        for e in entries:
            text, raw = self.token(e.token_id)
            out.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": [
                {"token": self.token(t)[0], "logprob": lp, "bytes": self.token(t)[1]}
                for t, lp in e.top]})
        return out

    def completion(self, ids: list, entries: list, offset: int) -> tuple:
        """(the legacy object of tokens `ids` with their entries (None: no logprob, as a
        prompt's first token), the text offset after them)."""
        tokens, lps, tops, offsets = [], [], [], []
        for tid, e in zip(ids, entries):
            text = self.token(tid)[0]
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if e is None:
                lps.append(None)
                tops.append(None)
            else:
                lps.append(e.logprob)
                top = {self.token(t)[0]: lp for t, lp in e.top}
                top.setdefault(text, e.logprob)
                tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}, offset


def _tool_message(result, legacy: bool) -> tuple:
    """(assistant message, finish_reason) of a ReAct answer; a truncated one is plain text."""
    message, finish = tools_mod.message_of(result.text, legacy)
    if result.finish_reason == "length":
        return {"role": "assistant", "content": result.text.strip()}, "length"
    return message, finish


def _scored(result) -> tuple:
    """(ids, TokenLogprobs) of a completion's logprobs: its tokens and, when a stop token ended
    it, that token too (not part of the text, but sampled: lm-eval's loglikelihood requests
    take the last entry as the generated one, as vLLM's output ids include the EOS)."""
    ids, entries = list(result.token_ids), list(result.logprobs or [])
    if result.stop_logprob is not None:
        ids.append(result.stop_logprob.token_id)
        entries.append(result.stop_logprob)
    return ids, entries


class _Echo:
    """What /v1/completions with echo puts before each prompt's choices: the prompt's text and,
    with logprobs, its tokens' log-probabilities (the first has none)."""

    def __init__(self, texts: List[str], ids: List[List[int]], logprobs: Optional[list]):
        self.texts, self.ids, self.logprobs = texts, ids, logprobs


class _StreamRenderer:
    """Turns a job's items into chat.completion.chunk / text_completion SSE events."""

    def __init__(self, chat: bool, model: str, include_usage: bool, n_choices: int, n: int,
                 return_token_ids: bool = False, fmt: Optional[_Logprobs] = None,
                 echo: Optional[_Echo] = None, tools_legacy: Optional[bool] = None):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.n_choices, self.n = n_choices, n
        self.return_token_ids = return_token_ids
        self.fmt, self.echo = fmt, echo
        self.tools_legacy = tools_legacy        # not None: a ReAct answer, sent whole at its end
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.started = [False] * n_choices
        self.offsets = [0] * n_choices
        self.results: list = [None] * n_choices

    def _chunk(self, i: int, delta: Optional[dict] = None, text: str = "", finish_reason=None,
               logprobs=None) -> dict:
        if self.chat:
            choice = {"index": i, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [choice]}
        else:
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = {"id": self.id, "object": "text_completion", "created": self.created,
                   "model": self.model, "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return obj

    def _lp(self, i: int, ids: list, entries: list):
        if self.fmt is None:
            return None
        if self.chat:
            return {"content": self.fmt.chat(entries), "refusal": None}
        obj, self.offsets[i] = self.fmt.completion(ids, entries, self.offsets[i])
        return obj

    def head(self) -> List[bytes]:
        if self.chat:
            return [_sse(self._chunk(i, {"role": "assistant", "content": ""}))
                    for i in range(self.n_choices)]
        if self.echo is None:
            return []
        out = []
        for i in range(self.n_choices):
            p = i // self.n
            lp = None
            if self.fmt is not None:
                lp = self._lp(i, self.echo.ids[p], self.echo.logprobs[p])
            else:
                self.offsets[i] = len(self.echo.texts[p])
            out.append(_sse(self._chunk(i, text=self.echo.texts[p], logprobs=lp)))
        return out

    def delta(self, i: int, d: str, entries: list) -> List[bytes]:
        if self.tools_legacy is not None:       # a call or an answer: known at the end
            return []
        if self.chat and not self.started[i]:     # as Engine.chat_stream: no leading whitespace
            d = d.lstrip()
        if not d and not entries:
            return []
        if d:
            self.started[i] = True
        lp = self._lp(i, [e.token_id for e in entries], entries) if entries else None
        if not self.chat and self.fmt is None:
            self.offsets[i] += len(d)
        return [_sse(self._chunk(i, {"content": d} if d else {}, logprobs=lp) if self.chat
                     else self._chunk(i, text=d, logprobs=lp))]

    def end(self, i: int, result, entries: list) -> List[bytes]:
        self.results[i] = result
        if self.tools_legacy is not None:
            message, finish = _tool_message(result, self.tools_legacy)
            delta = {k: v for k, v in message.items() if k != "role" and v is not None}
            if "tool_calls" in delta:
                delta["tool_calls"] = [dict(c, index=0) for c in delta["tool_calls"]]
            out = [_sse(self._chunk(i, delta))] if delta else []
            last = self._chunk(i, finish_reason=finish)
            if self.return_token_ids:
                last["choices"][0]["token_ids"] = list(result.token_ids)
            return out + [_sse(last)]
        if not self.chat and self.fmt is not None and result.stop_logprob is not None:
            entries = list(entries) + [result.stop_logprob]
        lp = self._lp(i, [e.token_id for e in entries], entries) if entries else None
        last = self._chunk(i, finish_reason=result.finish_reason, logprobs=lp)
        if self.return_token_ids:
            last["choices"][0]["token_ids"] = list(result.token_ids)
        return [_sse(last)]

    def done(self) -> List[bytes]:
        out = []
        if self.include_usage:
            obj = self._chunk(0)
            obj["choices"] = []
            obj["usage"] = _usage(self.results, self.n)
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

        async def body(chunk: bytes, more: bool = True):
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

        listener = asyncio.ensure_future(wait_disconnect())
        getter = None
        pending = len(self.job.iterators)
        try:
            self.job.start(self.executor)
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
                + self.extra_headers})
            for event in self.renderer.head():
                await body(event)
            while pending:
                getter = asyncio.ensure_future(self.job.queue.get())
                left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                done, _ = await asyncio.wait({getter, listener}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:                    # past the deadline: an error event, then [DONE]
                    err = _timeout_error(self.job, self.timeout)
                    self.job.cancel()
                    log.info("%s: %s", self.renderer.id, err.message)
                    for event in self.renderer.error(err):
                        await body(event)
                    await body(b"", more=False)
                    return
                if getter not in done:          # the client went away
                    log.info("client disconnected from %s; generation stopped", self.renderer.id)
                    return
                i, kind, payload = getter.result()
                getter = None
                if kind == "error":
                    self.job.cancel()
                    for event in self.renderer.error(payload):
                        await body(event)
                    await body(b"", more=False)
                    return
                if kind == "delta":
                    events = self.renderer.delta(i, *payload)
                else:
                    events = self.renderer.end(i, *payload)
                    pending -= 1
                for event in events:
                    await body(event)
            for event in self.renderer.done():
                await body(event)
            await body(b"", more=False)
        except OSError:                         # the write failed: the client is gone
            log.info("client connection lost on %s; generation stopped", self.renderer.id)
        finally:
            self.job.cancel()                   # no-op when the job has finished
            listener.cancel()
            if getter is not None:
                getter.cancel()


async def _whole(job: _StreamJob, request: Request, executor: ThreadPoolExecutor,
                 timeout: Optional[float] = None):
    """Run a job's choices to their end and return their GenerationResults, or None if the
    client disconnects first (the generations are then cancelled). Deltas are dropped: the
    results hold the text and the logprobs. Past `timeout` seconds the generations are
    cancelled and the timeout's APIError raised."""
    deadline = None if timeout is None else time.monotonic() + timeout

    async def wait_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(wait_disconnect())
    getter = None
    results: list = [None] * len(job.iterators)
    pending = len(results)
    job.start(executor)
    try:
        while pending:
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
            i, kind, payload = getter.result()
            getter = None
            if kind == "end":
                results[i] = payload[0]
                pending -= 1
            elif kind == "error":
                raise payload if isinstance(payload, APIError) else _engine_error(payload)
        return results
    finally:
        job.cancel()                            # no-op when the job has finished
        listener.cancel()
        if getter is not None:
            getter.cancel()


def _echo_only(prep, echo: _Echo, fmt: Optional[_Logprobs], model: str) -> dict:
    """/v1/completions with echo and max_tokens 0: each prompt's text and, with logprobs, its
    tokens' log-probabilities; nothing generated."""
    choices = []
    for i, ids in enumerate(prep.choice_prompts):
        p = i // prep.n
        lp = fmt.completion(ids, echo.logprobs[p], 0)[0] if fmt is not None else None
        choices.append({"index": i, "text": echo.texts[p], "logprobs": lp, "finish_reason": "length"})
    prompt = sum(len(ids) for ids in prep.prompts)
    return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt,
                      "prompt_tokens_details": {"cached_tokens": 0}}}


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


# The text chatml.make_context builds, as a Jinja template (Qwen's release has none). Its token
# ids can differ from the server's own chat prompt where make_context encodes a role and its
# content apart; the text is the same.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready",
              "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")


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
            await _response(_engine_error(e))(scope, receive, send_with_id)
        finally:
            path, method = scope.get("path", ""), scope.get("method", "")
            endpoint = path if path in _ENDPOINTS else (
                "/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            self.metrics.http_requests.labels(endpoint, method, str(status[0] or 500)).inc()
            log.info("%s %s %s %d %.3fs", rid, method, path, status[0] or 500,
                     time.perf_counter() - t0)


def _version() -> str:
    from . import __version__
    return __version__


_ERRORS = {status: {"model": P.ErrorResponse, "description": what} for status, what in (
    (400, "Bad JSON, a bad parameter (named in error.param), or a prompt over the context"),
    (401, "Missing or wrong API key"), (404, "Unknown model"),
    (413, "Body over --max-body-bytes"), (415, "Body not sent as application/json"),
    (503, "Queue full (--max-waiting), still queued at the deadline, or shutting down; "
          "Retry-After says when to retry"),
    (504, "Past the request's deadline while generating"))}


def _completion_responses(whole, chunk) -> dict:
    out = dict(_ERRORS)
    out[200] = {"model": whole, "description": f"{whole.__name__}; with stream: true, server-sent "
                f"events of {chunk.__name__} objects, then data: [DONE]",
                "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}}}
    return out


def _body(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def _document(app: FastAPI) -> None:
    """/openapi.json with the request bodies: the routes read their bodies themselves (to answer
    OpenAI-style errors), so FastAPI does not see their models; they are added here."""
    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (*P.REQUEST_MODELS.values(), P.ChatCompletionChunk):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi


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

    app = FastAPI(title="qwen_fast", version=_version(), lifespan=lifespan, docs_url="/docs",
                  redoc_url=None, openapi_url="/openapi.json",
                  description="An OpenAI-compatible API over one Qwen-1.8B-Chat engine. Errors are "
                              "OpenAI error objects (ErrorResponse) naming the bad parameter.")
    _document(app)
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
        return _response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _response(APIError(exc.status_code, str(exc.detail), code=code,
                                  headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return _response(_engine_error(exc))

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

    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    async def health():
        """Liveness: the process answers (never needs the key)."""
        return {"status": "ok", "model": o.model_name}

    @app.get("/ready")
    @app.head("/ready", include_in_schema=False)
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

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses=_ERRORS)
    async def model(model_id: str, request: Request):
        check_auth(request)
        if model_id != o.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return model_card()

    def on_end(job: _StreamJob, stream, finish_reason) -> None:
        if job.timed_out:
            metrics.rejected.labels("timeout").inc()
        metrics.observe_request(getattr(stream, "request", None), finish_reason)

    fmt = _Logprobs(engine.tokenizer)

    def prepare(body: dict, chat: bool, opts: api.Options):
        """(Prepared, _Echo or None) in a worker thread: tokenizing and scoring take time."""
        if chat:
            if opts.tools is not None:
                prompts = [api.react_prompt(engine, body.get("messages"), opts.tools)]
            else:
                prompts = [api.chat_prompt(engine, api.chat_messages(body))]
            prep = api.prepare(engine, prompts, opts, engine.chat_stop_ids)
            return prep, None
        prompts = api.prompt_list(engine, body.get("prompt"))
        prep = api.prepare(engine, prompts, opts, [])
        echo = None
        if opts.echo:
            raw = body.get("prompt")
            texts = [raw] if isinstance(raw, str) else (
                [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in raw]
                if raw and isinstance(raw[0], (str, list)) else [engine.tokenizer.decode(raw)])
            lps = None
            if opts.logprobs is not None:
                lps = [engine.prompt_logprobs(ids, opts.logprobs) for ids in prompts]
            echo = _Echo(texts, prompts, lps)
        return prep, echo

    async def complete(request: Request, chat: bool):
        check_auth(request)
        if state["shutting_down"]:
            raise overloaded("the server is shutting down; retry on another replica")
        body = await _read_json(request, o.max_body_bytes)
        check_model(body)
        opts = api.parse_options(body, chat, o.request_timeout)
        rid = request.scope.get("state", {}).get("request_id", "-")
        headers = {}
        if opts.ignored:
            log.warning("%s: ignored unknown fields %s", rid, ", ".join(map(repr, opts.ignored)))
            # Header values are Latin-1 bytes: names are percent-encoded (UTF-8), as in URLs.
            headers["X-Ignored-Fields"] = ",".join(quote(n, safe="-_.~") for n in opts.ignored)[:1024]
        try:
            prep, echo = await run_in_threadpool(prepare, body, chat, opts)
            generate = opts.max_tokens != 0
            streams = []
            if generate:
                streams = await run_in_threadpool(engine.streams, prep.choice_prompts,
                                                  params=prep.params, max_waiting=o.max_waiting)
        except APIError:
            raise
        except OverloadedError as e:
            raise overloaded(str(e)) from None
        except RequestError as e:
            err = _engine_error(e, opts.max_tokens_param)
            if chat and err.param in (None, "prompt") and not isinstance(e, CapacityError):
                err.param = "messages"
            raise err from None
        except Exception as e:
            raise _engine_error(e) from None
        n_choices = len(prep.choice_prompts)
        lp_fmt = fmt if opts.logprobs is not None else None
        if not generate:                        # echo with max_tokens 0: the prompts, scored
            return JSONResponse(_echo_only(prep, echo, lp_fmt, o.model_name), headers=headers)
        job = _StreamJob(streams, asyncio.get_running_loop(), on_end, logprobs=lp_fmt is not None)
        if opts.stream:
            renderer = _StreamRenderer(chat, o.model_name, opts.include_usage, n_choices, prep.n,
                                       opts.return_token_ids, lp_fmt, echo,
                                       opts.legacy_functions if opts.tools else None)
            return _SSEResponse(job, renderer, executor, opts.timeout, headers)
        results = await _whole(job, request, executor, opts.timeout)
        if results is None:                     # the client went away: nobody to answer
            return Response(status_code=499)
        choices = []
        for i, result in enumerate(results):
            if chat and opts.tools:
                message, finish = _tool_message(result, opts.legacy_functions)
                choice = {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
            elif chat:
                choice = {"index": i, "message": {"role": "assistant", "content": result.text.lstrip()},
                          "logprobs": None, "finish_reason": result.finish_reason}
                if lp_fmt is not None:
                    choice["logprobs"] = {"content": lp_fmt.chat(result.logprobs or []), "refusal": None}
            else:
                text, lp = result.text, None
                p = i // prep.n
                if echo is not None:
                    text = echo.texts[p] + text
                if lp_fmt is not None:
                    ids, entries = _scored(result)
                    if echo is not None:
                        ids, entries = echo.ids[p] + ids, echo.logprobs[p] + entries
                    lp, _ = lp_fmt.completion(ids, entries, 0)
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": result.finish_reason}
            if opts.return_token_ids:
                choice["token_ids"] = list(result.token_ids)
            choices.append(choice)
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        return JSONResponse({"id": cid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": o.model_name,
                             "choices": choices, "usage": _usage(results, prep.n)}, headers=headers)

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=_ERRORS,
              openapi_extra=_body("TokenizeRequest"))
    async def tokenize(request: Request):
        """vLLM's /tokenize: {"prompt": text} or {"messages": [...]} -> {"count", "max_model_len",
        "tokens", "token_strs"}."""
        check_auth(request)
        body = await _read_json(request, o.max_body_bytes)
        check_model(body)

        def run():
            if "messages" in body:
                if body.get("add_generation_prompt") is False:
                    raise _bad("add_generation_prompt: false is not supported (the ChatML prompt "
                               "always ends with the assistant's opening)", param="add_generation_prompt")
                ids = api.chat_prompt(engine, api.chat_messages(body))
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise _bad("prompt must be a string (or send messages)", param="prompt")
                ids = engine.tokenizer.encode(prompt) if prompt else []
            out = {"count": len(ids), "max_model_len": engine.cfg.max_context, "tokens": ids,
                   "token_strs": None}
            if api.get_bool(body, "return_token_strs"):
                out["token_strs"] = [fmt.token(t)[0] for t in ids]
            return out
        return await run_in_threadpool(run)

    @app.get("/tokenizer_info", response_model=P.TokenizerInfo, responses=_ERRORS)
    async def tokenizer_info(request: Request):
        """vLLM's /tokenizer_info (lm-eval's remote tokenizer reads it): the special tokens, the
        context length, and a ChatML template that renders the text chat completions use."""
        check_auth(request)
        tok = engine.tokenizer
        return {"tokenizer_class": "QWenTokenizer", "eos_token": "<|endoftext|>",
                "bos_token": None, "pad_token": None, "unk_token": None,
                "model_max_length": engine.cfg.max_context, "vocab_size": len(tok),
                "chat_template": CHATML_TEMPLATE}

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=_ERRORS,
              openapi_extra=_body("DetokenizeRequest"))
    async def detokenize(request: Request):
        """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
        check_auth(request)
        body = await _read_json(request, o.max_body_bytes)
        check_model(body)
        ids = body.get("tokens")
        V = len(engine.tokenizer)
        if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < V for t in ids):
            raise _bad(f"tokens must be a list of token ids in [0, {V})", param="tokens")
        return {"prompt": engine.tokenizer.decode(ids)}

    @app.post("/v1/chat/completions", responses=_completion_responses(P.ChatCompletion, P.ChatCompletionChunk),
              openapi_extra=_body("ChatCompletionRequest"))
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions", responses=_completion_responses(P.Completion, P.Completion),
              openapi_extra=_body("CompletionRequest"))
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
