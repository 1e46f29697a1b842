"""The official `openai` Python client against a running `pio serve`.

Usage: openai_client.py BASE_URL API_KEY   (run by tests/e2e/serve.rs; needs `pip install openai`)
The daemon serves `echo` (echoes its prompt) and the tiny random `qwen3-4b-instruct-2507`.
"""

import json
import sys
import urllib.request

import openai

from schemas import validate

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
QWEN = "qwen3-4b-instruct-2507"

ids = sorted(m.id for m in client.models.list())
assert ids == ["echo", QWEN], ids

# Chat, whole and streamed.
r = client.chat.completions.create(
    model="echo", messages=[{"role": "user", "content": "hello world"}], max_tokens=5
)
assert r.choices[0].message.content == "hello", r
assert r.choices[0].finish_reason == "length", r
assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 5, 16), r

stream = client.chat.completions.create(
    model="echo",
    messages=[{"role": "user", "content": "hello world"}],
    stream=True,
    stream_options={"include_usage": True},
)
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert text == "hello world", text
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens == 11, usage

# Legacy completions with logprobs, whole and streamed.
r = client.completions.create(model="echo", prompt="abc", logprobs=0, stop=["c"])
assert r.choices[0].text == "ab", r
assert r.choices[0].logprobs.tokens == ["a", "b"], r
pieces = [c.choices[0].text for c in client.completions.create(model="echo", prompt="xyz", stream=True)]
assert "".join(pieces) == "xyz", pieces

# Tool calls: echo repeats a call written in its (hermes) format, which the server parses.
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": call}], tools=tools)
assert r.choices[0].finish_reason == "tool_calls", r
calls = r.choices[0].message.tool_calls
assert len(calls) == 1 and calls[0].function.name == "get_weather", r
assert json.loads(calls[0].function.arguments) == {"city": "Paris"}, r
streamed_calls = [
    tc
    for chunk in client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": call}], tools=tools, stream=True
    )
    if chunk.choices and chunk.choices[0].delta.tool_calls
    for tc in chunk.choices[0].delta.tool_calls
]
assert [tc.function.name for tc in streamed_calls] == ["get_weather"], streamed_calls

# Errors arrive as the client's typed exceptions, with the field named.
try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
try:
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], temperature=9)
    raise AssertionError("temperature 9 accepted")
except openai.BadRequestError as e:
    assert e.param == "temperature", e
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass

# The real model: greedy output is the same streamed or not; seeded sampling is reproducible;
# logprobs come with the asked-for alternatives.
messages = [{"role": "user", "content": "Tell me a story"}]
whole = client.chat.completions.create(model=QWEN, messages=messages, max_tokens=8, temperature=0)
streamed = "".join(
    c.choices[0].delta.content or ""
    for c in client.chat.completions.create(model=QWEN, messages=messages, max_tokens=8, temperature=0, stream=True)
    if c.choices
)
assert whole.choices[0].message.content == streamed, (whole, streamed)
assert whole.usage.completion_tokens == 8, whole
a, b = (
    client.chat.completions.create(model=QWEN, messages=messages, max_tokens=8, temperature=1.0, seed=7)
    .choices[0]
    .message.content
    for _ in range(2)
)
assert a == b, (a, b)
# `n` choices: indexed, the prompt counted once in the usage.
r = client.chat.completions.create(model=QWEN, messages=messages, max_tokens=4, temperature=1.0, seed=3, n=2)
assert [c.index for c in r.choices] == [0, 1], r
assert r.usage.prompt_tokens == whole.usage.prompt_tokens, r
assert 2 <= r.usage.completion_tokens <= 8, r
r = client.chat.completions.create(
    model=QWEN, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
)
content = r.choices[0].logprobs.content
assert len(content) == 4, content
for entry in content:
    assert len(entry.top_logprobs) == 3, entry
    assert entry.logprob <= 0.0 and entry.logprob >= entry.top_logprobs[-1].logprob - 1e-4, entry

# Raw bodies against OpenAI's published schemas (validated, not compared by hand): whole and
# streamed, chat and legacy completions, with logprobs, tool calls and usage chunks.
def raw(path, body):
    request = urllib.request.Request(
        base.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    return urllib.request.urlopen(request).read().decode()


def chunks(path, body):
    text = raw(path, dict(body, stream=True, stream_options={"include_usage": True}))
    return [json.loads(l[6:]) for l in text.splitlines() if l.startswith("data: ") and l != "data: [DONE]"]


chat_bodies = [
    {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
    {"model": "echo", "messages": [{"role": "user", "content": call}], "tools": tools},
    {"model": QWEN, "messages": messages, "max_tokens": 3, "logprobs": True, "top_logprobs": 1},
    {"model": QWEN, "messages": messages, "max_tokens": 3, "n": 2},
]
for body in chat_bodies:
    validate("CreateChatCompletionResponse", json.loads(raw("/chat/completions", body)))
    for chunk in chunks("/chat/completions", body):
        validate("CreateChatCompletionStreamResponse", chunk)
for body in [{"model": "echo", "prompt": "abc", "logprobs": 2}, {"model": QWEN, "prompt": "Hi", "max_tokens": 3}]:
    validate("CreateCompletionResponse", json.loads(raw("/completions", body)))
    for chunk in chunks("/completions", body):
        validate("CreateCompletionStreamChunk", chunk)
models = json.loads(urllib.request.urlopen(urllib.request.Request(
    base.rstrip("/") + "/models", headers={"authorization": f"Bearer {key}"})).read())
validate("ListModelsResponse", models)

# Scoring a continuation as lm-eval's loglikelihood does: token ids (two prompts in one
# request), `echo` with `logprobs`, one token generated and dropped. The continuation's score is
# the sum of its tokens' `token_logprobs`; the first prompt token's is null.
root = base.rstrip("/").removesuffix("/v1")
tokenize = urllib.request.Request(
    root + "/tokenize",
    data=json.dumps({"model": QWEN, "prompt": "The cat sat on the mat"}).encode(),
    headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
)
ids = json.loads(urllib.request.urlopen(tokenize).read())["tokens"]
r = client.completions.create(
    model=QWEN, prompt=[ids, ids[:3]], echo=True, logprobs=1, max_tokens=1, temperature=0
)
assert [c.index for c in r.choices] == [0, 1], r
lp = r.choices[0].logprobs
assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None, lp
assert lp.top_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:]), lp
assert r.choices[0].text.startswith("The cat sat on the mat"), r
shorter = r.choices[1].logprobs.token_logprobs
assert all(abs(a - b) < 1e-4 for a, b in zip(shorter[1:3], lp.token_logprobs[1:3])), (shorter, lp)
assert r.usage.prompt_tokens == len(ids) + 3, r
# Streamed, as vLLM streams it: the first chunk is the prompt with its scores.
chunks = list(client.completions.create(
    model=QWEN, prompt=ids, echo=True, logprobs=1, max_tokens=2, temperature=0, stream=True
))
first = chunks[0].choices[0]
assert first.text == "The cat sat on the mat", first
assert first.logprobs.token_logprobs[0] is None, first.logprobs
streamed = first.logprobs.token_logprobs[1:]
assert len(streamed) == len(ids) - 1, first.logprobs
assert all(abs(a - b) < 1e-4 for a, b in zip(streamed, lp.token_logprobs[1:])), (streamed, lp)
# vLLM's `prompt_logprobs` comes through the client as an extra field.
r = client.completions.create(model=QWEN, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2})
rows = r.choices[0].model_extra["prompt_logprobs"]
assert rows[0] is None and len(rows) == len(ids), rows
assert abs(rows[1][str(ids[1])]["logprob"] - lp.token_logprobs[1]) < 1e-4, (rows[1], lp)

print("openai client: all checks passed")
