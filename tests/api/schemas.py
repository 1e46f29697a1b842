"""Validation of raw response bodies against OpenAI's published schemas (openai-schemas.json,
extracted by extract_schemas.py), with a real JSON Schema validator."""

import json
import pathlib

import jsonschema

DOCUMENT = json.loads((pathlib.Path(__file__).resolve().parent / "openai-schemas.json").read_text())


def validate(schema: str, body) -> None:
    """Raises with every violation listed when `body` does not match component `schema`."""
    root = dict(DOCUMENT, **{"$ref": f"#/components/schemas/{schema}"})
    validator = jsonschema.Draft202012Validator(root)
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{schema}: {'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in errors]
        raise AssertionError("\n".join(lines) + "\n" + json.dumps(body)[:2000])
