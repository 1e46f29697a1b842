#!/usr/bin/env python3
"""Extracts from OpenAI's published OpenAPI document (github.com/openai/openai-openapi,
openapi.json) the schemas of the response objects PIO serves, with every schema they reference,
into tests/api/openai-schemas.json, which openai_client.py validates real responses against.

Usage: extract_schemas.py OPENAPI_JSON   (the commit it came from goes into the output's "source")
"""

import json
import pathlib
import sys

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
]


def refs(node, found):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for v in node.values():
            refs(v, found)
    elif isinstance(node, list):
        for v in node:
            refs(v, found)


def nullable(node):
    """OpenAPI 3.0's `nullable: true` (which the document still uses in places) as JSON Schema:
    the schema or null. Validators of JSON Schema 2020-12 ignore the keyword otherwise."""
    if isinstance(node, dict):
        node = {k: nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [nullable(v) for v in node]
    return node


# Where the document contradicts its own descriptions and OpenAI's API reference, the
# description wins (each override says why).
OVERRIDES = {
    # "When present, it contains a null value **except for the last chunk**" (the field's own
    # description), yet it is typed as a plain CompletionUsage.
    ("CreateChatCompletionStreamResponse", "usage"),
}


def main():
    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    schemas = spec["components"]["schemas"]
    keep, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        found = set()
        refs(schemas[name], found)
        todo.extend(found - keep)
    kept = {k: nullable(schemas[k]) for k in sorted(keep)}
    for schema, field in OVERRIDES:
        prop = kept[schema]["properties"][field]
        kept[schema]["properties"][field] = {"anyOf": [prop, {"type": "null"}]}
    # Legacy completions stream the response object itself, `finish_reason` null until the last
    # chunk and `usage` null but there (OpenAI's streaming reference); the document has no chunk
    # schema for them, so one is derived.
    chunk = json.loads(json.dumps(kept["CreateCompletionResponse"]))
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    chunk["properties"]["usage"] = {"anyOf": [chunk["properties"]["usage"], {"type": "null"}]}
    kept["CreateCompletionStreamChunk"] = chunk
    out = {
        "source": f"github.com/openai/openai-openapi openapi.json, version {spec['info']['version']}",
        "components": {"schemas": kept},
    }
    target = pathlib.Path(__file__).resolve().parent / "openai-schemas.json"
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(keep)} schemas -> {target}")


if __name__ == "__main__":
    main()
