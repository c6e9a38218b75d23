"""Tool calls (the release's ReAct prompt, qwen_fast/tools.py) and structured output (JSON by
constrained decoding, qwen_fast/constrained.py), through the server and the official client.

Random weights never write ReAct text by themselves, so the server tests of tool calls use an
engine whose answer is given (the prompt it was sent is recorded and checked, character for
character, against the release's format); structured output runs the real tiny model."""
import json
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from qwen_fast import tools as T

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from qwen_fast.server import BackgroundServer, create_app       # noqa: E402

MODEL = "qwen-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# ---- the prompt and the parser ------------------------------------------------------------------
def test_react_prompt_is_the_release_format():
    specs = T.function_specs([WEATHER], None)
    query, history, system = T.react_turns(
        [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "\nWeather in Oslo?"}], specs)
    assert system == "Be brief." and history == []
    want_tool = ('get_weather: Call this tool to interact with the get_weather API. What is the '
                 'get_weather API useful for? Weather of a city. Parameters: {"type": "object", '
                 '"properties": {"city": {"type": "string"}}, "required": ["city"]}')
    assert query.startswith("Answer the following questions as best you can. You have access to the "
                            "following APIs:\n\n" + want_tool + "\n\nUse the following format:\n\n")
    assert "Action: the action to take, should be one of [get_weather]\n" in query
    assert query.endswith("Final Answer: the final answer to the original input question\n\n"
                          "Begin!\n\nQuestion: Weather in Oslo?")
    # After the call and its result: the assistant turn is continued after "Thought:".
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "3 C, rain"}]
    query, history, system = T.react_turns(msgs, specs)
    assert query is None and system == "You are a helpful assistant."
    (q, a), = history
    assert q.endswith("Begin!\n\nQuestion: Weather in Oslo?")
    assert a == ('Thought: \nAction: get_weather\nAction Input: {"city": "Oslo"}\n'
                 'Observation: 3 C, rain\nThought:')
    # An earlier plain answer is rewritten as a final answer; the instruction goes, as in the
    # release, on the last complete exchange's question when there is one.
    msgs2 = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Weather?"}]
    query, history, _ = T.react_turns(msgs2, specs)
    (q, a), = history
    assert q.endswith("Begin!\n\nQuestion: Hi")
    assert a == "Thought: I now know the final answer.\nFinal Answer: Hello!"
    assert query == "Weather?"


def test_continuation_prompt_ends_inside_the_assistant_turn(tiny_engine):
    tok = tiny_engine.tokenizer
    ids = T.continuation_ids(tok, [("Q?", "Thought: x\nObservation: y\nThought:")], "Sys")
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
                    "<|im_start|>assistant\nThought: x\nObservation: y\nThought:")


@pytest.mark.parametrize("text, content, call", [
    ('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Oslo"}\n',
     "I need the weather.", ("get_weather", '{"city": "Oslo"}')),
    ('Thought: x\nAction: f\nAction Input: 1\nObservation: made up', "x", ("f", "1")),
    (' I now know the final answer.\nFinal Answer: 3 degrees', "3 degrees", None),
    ("No format at all", "No format at all", None),
    ("Thought: a\nAction Input: 1\nAction: f\n", "Thought: a\nAction Input: 1\nAction: f\n", None),
])
def test_parse_answer(text, content, call):
    assert T.parse_answer(text) == (content, call)


# ---- through the server, with a given answer -----------------------------------------------------
@dataclass
class _Result:
    text: str
    token_ids: List[int] = field(default_factory=lambda: [1, 2])
    finish_reason: str = "stop"
    prompt_tokens: int = 5
    cached_tokens: int = 0
    logprobs: Optional[list] = None
    stop_logprob: Optional[object] = None

    @property
    def completion_tokens(self):
        return len(self.token_ids)


class _Given:
    """An engine stream that yields a given text."""

    def __init__(self, text):
        self.parts = [text[:5], text[5:]]
        self.result = None
        self.text = text
        self.tokens_read = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.parts:
            return self.parts.pop(0)
        self.result = _Result(self.text)
        raise StopIteration

    def close(self):
        pass


class GivenEngine:
    """The tiny engine, but every completion answers `answer`; prompts and params are recorded."""

    def __init__(self, engine):
        self._engine, self.answer, self.calls = engine, "", []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def streams(self, prompts, params=None, **kw):
        self.calls.append((prompts, params))
        return [_Given(self.answer) for _ in prompts]


@pytest.fixture(scope="module")
def given(tiny_engine):
    eng = GivenEngine(tiny_engine)
    with BackgroundServer(create_app(eng, model_name=MODEL)) as srv:
        srv.engine = eng
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        yield srv


def test_tool_call_round_trip_with_the_official_client(given, tiny_engine):
    eng, cl = given.engine, given.client
    eng.answer = 'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Oslo"}\n'
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    r = cl.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "I should look it up."
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"} and call.id.startswith("call_")
    prompts, params = eng.calls[-1]
    text = tiny_engine.tokenizer.decode(prompts[0])
    assert "Question: Weather in Oslo?<|im_end|>\n<|im_start|>assistant\n" in text
    assert "get_weather: Call this tool" in text
    assert "Observation:" in params[0].stop
    # Streamed: the call arrives as a tool_calls delta, then finish_reason tool_calls.
    chunks = list(cl.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"] and calls[0].index == 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    # The tool's result goes back; the model continues after "Observation: ...\nThought:".
    eng.answer = " I now know the final answer.\nFinal Answer: 3 C and rain."
    msgs2 = msgs + [c.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "3 C, rain"}]
    r = cl.chat.completions.create(model=MODEL, messages=msgs2, tools=[WEATHER])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "3 C and rain."
    text = tiny_engine.tokenizer.decode(eng.calls[-1][0][0])
    assert text.endswith('Action: get_weather\nAction Input: {"city": "Oslo"}\n'
                         'Observation: 3 C, rain\nThought:')
    # Legacy functions: a function_call answer.
    eng.answer = 'Thought: go\nAction: get_weather\nAction Input: {"city": "Oslo"}'
    r = cl.chat.completions.create(model=MODEL, messages=msgs, functions=[WEATHER["function"]])
    assert r.choices[0].finish_reason == "function_call"
    assert r.choices[0].message.function_call.name == "get_weather"


def test_tool_requests_refused_by_name(given):
    cl = given.client
    msgs = [{"role": "user", "content": "x"}]
    for kw, param in ((dict(tools=[WEATHER], tool_choice="required"), "tool_choice"),
                      (dict(tools=[{"type": "retrieval"}]), "tools"),
                      (dict(tools=[WEATHER], response_format={"type": "json_object"}), "response_format"),
                      (dict(tools=[WEATHER], logprobs=True), "logprobs"),
                      (dict(messages=[{"role": "tool", "content": "orphan"}]), "messages")):
        body = {"messages": msgs, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            cl.chat.completions.create(model=MODEL, **body)
        assert e.value.body["param"] == param, kw


def test_langchain_bind_tools(given):
    lc = pytest.importorskip("langchain_openai")
    given.engine.answer = 'Thought: t\nAction: get_weather\nAction Input: {"city": "Oslo"}\n'
    llm = lc.ChatOpenAI(model=MODEL, base_url=given.url + "/v1", api_key="x", max_retries=0)

    def get_weather(city: str) -> str:
        """Weather of a city."""
        return "3 C"
    msg = llm.bind_tools([get_weather]).invoke("Weather in Oslo?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert msg.tool_calls[0]["args"] == {"city": "Oslo"}


# ---- structured output with the real (tiny) model -------------------------------------------------
@pytest.fixture(scope="module")
def real(tiny_engine):
    with BackgroundServer(create_app(tiny_engine, model_name=MODEL)) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        yield srv


def test_json_schema_with_parse(real):
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=6)
        age: int = pydantic.Field(ge=0, le=120)
        ok: bool

    for seed in (1, 2):
        r = real.client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "A person, as JSON."}],
            response_format=Person, max_tokens=120, seed=seed, temperature=1.0)
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        p = c.message.parsed
        assert isinstance(p, Person) and len(p.name) <= 6 and 0 <= p.age <= 120


def test_json_object_streamed_and_not(real):
    cl = real.client
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=200,
              response_format={"type": "json_object"}, temperature=0.9, seed=4)
    r = cl.chat.completions.create(**kw)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:                       # cut by max_tokens: still a prefix of a JSON object
        assert r.choices[0].message.content.startswith("{")
    streamed = "".join(ch.choices[0].delta.content or "" for ch in cl.chat.completions.create(stream=True, **kw)
                       if ch.choices)
    assert streamed == r.choices[0].message.content
    # Completions too, through the json_schema extension... and a schema that cannot compile.
    with pytest.raises(openai.BadRequestError) as e:
        cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "bad", "schema": {"type": "nonsense"}}})
    assert e.value.body["param"] == "response_format"


def test_langchain_with_structured_output(real):
    lc = pytest.importorskip("langchain_openai")
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        word: str = pydantic.Field(max_length=5)
        n: int = pydantic.Field(ge=0, le=9)

    llm = lc.ChatOpenAI(model=MODEL, base_url=real.url + "/v1", api_key="x", max_retries=0,
                        max_tokens=80, temperature=1.0, seed=3)
    out = llm.with_structured_output(Answer, method="json_schema").invoke("Answer me.")
    assert isinstance(out, Answer) and len(out.word) <= 5 and 0 <= out.n <= 9
