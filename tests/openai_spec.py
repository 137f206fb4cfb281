"""The published OpenAI Images schemas, vendored in ``tests/openai_images/schemas.json``.

A test helper, not part of the served package. The schemas are extracted unchanged from the
published OpenAPI spec (``openai/openai-openapi``, ``openapi.yaml``, commit f85dbe2; MIT License,
``tests/openai_images/LICENSE``): generations, edits and variations, their responses and stream
events. The conformance and streaming tests check every body and event we send against them.
Validation uses ``jsonschema``; the spec's OpenAPI-only keywords (``nullable``, ``discriminator``)
are ignored by it, which only loosens request checks, never response ones.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SPEC_PATH = Path(__file__).resolve().parent / "openai_images" / "schemas.json"


@lru_cache(maxsize=1)
def load_spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text(encoding="utf-8"))


def schema(name: str) -> dict[str, Any]:
    return load_spec()["components"]["schemas"][name]


def validate(instance: Any, name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` is a valid spec ``name`` object."""
    import jsonschema

    root = load_spec()
    jsonschema.Draft202012Validator({**root, "$ref": f"#/components/schemas/{name}"}).validate(instance)
