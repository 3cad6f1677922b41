"""Tool calling on /v1/chat/completions: the real `openai` client's tool-call loop run unchanged against the
server, forced choices ("required", a named function) that always parse, streamed tool-call deltas, the default
tool-prompt format, and 400s naming the field."""
import json

import openai
import pytest

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from pernode.serve.server.tools import ToolPlan, Tool, parse_tool_calls, plan_tools, render_messages
from pernode.serve.server.protocol import ChatMessage
from tiny_model import write_tiny_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current temperature in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 16},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 16}}}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))
    engine = LLMEngine(model=folder, num_blocks=512, max_model_len=1024, num_threads=1)
    with ServerThread(build_app(engine)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def get_weather(city: str, unit: str = "celsius") -> str:
    return json.dumps({"city": city, "temperature": 21, "unit": unit})


def get_time(city: str) -> str:
    return json.dumps({"city": city, "time": "12:00"})


def test_openai_client_tool_call_loop(client):
    """The loop from OpenAI's function-calling guide, as written there."""
    functions = {"get_weather": get_weather, "get_time": get_time}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    response = client.chat.completions.create(model="tiny-llama", messages=messages, tools=[WEATHER, TIME],
                                              tool_choice="required", max_tokens=120, temperature=0.7, seed=2)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    messages.append(choice.message)
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        result = functions[call.function.name](**args)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model="tiny-llama", messages=messages, tools=[WEATHER, TIME],
                                           max_tokens=8, temperature=0)
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content or final.choices[0].message.tool_calls


def test_named_function_always_parses_and_streams_argument_deltas(client):
    kw = dict(model="tiny-llama", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER, TIME],
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80, temperature=0)
    full = client.chat.completions.create(**kw)
    (call,) = full.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    assert full.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) > 1  # the arguments arrive piece by piece
    assert deltas[0][0].id and deltas[0][0].function.name == "get_weather"
    assert "".join(d[0].function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_required_streams_tool_calls_and_none_renders_no_tools(client):
    chunks = list(client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Time in Rome?"}], tools=[WEATHER, TIME],
        tool_choice="required", max_tokens=120, temperature=0.5, seed=4, stream=True))
    calls = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert calls and all(t.function.name in ("get_weather", "get_time") for t in calls)
    for t in calls:
        json.loads(t.function.arguments)
    plain = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                           tools=[WEATHER], tool_choice="none", max_tokens=4, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("length", "stop")


def test_default_tool_prompt_and_auto_parsing():
    plan = plan_tools([WEATHER], None)
    assert plan.choice == "auto"
    raw = [ChatMessage(role="user", content="Weather?"),
           ChatMessage(role="assistant", content=None, tool_calls=[{"id": "call_1", "type": "function", "function": {
               "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]),
           ChatMessage(role="tool", content="{\"temperature\": 21}", tool_call_id="call_1")]
    messages = [{"role": m.role, "content": m.content or ""} for m in raw]
    rendered = render_messages(messages, raw, plan, native=False)
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    content, calls = parse_tool_calls('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                                      '</tool_call>', plan)
    assert content == "Sure." and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert parse_tool_calls("<tool_call>{not json</tool_call>", plan) == ("<tool_call>{not json</tool_call>", [])
    none = ToolPlan((Tool("f", "", {}),), "none")
    assert parse_tool_calls("<tool_call>{}</tool_call>", none)[1] == []


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tools_are_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body=body)
    assert err.value.body["param"] == param
