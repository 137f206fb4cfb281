"""The published OpenAI Images schemas, read from ``shared/reference/openai-images/schemas.json``.

Used by the conformance and streaming tests to check every body and event we send
against the spec itself (never a copy of it in this repo). Validation uses ``jsonschema``; the
spec's OpenAPI-only keywords (``nullable``, ``discriminator``) are ignored by it, which only
loosens request checks, never response ones.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from diffserve.errors import UserError
from diffserve.reference_dir import reference_dir

#: The artifact's sibling in ``shared/reference``, found as the artifact is (``DIFFSERVE_REFERENCE_DIR``
#: or a ``shared/`` above the working directory or the package); CI keeps ``shared/`` beside the clone.
_RELATIVE = Path("openai-images") / "schemas.json"


def _spec_path() -> Path:
    try:
        return reference_dir().parent / _RELATIVE
    except UserError:
        return Path(__file__).resolve().parents[2].parent / "shared" / "reference" / _RELATIVE


SPEC_PATH = _spec_path()


@lru_cache(maxsize=1)
def load_spec(path: str | None = None) -> dict[str, Any]:
    source = Path(path) if path else SPEC_PATH
    if not source.is_file():
        raise UserError(f"the OpenAI images schemas were not found at {source} (expected ../shared beside the repository)")
    return json.loads(source.read_text(encoding="utf-8"))


def schema(name: str) -> dict[str, Any]:
    return load_spec()["components"]["schemas"][name]


def validate(instance: Any, name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` is a valid spec ``name`` object."""
    import jsonschema

    root = load_spec()
    jsonschema.Draft202012Validator({**root, "$ref": f"#/components/schemas/{name}"}).validate(instance)
