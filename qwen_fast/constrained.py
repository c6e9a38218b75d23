"""Constrained decoding: answers that are JSON, or JSON matching a schema, by masking at every
step the tokens that cannot continue a valid text (llguidance, fed our tiktoken vocabulary).

Why llguidance: it compiles JSON schemas to a token-level grammar and computes a step's mask over
the 151,936-id vocabulary in tens of microseconds (measured: 7-150 us a token here), needs
nothing but its own wheel, and reads a tiktoken Encoding directly; the other well-kept library
(xgrammar) depends on transformers and triton.

Where the mask applies: to the model's logits, before the release's repetition penalty and
warpers (qwen_fast/sampling.py), as vLLM applies its grammar bitmask; the sampling parameters
then act on the allowed tokens only. Log-probabilities stay those of the unmasked model.
When the text is complete, only the stop tokens (<|im_end|>, <|endoftext|>) are allowed.

    c = JsonConstraint.compile(tokenizer, {"type": "object", ...}, vocab_size)   # or True: any object
    allowed = c.allowed()        # bool tensor [vocab]
    c.accept(token_id)
"""
from __future__ import annotations

import json
import threading
from typing import Any, Dict, Sequence, Union

import numpy as np
import torch

from .errors import RequestError

#: The chat answer's end (<|im_end|>) and the text's (<|endoftext|>): allowed once the JSON is done.
STOP_IDS = (151645, 151643)

#: How the JSON is laid out unless the schema's own "x-guidance" says otherwise: no free
#: whitespace (a grammar that allows any run of it lets a model pad forever, which random and
#: weak models do), items and keys separated as json.dumps does.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_lock = threading.Lock()
_tokenizers: Dict[tuple, Any] = {}


def _llguidance():
    try:
        from llguidance import LLMatcher
        from llguidance.tiktoken import lltokenizer_from_encoding
    except ImportError as e:
        raise RequestError.of("json_schema", f"constrained decoding (json_schema, response_format) "
                              f"needs the llguidance package ({e}): pip install llguidance") from None
    return LLMatcher, lltokenizer_from_encoding


def _lltokenizer(tokenizer, vocab_size: int, stop_ids: Sequence[int]):
    """llguidance's tokenizer of ours (about 0.7 s to build: made once per vocabulary and size)."""
    _, from_encoding = _llguidance()
    key = (id(tokenizer._enc), vocab_size, tuple(stop_ids))
    with _lock:
        ll = _tokenizers.get(key)
        if ll is None:
            ll = _tokenizers[key] = from_encoding(tokenizer._enc, n_vocab=vocab_size,
                                                  eos_token=list(stop_ids))
        return ll


def schema_of(spec: Union[bool, dict, str]) -> dict:
    """A json_schema parameter as a schema: True = any JSON object; a str is parsed as JSON."""
    if spec is True:
        return {"type": "object"}
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise RequestError.of("json_schema", f"json_schema is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise RequestError.of("json_schema", f"json_schema must be a JSON schema (an object) or "
                              f"True, got {type(spec).__name__}")
    return spec


class JsonConstraint:
    """One request's grammar state: the tokens allowed next, advanced by each sampled token."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)

    @classmethod
    def compile(cls, tokenizer, spec: Union[bool, dict, str], vocab_size: int,
                stop_ids: Sequence[int] = STOP_IDS) -> "JsonConstraint":
        """RequestError (param "json_schema") for a schema llguidance cannot compile."""
        LLMatcher, _ = _llguidance()
        ll = _lltokenizer(tokenizer, vocab_size, stop_ids)
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema_of(spec), defaults=JSON_FORMAT)
        except (ValueError, TypeError) as e:
            raise RequestError.of("json_schema", f"json_schema could not be compiled: {e}") from None
        err = LLMatcher.validate_grammar(grammar, ll)
        if err:
            raise RequestError.of("json_schema", f"json_schema could not be compiled: {err}")
        m = LLMatcher(ll, grammar)
        if m.is_error():
            raise RequestError.of("json_schema", f"json_schema could not be compiled: {m.get_error()}")
        return cls(m, vocab_size)

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens that keep the text valid."""
        self.compute()
        return self.as_tensor()

    def compute(self) -> None:
        """The next step's mask, as llguidance's bitmask (one bit a token)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def as_tensor(self) -> torch.Tensor:
        """The last computed bitmask as bool [vocab_size]."""
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(int(token_id)):
            raise RuntimeError(f"the grammar refused token {token_id}: {self.matcher.get_error()}")
