"""ChatML prompt building and response extraction for Qwen-1.8B-Chat (qwen-spec.md section 6).

``make_context`` reproduces ``qwen_generation_utils.make_context`` token for token:

    <|im_start|>system\\n{system}<|im_end|>
    [for each kept (q, r): \\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{r}<|im_end|>]
    \\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

Role names and contents are encoded with ``allowed_special=set()`` (special strings typed by a
user stay plain text), ``<|im_start|>`` / ``<|im_end|>`` are inserted as ids, and role and
content are encoded separately (``encode(role) + [198] + encode(content)``), not as one string.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .errors import RequestError
from .tokenizer import EOD_ID, IM_END, IM_END_ID, IM_START, IM_START_ID, QwenTokenizer, _to_id_list

__all__ = [
    "DEFAULT_SYSTEM", "STOP_WORDS_IDS", "CHAT_STOP_IDS", "make_context", "messages_to_chat",
    "extract_response", "validate_history",
]

DEFAULT_SYSTEM = "You are a helpful assistant."

#: Stop sequences model.chat adds for the chatml format.
STOP_WORDS_IDS: list[list[int]] = [[IM_END_ID], [IM_START_ID]]

#: Ids that end a chat response (first one found cuts the generated text).
CHAT_STOP_IDS = frozenset({IM_END_ID, IM_START_ID, EOD_ID})

_ROLES = ("system", "user", "assistant")


def validate_history(history: Any) -> list[tuple[str, str]]:
    """Check ``history`` is None or a sequence of (query, response) str pairs; return a list of tuples."""
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise RequestError.of("history", f"history must be a list of (query, response) pairs or None, got "
                        f"{type(history).__name__}")
    out = []
    for i, turn in enumerate(history):
        if isinstance(turn, (str, bytes)) or not isinstance(turn, (tuple, list)):
            raise RequestError.of("history", f"history[{i}] must be a (query, response) tuple or 2-list, got "
                            f"{type(turn).__name__}")
        if len(turn) != 2:
            raise RequestError.of("history", f"history[{i}] must have exactly 2 items (query, response), got "
                             f"{len(turn)}")
        q, r = turn
        if not isinstance(q, str):
            raise RequestError.of("history", f"history[{i}][0] (query) must be str, got {type(q).__name__}")
        if not isinstance(r, str):
            raise RequestError.of("history", f"history[{i}][1] (response) must be str, got {type(r).__name__}")
        out.append((q, r))
    return out


def make_context(
    tokenizer: QwenTokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = DEFAULT_SYSTEM,
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """Build the prompt: returns ``(raw_text, token_ids)``.

    History is walked newest -> oldest; a turn is kept while
    ``len(system_tokens) + len(turn_tokens) + len(kept_tokens) < max_window_size`` (strict),
    and the walk stops at the first turn that does not fit. The current query is never
    counted or truncated. ``chat_format="raw"`` returns ``(query, tokenizer.encode(query))``.
    """
    if not isinstance(query, str):
        raise RequestError(f"query must be str, got {type(query).__name__}")
    if not isinstance(chat_format, str):
        raise RequestError(f"chat_format must be str, got {type(chat_format).__name__}")
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise RequestError(f"unknown chat_format {chat_format!r}; expected 'chatml' or 'raw'")

    history = validate_history(history)
    if not isinstance(system, str):
        raise RequestError(f"system must be str, got {type(system).__name__}")
    if isinstance(max_window_size, bool) or not isinstance(max_window_size, int):
        raise RequestError(f"max_window_size must be int, got {type(max_window_size).__name__}")

    nl = tokenizer.encode("\n")  # [198]
    start, end = [IM_START_ID], [IM_END_ID]

    def role_block(role: str, content: str) -> tuple[str, list[int]]:
        """``<|im_start|>{role}\\n{content}<|im_end|>`` as text and ids."""
        ids = (start + tokenizer.encode(role, allowed_special=set()) + nl
               + tokenizer.encode(content, allowed_special=set()) + end)
        return f"{IM_START}{role}\n{content}{IM_END}", ids

    system_text, system_tokens = role_block("system", system)

    kept_text: list[str] = []      # newest first
    kept_tokens: list[list[int]] = []
    n_kept = 0
    for turn_query, turn_response in reversed(history):
        q_text, q_ids = role_block("user", turn_query)
        r_text, r_ids = role_block("assistant", turn_response)
        turn_tokens = nl + q_ids + nl + r_ids
        if len(system_tokens) + len(turn_tokens) + n_kept < max_window_size:
            kept_tokens.append(turn_tokens)
            kept_text.append(f"\n{q_text}\n{r_text}")
            n_kept += len(turn_tokens)
        else:
            break

    q_text, q_ids = role_block("user", query)
    raw_text = (system_text + "".join(reversed(kept_text))
                + f"\n{q_text}\n{IM_START}assistant\n")
    tokens = list(system_tokens)
    for t in reversed(kept_tokens):
        tokens += t
    tokens += nl + q_ids + nl + start + tokenizer.encode("assistant") + nl
    return raw_text, tokens


def messages_to_chat(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[str, str]], str]:
    """OpenAI-style messages -> ``(query, history, system)``.

    Accepted shape: an optional leading ``system`` message (else DEFAULT_SYSTEM), then
    alternating ``user`` / ``assistant`` messages, ending with a ``user`` message.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise RequestError.of("messages", f"messages must be a list of {{'role', 'content'}} dicts, got "
                        f"{type(messages).__name__}")
    if len(messages) == 0:
        raise RequestError.of("messages", "messages is empty; expected at least one 'user' message")

    roles: list[str] = []
    contents: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RequestError.of("messages", f"messages[{i}] must be a dict with 'role' and 'content', got "
                             f"{type(m).__name__}")
        if "role" not in m:
            raise RequestError.of("messages", f"messages[{i}] has no 'role'")
        role = m["role"]
        if role not in _ROLES:
            raise RequestError.of("messages", f"messages[{i}] has unknown role {role!r}; expected one of "
                             f"{', '.join(_ROLES)}")
        if "content" not in m:
            raise RequestError.of("messages", f"messages[{i}] ({role}) has no 'content'")
        content = m["content"]
        if not isinstance(content, str):
            raise RequestError.of("messages", f"messages[{i}] ({role}) content must be a str, got "
                             f"{type(content).__name__}")
        roles.append(role)
        contents.append(content)

    system = DEFAULT_SYSTEM
    first = 0
    if roles[0] == "system":
        system = contents[0]
        first = 1
    for i in range(first, len(roles)):
        if roles[i] == "system":
            raise RequestError.of("messages", f"messages[{i}] is a 'system' message; a system message is only "
                             f"allowed as the first message (index 0)")
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if roles[i] != expected:
            prev = f"after the {roles[i - 1]!r} message at index {i - 1}" if i > first \
                else "as the first non-system message"
            raise RequestError.of("messages", f"messages[{i}]: expected role {expected!r} {prev}, got "
                             f"{roles[i]!r} (roles must alternate user/assistant)")
    if len(roles) == first:
        raise RequestError.of("messages", "messages has only a system message; expected a final 'user' message")
    if roles[-1] != "user":
        raise RequestError.of("messages", f"messages[{len(roles) - 1}]: the last message must be from 'user', "
                         f"got {roles[-1]!r}")

    history = [(contents[i], contents[i + 1]) for i in range(first, len(roles) - 1, 2)]
    return contents[-1], history, system


def extract_response(tokenizer: QwenTokenizer, output_ids, *, context_length: int = 0) -> str:
    """Text of a chat response from generated ids.

    Decodes ``output_ids[context_length:]`` up to (not including) the first
    ``<|im_end|>`` / ``<|im_start|>`` / ``<|endoftext|>``, with errors="replace", then strips.
    Pass ``context_length`` when ``output_ids`` still includes the prompt.
    """
    ids = _to_id_list(output_ids)[context_length:]
    for k, i in enumerate(ids):
        if i in CHAT_STOP_IDS:
            ids = ids[:k]
            break
    return tokenizer.decode(ids, errors="replace").strip()
