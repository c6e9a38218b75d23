"""The OpenAI API's request side, without HTTP: error objects, which body fields are read,
accepted or refused, the checked options of a completion request, its prompts, and their
preparation into Engine prompts and SamplingParams (qwen_fast/server.py serves them).

Everything here raises APIError (an OpenAI error object with the parameter's name), never a
bare exception, for anything a client sent.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Dict, List, Optional

from . import protocol
from . import tools as tools_mod
from .errors import CapacityError, NumericalError, QwenFastError, RequestError
from .protocol import MAX_CHOICES, MAX_LOGPROBS, MAX_SEED

log = logging.getLogger("qwen_fast.server")

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# Engine parameter names that have another name in the OpenAI API (for error objects).
_API_NAME = {"max_new_tokens": "max_tokens", "token_ids": "prompt", "json_schema": "response_format"}


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


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_error(e: BaseException, max_tokens_param: str = "max_tokens") -> APIError:
    """The package's error types -> status and error object (the parameter from
    RequestError.param, under its API name)."""
    if isinstance(e, CapacityError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, RequestError):
        param = e.param
        if param == "max_new_tokens":
            param = max_tokens_param
        return APIError(400, str(e), param=_API_NAME.get(param, param))
    if isinstance(e, NumericalError):
        return APIError(500, f"the model failed on this request: {e}", type="server_error")
    if isinstance(e, QwenFastError):
        return APIError(500, f"{type(e).__name__}: {e}", type="server_error")
    log.error("internal error", exc_info=e)
    return APIError(500, "internal server error", type="server_error")


# ---- values ------------------------------------------------------------------------------
def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def get_int(body: dict, name: str, lo: Optional[int] = None, hi: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = (f" >= {lo}" if hi is None else f" in [{lo}, {hi}]") if lo is not None else ""
        raise bad(f"{name} must be an integer{rng}, got {json.dumps(v)[:60]}", param=name)
    return v


def get_num(body: dict, name: str, what: str, ok) -> Optional[float]:
    v = body.get(name)
    if v is None:
        return None
    if not is_num(v) or not ok(v):
        raise bad(f"{name} must be {what}, got {json.dumps(v)[:60]}", param=name)
    return float(v)


def get_bool(body: dict, name: str) -> Optional[bool]:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {json.dumps(v)[:60]}", param=name)
    return v


# ---- which body fields a request may carry -------------------------------------------------
# The fields the server reads, or accepts because they only describe the caller (user, metadata,
# ...): those the request models of qwen_fast/protocol.py declare (what /openapi.json documents).
_CHAT_FIELDS = frozenset(protocol.ChatCompletionRequest.model_fields)
_COMPLETION_FIELDS = frozenset(protocol.CompletionRequest.model_fields)
# Other servers' sampling and decoding fields that would change the answer: refused by name
# rather than ignored, so a client that relies on one learns that it had no effect.
_REFUSED_EXTENSIONS = frozenset({
    "typical_p", "top_a", "tfs_z", "min_tokens", "length_penalty", "use_beam_search",
    "early_stopping", "mirostat", "mirostat_tau", "mirostat_eta", "repeat_penalty",
    "repeat_last_n", "penalize_nl", "dry_multiplier", "xtc_probability", "n_probs", "grammar",
    "json_schema", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "structured_outputs", "prompt_logprobs", "bad_words",
    "allowed_token_ids", "include_stop_str_in_output", "truncate_prompt_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "logits_processors",
    "min_new_tokens", "do_sample", "num_beams", "no_repeat_ngram_size"})


def check_fields(body: dict, chat: bool) -> List[str]:
    """Refuse known fields this server cannot honour; return the unknown ones (accepted, and
    named in a warning and the X-Ignored-Fields header). Why accept unknown fields: clients
    and frameworks add fields of their own (tracing ids, newer OpenAI options that describe the
    caller), and refusing them would break those clients for nothing; the fields that would
    change an answer are the ones refused above."""
    known = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name in body:
        if name in _REFUSED_EXTENSIONS:
            raise bad(f"{name} is not supported by this server (it would change the answer, so "
                      "it is refused rather than ignored)", param=name, code="unsupported_parameter")
    return sorted(name for name in body if name not in known)


def _refuse_unsupported(body: dict) -> None:
    unsupported = {
        "suffix": lambda v: v not in (None, ""),
    }
    for name, is_bad in unsupported.items():
        if is_bad(body.get(name)):
            raise bad(f"{name} is not supported by this server", param=name,
                      code="unsupported_parameter")


# ---- the options of a completion request ---------------------------------------------------
class Options:
    """What a request asks for, checked: sampling overrides and how to answer."""

    def __init__(self):
        self.overrides: Dict[str, Any] = {}
        self.stream = False
        self.include_usage = False
        self.max_tokens: Optional[int] = None   # None: the checkpoint's default
        self.max_tokens_param = "max_tokens"    # the name the client used
        self.return_token_ids = False
        self.timeout: Optional[float] = None    # seconds from arrival, or None
        self.ignored: List[str] = []            # unknown fields, accepted and named in a warning
        self.n = 1
        self.logprobs: Optional[int] = None     # None: none; k: the chosen token's and top k
        self.echo = False                       # completions: the prompt leads the text
        self.tools: Optional[List[dict]] = None  # chat: functions offered (the ReAct prompt)
        self.legacy_functions = False           # offered as `functions` (answer: function_call)


def parse_options(body: dict, chat: bool, default_timeout: Optional[float] = None) -> Options:
    o = Options()
    o.ignored = check_fields(body, chat)
    _refuse_unsupported(body)
    ov = o.overrides
    o.n = get_int(body, "n", lo=1, hi=MAX_CHOICES) or 1
    bo = body.get("best_of")
    if bo is not None and bo != o.n:
        raise bad(f"best_of is not supported (choices are not ranked here): leave it out or equal "
                  f"to n, got {json.dumps(bo)[:40]}", param="best_of", code="unsupported_parameter")
    t = get_num(body, "temperature", "a number >= 0 (0 = greedy)", lambda v: v >= 0)
    if t is not None:
        ov["temperature"] = t
    p = get_num(body, "top_p", "a number in (0, 1]", lambda v: 0 < v <= 1)
    if p is not None:
        ov["top_p"] = p
    k = get_int(body, "top_k", lo=-1)
    if k is not None:
        ov["top_k"] = max(k, 0)
    rp = get_num(body, "repetition_penalty", "a number > 0 (1 = off)", lambda v: v > 0)
    if rp is not None:
        ov["repetition_penalty"] = rp
    for name in ("presence_penalty", "frequency_penalty"):
        v = get_num(body, name, "a number in [-2, 2]", lambda v: -2 <= v <= 2)
        if v:
            ov[name] = v
    mp = get_num(body, "min_p", "a number in [0, 1]", lambda v: 0 <= v <= 1)
    if mp:
        ov["min_p"] = mp
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise bad("logit_bias must be an object mapping token ids to biases in [-100, 100]",
                      param="logit_bias")
        if lb:
            ov["logit_bias"] = lb          # SamplingParams checks ids and values
    # logprobs: chat has a flag and top_logprobs; completions an integer (top k).
    if chat:
        flag = get_bool(body, "logprobs")
        top = get_int(body, "top_logprobs", lo=0, hi=MAX_LOGPROBS)
        if top is not None and not flag:
            raise bad("top_logprobs needs logprobs: true", param="top_logprobs")
        o.logprobs = (top or 0) if flag else None
    else:
        o.logprobs = get_int(body, "logprobs", lo=0, hi=MAX_LOGPROBS)
        o.echo = bool(get_bool(body, "echo"))
    if o.logprobs is not None:
        ov["logprobs"] = o.logprobs
    if chat:
        _parse_tools(body, o)
        rf = _response_format(body.get("response_format"))
        if rf is not None:
            if o.tools is not None:
                raise bad("response_format cannot be combined with tools", param="response_format")
            ov["json_schema"] = rf
        if o.tools is not None and o.logprobs is not None:
            raise bad("logprobs cannot be combined with tools (the answer is parsed from the "
                      "model's ReAct text)", param="logprobs")
    # max_completion_tokens (OpenAI's newer name) wins over max_tokens, on both endpoints; 0
    # only with echo (a prompt scored, nothing generated: lm-eval's loglikelihood requests).
    lo = 0 if o.echo else 1
    mt = get_int(body, "max_tokens", lo=lo)
    mct = get_int(body, "max_completion_tokens", lo=lo)
    if mct is not None:
        mt, o.max_tokens_param = mct, "max_completion_tokens"
    o.max_tokens = mt
    if mt:
        ov["max_new_tokens"] = mt
    if "speculative" in body:               # null: off, even when the server's default is on
        sp = body["speculative"]
        if sp not in (None, "ngram"):
            raise bad(f"speculative must be 'ngram' (prompt lookup) or null, got "
                      f"{json.dumps(sp)[:40]}", param="speculative")
        ov["speculative"] = sp
    for name, hi in (("num_speculative_tokens", 64), ("ngram_min", 16), ("ngram_max", 16)):
        v = get_int(body, name, lo=1, hi=hi)
        if v is not None:
            ov[name] = v
    seed = get_int(body, "seed", lo=0, hi=MAX_SEED)
    if seed is not None:
        ov["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
            raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                      f"of them, each at most {MAX_STOP_CHARS} characters", param="stop")
        if stops:
            ov["stop"] = list(stops)
    ie = get_bool(body, "ignore_eos")
    if ie is not None:
        ov["ignore_eos"] = ie
    sti = body.get("stop_token_ids")
    if sti is not None:
        if not isinstance(sti, list) or not all(is_int(t) and t >= 0 for t in sti):
            raise bad("stop_token_ids must be a list of token ids", param="stop_token_ids")
        ov["stop_token_ids"] = list(sti)
    o.stream = bool(get_bool(body, "stream"))
    so = body.get("stream_options")
    if so is not None:
        if not o.stream:
            raise bad("stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance(so, dict):
            raise bad("stream_options must be an object", param="stream_options")
        o.include_usage = bool(get_bool(so, "include_usage"))
    timeout = get_num(body, "request_timeout", "a number of seconds > 0", lambda v: v > 0)
    o.timeout = timeout if timeout is not None else default_timeout
    o.return_token_ids = bool(get_bool(body, "return_token_ids"))
    if o.tools:                     # the model would go on to invent the tool's answer
        ov["stop"] = list(ov.get("stop", [])) + [tools_mod.STOP_STRING]
    return o


def _response_format(rf) -> Any:
    """response_format -> the json_schema sampling parameter (None: plain text)."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                  "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}",
                  param="response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return True
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise bad("response_format.json_schema must be an object with a schema", param="response_format")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise bad("response_format.json_schema.schema must be a JSON schema object",
                  param="response_format")
    return schema


def _parse_tools(body: dict, o: Options) -> None:
    tools, functions = body.get("tools"), body.get("functions")
    choice = body.get("tool_choice", body.get("function_call"))
    name = "tool_choice" if "tool_choice" in body else "function_call"
    if choice not in (None, "auto", "none"):
        raise bad(f"{name} {json.dumps(choice)[:80]} is not supported: only \"auto\" (the model "
                  "decides) or \"none\"; the release's ReAct format cannot force a call",
                  param=name, code="unsupported_parameter")
    try:
        specs = tools_mod.function_specs(tools, functions)
    except RequestError as e:
        raise bad(str(e), param=e.param) from None
    msgs = body.get("messages")
    uses_tools = isinstance(msgs, list) and any(
        isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls")
                                 or m.get("function_call")) for m in msgs)
    if specs or uses_tools:
        o.tools = [] if choice == "none" else specs
        o.legacy_functions = bool(functions) and not tools


# ---- messages and prompts ----------------------------------------------------------------
def _text_content(i: int, m: dict) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):      # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content[{j}]: only text parts "
                          '({"type": "text", "text": ...}) are supported', param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts, got "
              f"{type(content).__name__ if content is not None else 'null'}", param="messages")


def chat_messages(body: dict) -> List[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content", param="messages")
        role = m.get("role")
        if role == "developer":         # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role must be 'system', 'user' or 'assistant', got "
                      f"{json.dumps(role)[:40]}", param="messages")
        out.append({"role": role, "content": _text_content(i, m)})
    return out


def prompt_list(engine, prompt) -> List[List[int]]:
    """The prompts of a /v1/completions body (a string, token ids, or a list of either: a
    batch), read by Engine.encode_prompts, as generate() reads them."""
    if isinstance(prompt, list) and len(prompt) > MAX_CHOICES and isinstance(prompt[0], (str, list)):
        raise bad(f"prompt has {len(prompt)} prompts; at most {MAX_CHOICES} a request", param="prompt")
    if not isinstance(prompt, (str, list)):
        raise bad("prompt must be a non-empty string, a list of token ids, or a list of either",
                  param="prompt")
    try:
        return engine.encode_prompts(prompt)[0]
    except RequestError as e:
        err = engine_error(e)
        err.param = "prompt"
        raise err from None


# ---- preparing a request (runs in a worker thread: tokenizing a long prompt takes time) ---
class Prepared:
    """prompts[i]'s choices are choices[i * n : (i + 1) * n]; params[c] is choice c's."""

    def __init__(self, prompts: List[List[int]], params: list, n: int):
        self.prompts, self.params, self.n = prompts, params, n

    @property
    def choice_prompts(self) -> List[List[int]]:
        return [ids for ids in self.prompts for _ in range(self.n)]


def prepare(engine, prompts: List[List[int]], opts: Options, extra_stop_ids: List[int]) -> Prepared:
    ctx = engine.cfg.max_context
    if len(prompts) * opts.n > MAX_CHOICES:
        raise bad(f"{len(prompts)} prompts x n={opts.n} is {len(prompts) * opts.n} choices; at most "
                  f"{MAX_CHOICES} a request", param="n")
    where = "messages" if extra_stop_ids else "prompt"
    for ids in prompts:
        n = len(ids)
        if n >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt "
                                f"has {n} tokens", param=where, code="context_length_exceeded")
        if opts.max_tokens and n + opts.max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens, but "
                                f"{n + opts.max_tokens} were requested ({n} in the prompt, "
                                f"{opts.max_tokens} for the completion); lower {opts.max_tokens_param}",
                           param=opts.max_tokens_param, code="context_length_exceeded")
    ov = dict(opts.overrides)
    if extra_stop_ids:
        ov["stop_token_ids"] = list(ov.get("stop_token_ids", [])) + extra_stop_ids
    try:
        base = engine.sampling_params(**ov)
    except RequestError as e:
        raise engine_error(e, opts.max_tokens_param) from None
    # With a seed, choice j of every prompt draws from seed + j: n choices differ, and a prompt
    # sent alone with the same n and seed gets the same choices.
    params = []
    for _ in prompts:
        for j in range(opts.n):
            params.append(base if base.seed is None or j == 0 else
                          base.replace(seed=(base.seed + j) % (MAX_SEED + 1)))
    return Prepared(prompts, params, opts.n)


def chat_prompt(engine, messages: List[dict]) -> List[int]:
    """The ChatML prompt of OpenAI messages: Engine.chat_prompt, the prompt Engine.chat sends."""
    if engine.generation_config.chat_format != "chatml":
        raise bad(f"this checkpoint's chat_format is {engine.generation_config.chat_format!r}, not "
                  "'chatml' (a base model?): use /v1/completions", param="messages")
    try:
        return engine.chat_prompt(messages)
    except RequestError as e:          # a CapacityError stays context_length_exceeded
        err = engine_error(e)
        err.param = "messages"
        raise err from None


def react_prompt(engine, messages, specs: List[dict]) -> List[int]:
    """The release's ReAct prompt (qwen_fast/tools.py) of messages with tools and tool results."""
    if engine.generation_config.chat_format != "chatml":
        raise bad("tools need a chat model (chat_format 'chatml')", param="messages")
    try:
        query, history, system = tools_mod.react_turns(messages, specs)
        if query is not None:
            return engine.chat_prompt(query, history, system)
        return tools_mod.continuation_ids(engine.tokenizer, history, system)
    except RequestError as e:
        err = engine_error(e)
        err.param = e.param if e.param in ("tools", "functions") else "messages"
        raise err from None
