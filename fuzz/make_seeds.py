#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/) from the repository's own files
and a few hand-picked requests, so every target starts from inputs that reach deep. Run from the
repository root; the output is committed."""
import json
import pathlib
import re
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "corpus"
FIX = ROOT / "tests" / "fixtures"


def put(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def frame(obj):
    body = json.dumps(obj).encode()
    return struct.pack("<I", len(body)) + body


shutil.rmtree(OUT, ignore_errors=True)

# manifest: the shipped manifests and the README's configuration example.
for m in sorted((ROOT / "manifests").glob("*.toml")):
    put("manifest", m.name, m.read_bytes())
readme = (ROOT / "README.md").read_text()
for i, block in enumerate(re.findall(r"```toml\n(.*?)```", readme, re.S)):
    put("manifest", f"readme-{i}.toml", block)

# frames: a host's and a worker's conversation.
request = {"prompt": {"text": "hello"}, "max_tokens": 4, "logprobs": 2}
put("frames", "to-worker", b"".join(frame(f) for f in [
    {"type": "load", "config": {"model_path": "/m", "dtype": "bf16", "extra": {"a": 1}}},
    {"type": "infer", "id": 1, "request": request, "window": 32},
    {"type": "credit", "id": 1, "tokens": 16},
    {"type": "cancel", "id": 1},
    {"type": "ping", "nonce": 7},
    {"type": "unload"},
]))
put("frames", "from-worker", b"".join(frame(f) for f in [
    {"type": "progress", "stage": "weights", "done": 1, "total": 2},
    {"type": "loaded", "info": {"context_length": 4096}},
    {"type": "token", "id": 1, "token": {"token_id": 5, "text": "hi", "logprob": -0.5,
                                         "top_logprobs": [[5, "hi", -0.5], [6, "\ufffd", -1.0]]}},
    {"type": "done", "id": 1, "outcome": {"finish_reason": "stop",
                                          "usage": {"prompt_tokens": 1, "completion_tokens": 1}}},
    {"type": "failed", "id": 2, "error": {"kind": "invalid_input", "message": "no"}},
    {"type": "pong", "nonce": 7},
]))

# openai: request bodies touching every field.
tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
png = "data:image/png;base64," + __import__("base64").b64encode(
    (FIX / "images" / "small.png").read_bytes()).decode()
bodies = {
    "chat-basic": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "chat-full": {"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what"},
                                     {"type": "image_url", "image_url": {"url": png}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"}],
        "tools": [tool], "tool_choice": "auto", "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
        "max_tokens": 16, "max_completion_tokens": 16, "stop": ["\n", "END"], "seed": 3,
        "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "repetition_penalty": 1.1, "min_p": 0.05, "n": 1, "user": "u",
        "chat_template_kwargs": {"enable_thinking": False}},
    "completions": {"model": "m", "prompt": "abc", "max_tokens": 5, "stop": "c", "logprobs": 2,
                    "echo": False, "stream": False},
    "completions-ids": {"model": "m", "prompt": [1, 2, 3]},
    "response-format": {"model": "m", "messages": [{"role": "user", "content": "x"}],
                        "response_format": {"type": "json_object"}},
}
for name, body in bodies.items():
    put("openai", name, json.dumps(body))

# checkpoint: the first byte picks the file the rest replaces.
put("checkpoint", "qwen3-config", b"\x00" + (FIX / "qwen3-tiny" / "config.json").read_bytes())
put("checkpoint", "qwen3-index",
    b"\x01" + (FIX / "qwen3-tiny" / "model.safetensors.index.json").read_bytes())
put("checkpoint", "safetensors",
    b"\x02" + (FIX / "qwen3-tiny" / "model-00005-of-00005.safetensors").read_bytes())
put("checkpoint", "glm-config", b"\x03" + (FIX / "glm4-moe-lite-tiny" / "config.json").read_bytes())
put("checkpoint", "gguf", b"\x04" + (FIX / "gguf" / "qwen3-tiny.q5_0.gguf").read_bytes())

# chat_template: conversations with tools, calls, reasoning and images.
put("chat_template", "tools", json.dumps({"messages": bodies["chat-full"]["messages"],
                                          "tools": [tool], "enable_thinking": True}))
put("chat_template", "reasoning", json.dumps({"messages": [
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "a", "reasoning_content": "because"},
    {"role": "user", "content": "again"}]}))
put("chat_template", "plain", json.dumps({"messages": [{"role": "user", "content": "hello"}]}))

# tool_calls: each format's output (first byte: format, thinking, piece size).
put("tool_calls", "hermes", b"\x00" + b'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>')
put("tool_calls", "qwen3-coder", b"\x01" + b"<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=tags>\n[\"a\"]\n</parameter>\n</function>\n</tool_call>")
put("tool_calls", "glm47", b"\x06" + b"<think>hmm</think>ok<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>where</arg_key><arg_value>{\"a\": 1}</arg_value></tool_call>")
put("tool_calls", "thinking-pieces", b"\x1c" + "let me think</think>The answer is 4 — 中文 🙂".encode())

# images: the fixtures (good and bad).
for img in sorted((FIX / "images").rglob("*")):
    if img.is_file() and img.stat().st_size <= 20000:
        put("images", img.name, img.read_bytes())
