"""Tool calls in the release's own format: the ReAct prompt of Qwen's openai_api.py (qwen-spec.md),
built from OpenAI ``tools`` / ``functions`` and ``tool`` / ``function`` messages, and the answer
parsed back into ``tool_calls``.

The prompt, as the release builds it:

* each function becomes a line of the tool description (name, what it is for, its JSON
  parameters), and the instruction (the tools, then the Thought / Action / Action Input /
  Observation / Final Answer format) goes before the latest user question that opened the
  exchange, followed by "\\n\\nQuestion: ";
* an assistant turn that called a tool reads "Thought: {its text}\\nAction: {name}\\nAction
  Input: {arguments}"; one that answered reads "Thought: I now know the final answer.\\nFinal
  Answer: {text}";
* a tool result is appended to that assistant turn as "\\nObservation: {result}", and when it is
  the last message, "\\nThought:" too: the model then continues the assistant turn (the prompt
  ends inside it, with no <|im_end|>);
* "Observation:" stops the generation (the model would otherwise invent the tool's answer).

The answer: text with "\\nAction:" then "\\nAction Input:" is a call of that function with those
arguments (the text before, after "Thought: ", is the message's content); otherwise the text
after the last "\\nFinal Answer: " is the answer.

Differences from the release's server: tool calls work streamed too (the answer's chunks come
when it is complete, since a call cannot be told from an answer before); an assistant message
may carry one tool call (the format has one action at a time); the text-completion prompt is
tokenized piece by piece as make_context does (the release encodes it as one string).
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Dict, List, Optional, Tuple

from .chat import DEFAULT_SYSTEM, IM_END_ID, IM_START_ID
from .errors import RequestError

TOOL_DESC = ("{name_for_model}: Call this tool to interact with the {name_for_human} API. What is "
             "the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}")

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

STOP_STRING = "Observation:"


def _bad(message: str, param: str = "messages") -> RequestError:
    return RequestError.of(param, message)


def function_specs(tools: Optional[list], functions: Optional[list]) -> List[dict]:
    """OpenAI ``tools`` ([{"type": "function", "function": {...}}]) or legacy ``functions``
    ([{name, description, parameters}]) -> the function dicts, checked."""
    out = []
    if tools:
        if not isinstance(tools, list):
            raise _bad("tools must be a list of {type: function, function: {...}}", "tools")
        for i, t in enumerate(tools):
            if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)):
                raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{name, "
                           "description, parameters}}}}", "tools")
            out.append(t["function"])
    elif functions:
        if not isinstance(functions, list) or not all(isinstance(f, dict) for f in functions):
            raise _bad("functions must be a list of {name, description, parameters}", "functions")
        out = list(functions)
    param = "tools" if tools else "functions"
    for i, f in enumerate(out):
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise _bad(f"{param}[{i}] needs a name", param)
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise _bad(f"{param}[{i}].parameters must be a JSON schema object", param)
    return out


def instruction(specs: List[dict]) -> str:
    """The ReAct instruction for these functions ('' without any)."""
    if not specs:
        return ""
    descs, names = [], []
    for f in specs:
        name_m = f.get("name_for_model", f["name"])
        name_h = f.get("name_for_human", f["name"])
        desc = f.get("description_for_model", f.get("description", "")) or ""
        params = f.get("parameters", {})
        descs.append(TOOL_DESC.format(name_for_model=name_m, name_for_human=name_h,
                                      description_for_model=desc,
                                      parameters=json.dumps(params, ensure_ascii=False)))
        names.append(name_m)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(descs),
                                    tools_name_text=", ".join(names)).lstrip("\n").rstrip()


def _content(i: int, m: dict) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in c):
        return "".join(p["text"] for p in c)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts")


def _call_of(i: int, m: dict) -> Optional[Tuple[str, str]]:
    calls = m.get("tool_calls")
    if calls:
        if not isinstance(calls, list) or len(calls) != 1:
            raise _bad(f"messages[{i}] has {len(calls) if isinstance(calls, list) else 'bad'} "
                       "tool_calls; the release's format takes one action at a time: send one "
                       "tool call per assistant message")
        fn = calls[0].get("function") if isinstance(calls[0], dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"messages[{i}].tool_calls[0] needs function.name and function.arguments")
        args = fn.get("arguments", "")
        return fn["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    fc = m.get("function_call")
    if fc:
        if not isinstance(fc, dict) or not isinstance(fc.get("name"), str):
            raise _bad(f"messages[{i}].function_call needs name and arguments")
        args = fc.get("arguments", "")
        return fc["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return None


def react_turns(messages: list, specs: List[dict]) -> Tuple[Optional[str], List[Tuple[str, str]], str]:
    """(query, history, system) of the release's ReAct prompt; query None means the prompt ends
    inside the last assistant turn, which the model continues."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list")
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object")
    system = DEFAULT_SYSTEM
    first = 0
    if msgs[0].get("role") in ("system", "developer"):
        system = _content(0, msgs[0]).lstrip("\n").rstrip()
        first = 1
    if not any(m.get("role") == "user" for m in msgs):
        raise _bad("messages need at least one user message")
    instr = instruction(specs)
    turns: List[List[str]] = []             # [role, text]
    for i in range(first, len(msgs)):
        m = msgs[i]
        role = m.get("role")
        text = _content(i, m).lstrip("\n").rstrip()
        if role in ("tool", "function"):
            if not turns or turns[-1][0] != "assistant":
                raise _bad(f"messages[{i}] ({role}) must follow an assistant message that called a tool")
            turns[-1][1] += f"\nObservation: {text}"
            if i == len(msgs) - 1:
                turns[-1][1] += "\nThought:"
        elif role == "assistant":
            if not turns:
                raise _bad(f"messages[{i}]: an assistant message needs a user message before it")
            call = _call_of(i, m)
            if call is None:
                if specs:
                    text = f"Thought: I now know the final answer.\nFinal Answer: {text}"
            else:
                if not text.startswith("Thought:"):
                    text = f"Thought: {text}"
                text = f"{text}\nAction: {call[0]}\nAction Input: {call[1]}"
            if turns[-1][0] == "user":
                turns.append(["assistant", text.lstrip("\n").rstrip()])
            else:
                turns[-1][1] += "\n" + text
        elif role == "user":
            turns.append(["user", text])
        else:
            raise _bad(f"messages[{i}].role must be system, user, assistant or tool, got {role!r}")
    query = None
    if turns[-1][0] == "user":
        query = turns.pop()[1]
    if len(turns) % 2:
        raise _bad("messages must alternate user and assistant turns (tool results after the "
                   "assistant message that called the tool)")
    history = []
    for k in range(0, len(turns), 2):
        (r1, q), (r2, a) = turns[k], turns[k + 1]
        if (r1, r2) != ("user", "assistant"):
            raise _bad("messages must alternate user and assistant turns")
        q, a = q.lstrip("\n").rstrip(), a.lstrip("\n").rstrip()
        if instr and k == len(turns) - 2:
            q, instr = f"{instr}\n\nQuestion: {q}", ""
        history.append((q, a))
    if instr:
        query = f"{instr}\n\nQuestion: {query}"
    return query, history, system


def continuation_ids(tokenizer, history: List[Tuple[str, str]], system: str) -> List[int]:
    """The prompt that ends inside the last assistant turn (no <|im_end|> after it)."""
    nl = tokenizer.encode("\n")

    def block(role: str, text: str) -> List[int]:
        return ([IM_START_ID] + tokenizer.encode(role, allowed_special=set()) + nl
                + tokenizer.encode(text, allowed_special=set()) + [IM_END_ID])
    ids = block("system", system)
    for q, a in history:
        ids += nl + block("user", q) + nl + block("assistant", a)
    return ids[:-1]


def parse_answer(text: str) -> Tuple[str, Optional[Tuple[str, str]]]:
    """(content, (name, arguments) or None) of a ReAct answer (the release's rules)."""
    i = text.find("\nAction:")
    j = text.find("\nAction Input:")
    k = text.find("\nObservation:")
    if 0 <= i < j:
        if k < j:                   # the stop string took "Observation:" away: put it back
            text = text.rstrip() + "\nObservation:"
            k = text.find("\nObservation:")
        name = text[i + len("\nAction:"):j].strip()
        args = text[j + len("\nAction Input:"):k].strip()
        if name:
            thought = text[:i]
            t = thought.find("Thought: ")
            if t >= 0:
                thought = thought[t + len("Thought: "):]
            return thought.strip(), (name, args)
    z = text.rfind("\nFinal Answer: ")
    if z >= 0:
        text = text[z + len("\nFinal Answer: "):]
    return text, None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def message_of(text: str, legacy: bool) -> Tuple[Dict[str, Any], str]:
    """(the assistant message, finish_reason) of a ReAct answer: a tool call (finish_reason
    "tool_calls", or "function_call" for a legacy ``functions`` request) or an answer."""
    content, call = parse_answer(text)
    if call is None:
        return {"role": "assistant", "content": content.strip()}, "stop"
    name, args = call
    if legacy:
        return {"role": "assistant", "content": content or None,
                "function_call": {"name": name, "arguments": args}}, "function_call"
    return {"role": "assistant", "content": content or None, "tool_calls": [
        {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}]}, "tool_calls"
