"""Structured output against a running `pio serve`, through the official `openai` client.

Usage: structured_output.py BASE_URL   (run by tests/e2e/structured.rs)
The daemon serves `echo` and the tiny random-weight checkpoints of three plugins, one per
tool-call markup: qwen3-4b-instruct-2507 (hermes), qwen3-coder-30b (qwen3_coder) and
glm-4.7-flash (glm47, which thinks first). Random weights make the free choices arbitrary, so
every constrained output below must parse and validate whatever the model prefers.
"""

import enum
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import jsonschema
import openai
import pydantic

client = openai.OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
QWEN, CODER, GLM = "qwen3-4b-instruct-2507", "qwen3-coder-30b", "glm-4.7-flash"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def obj(properties, required=None):
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


NAME = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "nested objects": obj({"person": obj({"name": NAME, "address": obj({"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})}),
    "array with min and max items": obj({"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}}),
    "enums": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]}}),
    "required and optional fields": obj({"id": {"type": "integer", "minimum": 1, "maximum": 999}, "nick": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, required=["id"]),
    "bounded integers": obj({"year": {"type": "integer", "minimum": 1900, "maximum": 2100}, "neg": {"type": "integer", "minimum": -50, "maximum": -10}}),
    "bounded numbers": obj({"score": {"type": "number", "minimum": 0, "maximum": 1}, "temp": {"type": "number", "minimum": -40, "maximum": 60}}),
    "string patterns": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    "anyOf": obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}, {"type": "null"}]}}),
    "booleans and null": obj({"ok": {"type": "boolean"}, "nothing": {"type": "null"}}),
    "refs and defs": {"$defs": {"point": obj({"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}})}, **obj({"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}})},
    "const and arrays of objects": obj({"kind": {"const": "list"}, "items": {"type": "array", "items": obj({"n": {"type": "integer", "minimum": 0, "maximum": 5}}), "maxItems": 3}}),
    "a top-level array": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 5},
}


def response_format(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name.replace(" ", "_"), "schema": schema, "strict": True}}


def streamed(**kwargs):
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def check_schema(name, schema, seed, stream):
    kwargs = dict(model=QWEN, messages=ASK, max_tokens=400, seed=seed, temperature=1.0,
                  response_format=response_format(name, schema))
    if stream:
        text, finish = streamed(**kwargs)
    else:
        r = client.chat.completions.create(**kwargs)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop", (name, seed, stream, finish, text)
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return name


def free(seed):
    r = client.chat.completions.create(model=QWEN, messages=ASK, max_tokens=24, seed=seed, temperature=1.0)
    return r.choices[0].finish_reason


# Every schema, whole and streamed, two seeds each, all at once beside unconstrained requests:
# the engine batches them, each sequence under its own mask (or none).
with ThreadPoolExecutor(max_workers=12) as pool:
    jobs = [pool.submit(check_schema, n, s, seed, stream) for n, s in SCHEMAS.items() for seed in (1, 2) for stream in (False, True)]
    jobs += [pool.submit(free, seed) for seed in range(6)]
    results = [j.result() for j in jobs]
assert all(f in ("length", "stop") for f in results[-6:]), results[-6:]

# JSON mode: any JSON object.
r = client.chat.completions.create(model=QWEN, messages=ASK, max_tokens=400, seed=3, response_format={"type": "json_object"})
text = r.choices[0].message.content
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(text), dict), text
else:
    assert text.startswith("{"), text


# The client's own structured parsing with a pydantic model.
class Pet(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    species: Literal["cat", "dog", "fish"]
    legs: int = pydantic.Field(ge=0, le=8)
    name: str = pydantic.Field(max_length=10)
    vaccinated: bool
    owner: Optional[Literal["ann", "bob"]]


for seed in (1, 2, 3):
    parsed = client.chat.completions.parse(model=QWEN, messages=ASK, max_tokens=400, seed=seed, response_format=Pet)
    pet = parsed.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8, parsed

# vLLM's extensions, through extra_body; the legacy completions endpoint takes them too.
r = client.chat.completions.create(model=QWEN, messages=ASK, max_tokens=50, extra_body={"guided_regex": "[a-c]{3}-[0-9]{2}"})
text = r.choices[0].message.content
assert len(text) == 6 and text[3] == "-" and set(text[:3]) <= set("abc") and text[4:].isdigit(), text
r = client.chat.completions.create(model=QWEN, messages=ASK, max_tokens=50, extra_body={"guided_choice": ["positive", "negative"]})
assert r.choices[0].message.content in ("positive", "negative"), r
lark = 'start: "x=" NUM ";"\nNUM: /[1-9][0-9]{0,2}/'
r = client.completions.create(model=QWEN, prompt="value:", max_tokens=50, extra_body={"guided_grammar": lark})
text = r.choices[0].text
assert text.startswith("x=") and text.endswith(";") and 1 <= int(text[2:-1]) <= 999, text
schema = SCHEMAS["enums"]
r = client.completions.create(model=QWEN, prompt="colour:", max_tokens=50, extra_body={"response_format": response_format("c", schema)})
jsonschema.validate(json.loads(r.choices[0].text), schema)

# A grammar that cannot finish within max_tokens ends with "length" and the text so far.
r = client.chat.completions.create(model=QWEN, messages=ASK, max_tokens=3, response_format=response_format("n", SCHEMAS["nested objects"]))
assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith('{"person": '[: len(r.choices[0].message.content)]), r

# Forced tool calls, in each model's own markup, arguments valid against the tool's schema.
# `station` is a bare string in the XML-like markups: its pattern must hold there too.
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}, "metric": {"type": "boolean"},
                                            "station": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}, "required": ["city", "days", "station"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}, "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}
TOOL_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(message, finish, only=None):
    assert finish == "tool_calls", (finish, message)
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.function.name in SCHEMA_OF and (only is None or call.function.name == only), call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


# GLM thinks first unless told not to; a random model may think past any budget.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
for model in (QWEN, CODER, GLM):
    extra = NO_THINKING if model == GLM else {}
    for seed in (1, 2):
        r = client.chat.completions.create(model=model, messages=TOOL_ASK, tools=TOOLS, tool_choice="required", extra_body=extra,
                                           parallel_tool_calls=False, max_tokens=400, seed=seed, temperature=1.0)
        check_calls(r.choices[0].message, r.choices[0].finish_reason)
        assert len(r.choices[0].message.tool_calls) == 1, r
        r = client.chat.completions.create(model=model, messages=TOOL_ASK, tools=TOOLS, max_tokens=400, seed=seed,
                                           extra_body=extra, tool_choice={"type": "function", "function": {"name": "get_time"}})
        check_calls(r.choices[0].message, r.choices[0].finish_reason, only="get_time")
    # Several calls may follow each other when parallel calls are allowed (the default).
    r = client.chat.completions.create(model=model, messages=TOOL_ASK, tools=TOOLS, tool_choice="required", max_tokens=600, seed=5,
                                       extra_body=extra)
    check_calls(r.choices[0].message, r.choices[0].finish_reason)
    # Streamed: the call arrives as tool-call deltas.
    names, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=TOOL_ASK, tools=TOOLS, stream=True, max_tokens=400,
                                                seed=1, extra_body=extra, tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
            for tc in chunk.choices[0].delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
    assert names == ["get_weather"] and finish == "tool_calls", (model, names, finish)

# `tool_choice: "none"` still shows the tools to the model (vLLM's default: the prompt, and so its
# cached prefix, is the same as with `auto`), and takes no call out of the output.
bare = client.chat.completions.create(model=QWEN, messages=TOOL_ASK, max_tokens=1)
shown = client.chat.completions.create(model=QWEN, messages=TOOL_ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
auto = client.chat.completions.create(model=QWEN, messages=TOOL_ASK, tools=TOOLS, max_tokens=1)
assert shown.usage.prompt_tokens == auto.usage.prompt_tokens > bare.usage.prompt_tokens, (bare.usage, shown.usage)
assert not shown.choices[0].message.tool_calls, shown

# pydantic's tools (`openai.pydantic_function_tool`) name their enums and nested models through
# `$defs` and write optional fields as unions: a forced call holds to them in every markup, and
# its arguments come back as the types the schema says.
class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


class Addr(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    street: str = pydantic.Field(max_length=12)


class Paint(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    color: Color
    addr: Addr
    coats: Optional[int] = pydantic.Field(ge=1, le=3)


PAINT = openai.pydantic_function_tool(Paint)
assert "$defs" in PAINT["function"]["parameters"], PAINT
for model in (QWEN, CODER, GLM):
    extra = NO_THINKING if model == GLM else {}
    for seed in (1, 2):
        r = client.chat.completions.create(model=model, messages=TOOL_ASK, tools=[PAINT], max_tokens=400, seed=seed,
                                           temperature=1.0, extra_body=extra,
                                           tool_choice={"type": "function", "function": {"name": "Paint"}})
        assert r.choices[0].finish_reason == "tool_calls", (model, r)
        (call,) = r.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PAINT["function"]["parameters"])
        Paint.model_validate(args)

# A thinking model reasons freely first (but may not end there): the grammar starts after
# `</think>`. Whether random weights close the reasoning within the budget is chance.
for seed in range(4):
    r = client.chat.completions.create(model=GLM, messages=ASK, max_tokens=300, seed=seed, temperature=1.0,
                                       response_format=response_format("e", SCHEMAS["enums"]))
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert choice.message.reasoning_content is not None, choice
        try:
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS["enums"])
        except Exception as e:
            raise AssertionError((seed, choice)) from e
    else:
        # Cut by the length limit: in the reasoning (no content yet) or inside the object.
        assert choice.finish_reason == "length", choice
        assert not choice.message.content or choice.message.content.lstrip().startswith("{"), choice


# Errors: 400s naming the problem, before any model work.
def refused(status, needle, param=None, **kwargs):
    try:
        client.chat.completions.create(**{"model": QWEN, "messages": ASK, "max_tokens": 5, **kwargs})
    except openai.APIStatusError as e:
        assert e.status_code == status and needle in e.message, (e.status_code, e.message, needle)
        assert param is None or e.param == param, (e.param, param, e.message)
        return
    raise AssertionError(f"accepted: {kwargs}")


refused(400, "uniqueItems", param="response_format", response_format=response_format("u", {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}))
refused(400, "/properties/tags", response_format=response_format("u", {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}))
refused(400, "uniqueItems", stream=True, response_format=response_format("u", {"type": "array", "uniqueItems": True}))
# A format the grammar compiler does not know is an annotation (OpenAPI's "password"): served.
r = client.chat.completions.create(model=QWEN, messages=ASK, max_tokens=20, response_format=response_format("f", {"type": "string", "format": "password", "maxLength": 8}))
assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), str), r
refused(400, "response_format.type", response_format={"type": "xml"})
refused(400, "unclosed group", param="guided_regex", extra_body={"guided_regex": "(unclosed"})
refused(400, "a tool's `parameters` cannot be used", param="tools", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}], tool_choice="required")
refused(400, "parameter `d`: a `pattern` with", param="tools", model=CODER, tool_choice="required",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"d": {"type": "string", "pattern": "^[0-9]+$", "maxLength": 4}}}}}])
refused(400, "one output constraint", extra_body={"guided_regex": "a", "guided_choice": ["a"]})
refused(400, "not among the `tools`", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
refused(400, "no `tools`", tool_choice="required")
refused(400, "does not declare", model="echo", response_format={"type": "json_object"})
print("structured output: all checks passed")
