"""The HTTP API's bodies as pydantic models: what /openapi.json and /docs document.

The request models declare every field the server reads, with its type, range and meaning; the
request side (qwen_fast/api.py) takes its lists of known fields from them, and checks the values
itself so that each error names its parameter the way OpenAI's do. The response models are
exactly what the server sends (``extra="forbid"``: the tests validate real responses against
them, so a field added to one and not the other fails).
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .sampling import MAX_LOGPROBS, MAX_SEED

MAX_CHOICES = 64        # prompts x n of one request: each is a sequence in the engine's batch


# ---- requests --------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: Optional[bool] = Field(None, description="Send a last chunk with the usage.")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(description="The arguments as the model wrote them (JSON text).")


class ToolCall(_Request):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="'developer' is read as 'system'; 'tool' (or legacy 'function') carries a "
                    "tool's result, after the assistant message that called it.")
    content: Union[str, List[TextPart], None] = Field(None, description="Text, or a list of text parts.")
    tool_calls: Optional[List[ToolCall]] = Field(None, description="An assistant's tool call "
                                                 "(one a message: the ReAct format has one action "
                                                 "at a time).")
    function_call: Optional[FunctionCall] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None


class _Sampling(_Request):
    model: Optional[str] = Field(None, description="The served model's id (optional: there is one).")
    temperature: Optional[float] = Field(None, ge=0, description="0 = greedy. Default: the "
                                         "checkpoint's generation_config.json.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Default: generation_config.json (0.8).")
    n: Optional[int] = Field(None, ge=1, le=MAX_CHOICES, description="Choices for each prompt, "
                             "decoded together; with a seed, choice j draws from seed + j.")
    max_tokens: Optional[int] = Field(None, ge=0, description="New tokens at most (default: "
                                      "generation_config.json, 512); 0 only with echo.")
    max_completion_tokens: Optional[int] = Field(None, ge=0, description="OpenAI's newer name "
                                                 "for max_tokens; wins over it.")
    stop: Union[str, List[str], None] = Field(None, description="Up to 16 strings of at most 256 "
                                              "characters; the text ends before the first.")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="Seeded sampling: the "
                                "release's torch.manual_seed(seed) draws.")
    stream: Optional[bool] = Field(None, description="Server-sent events, then data: [DONE].")
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, description="Subtracted from the "
                                              "score of every token generated so far.")
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, description="Times each "
                                               "token's count in the generated text, subtracted.")
    logit_bias: Optional[Dict[str, float]] = Field(None, description="Token id -> bias in "
                                                   "[-100, 100], added after the penalties.")
    user: Optional[str] = Field(None, description="Accepted; not used.")
    metadata: Optional[Dict[str, Any]] = Field(None, description="Accepted; not used.")
    store: Optional[bool] = Field(None, description="Accepted; nothing is stored.")
    service_tier: Optional[str] = Field(None, description="Accepted; not used.")
    # extensions
    top_k: Optional[int] = Field(None, ge=-1, description="0 or -1 = off.")
    min_p: Optional[float] = Field(None, ge=0, le=1, description="Drop tokens below min_p times "
                                   "the most likely one's probability (after top-p).")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="The release's penalty "
                                                "(default 1.1 from generation_config.json).")
    ignore_eos: Optional[bool] = Field(None, description="Go on past <|endoftext|>.")
    stop_token_ids: Optional[List[int]] = Field(None, description="More ids that end the answer.")
    return_token_ids: Optional[bool] = Field(None, description="Each choice carries token_ids.")
    speculative: Optional[str] = Field(None, description="'ngram': prompt-lookup speculation "
                                       "(drafts from the request's own tokens, verified in one "
                                       "step; the same output). Default: the server's "
                                       "--speculative.")
    num_speculative_tokens: Optional[int] = Field(None, ge=1, le=64, description="Draft tokens "
                                                  "a step at most (default 8).")
    ngram_min: Optional[int] = Field(None, ge=1, le=16, description="Shortest n-gram looked up "
                                     "(default 1).")
    ngram_max: Optional[int] = Field(None, ge=1, le=16, description="Longest n-gram looked up, "
                                     "tried first (default 4).")
    request_timeout: Optional[float] = Field(None, gt=0, description="Seconds: still queued "
                                             "then -> 503; generating -> 504 (streamed: an error "
                                             "event).")


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = Field(None, description="Log-probabilities of the answer's tokens.")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives "
                                        "for each token (needs logprobs: true).")
    tools: Optional[List[Dict[str, Any]]] = Field(None, description="Functions the model may "
                                                  "call: the release's ReAct prompt (qwen_fast/tools.py).")
    functions: Optional[List[Dict[str, Any]]] = Field(None, description="Legacy form of tools "
                                                      "(the answer then has function_call).")
    tool_choice: Union[str, Dict[str, Any], None] = Field(None, description="'auto' (default) or "
                                                          "'none'; forcing a call is refused.")
    function_call: Union[str, Dict[str, Any], None] = Field(None, description="Legacy tool_choice.")
    parallel_tool_calls: Optional[bool] = Field(None, description="Accepted; one call at a time.")
    response_format: Optional[Dict[str, Any]] = Field(None, description="{'type': 'text'}, "
                                                      "{'type': 'json_object'} or {'type': "
                                                      "'json_schema', 'json_schema': {'name', "
                                                      "'schema'}}: constrained decoding "
                                                      "(qwen_fast/constrained.py).")
    modalities: Optional[List[str]] = Field(None, description="Accepted; text only.")
    reasoning_effort: Optional[str] = Field(None, description="Accepted; not used.")


class CompletionRequest(_Sampling):
    prompt: Union[str, List[int], List[str], List[List[int]]] = Field(
        description="Text, token ids, or a list of either (a batch: prompt i's choices are "
                    "i*n .. i*n+n-1).")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="The chosen token's "
                                    "log-probability and this many alternatives.")
    echo: Optional[bool] = Field(None, description="The prompt (and, with logprobs, its tokens' "
                                 "log-probabilities) before the answer.")
    best_of: Optional[int] = Field(None, description="Only equal to n (choices are not ranked).")
    suffix: Optional[str] = Field(None, description="Refused.")


class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = Field(None, description="Text to tokenize ...")
    messages: Optional[List[ChatMessage]] = Field(None, description="... or messages, as the "
                                                  "chat prompt.")
    add_special_tokens: Optional[bool] = Field(None, description="Accepted (Qwen adds none).")
    add_generation_prompt: Optional[bool] = Field(None, description="Only true.")
    return_token_strs: Optional[bool] = None


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: List[int]


# ---- responses -------------------------------------------------------------------------------
class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Response):
    cached_tokens: int = Field(description="Prompt tokens the prefix cache supplied.")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: List[int]


class TokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob]


class ChatLogprobs(_Response):
    content: List[TokenLogprob]
    refusal: None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ToolCallDelta(ToolCallOut):
    index: int


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: Optional[str]
    tool_calls: Optional[List[ToolCallOut]] = None
    function_call: Optional[FunctionCallOut] = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Literal["stop", "length", "abort", "tool_calls", "function_call"]
    token_ids: Optional[List[int]] = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage


class ChunkDelta(_Response):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[List[ToolCallDelta]] = None
    function_call: Optional[FunctionCallOut] = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChunkDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[Literal["stop", "length", "abort", "tool_calls", "function_call"]]
    token_ids: Optional[List[int]] = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(_Response):
    tokens: List[str]
    token_logprobs: List[Optional[float]]
    top_logprobs: List[Optional[Dict[str, float]]]
    text_offset: List[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[Literal["stop", "length", "abort"]]
    token_ids: Optional[List[int]] = None


class Completion(_Response):
    """A whole completion; streamed, each chunk has this shape too (finish_reason null until
    the choice ends, usage null or absent until the last chunk)."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


class ErrorBody(_Response):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(_Response):
    error: ErrorBody


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Response):
    object: Literal["list"]
    data: List[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]]


class DetokenizeResponse(_Response):
    prompt: str


class TokenizerInfo(_Response):
    tokenizer_class: str
    eos_token: str
    bos_token: None
    pad_token: None
    unk_token: None
    model_max_length: int
    vocab_size: int
    chat_template: str


#: Request models by route, for the OpenAPI document.
REQUEST_MODELS = {"/v1/chat/completions": ChatCompletionRequest,
                  "/v1/completions": CompletionRequest,
                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
