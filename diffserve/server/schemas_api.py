"""Request bodies of the HTTP API: OpenAI's Images API plus diffserve's extension fields.

Validated with pydantic ``extra="forbid"`` so that a misspelt field is a 422 naming it instead of
being silently ignored. Limits that depend on the server (prompt length, n, sizes) are checked
in :func:`check_limits` with messages that name the value.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from diffserve.server.errors import InvalidRequest

#: OpenAI's own quality words, mapped onto diffserve's so that stock clients work.
QUALITY_ALIASES = {"standard": "auto", "medium": "auto", "hd": "best", "high": "best", "low": "fast"}


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: StrictInt = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    model: str | None = None
    seed: StrictInt | None = None
    slo_ms: float | None = Field(default=None, gt=0)
    quality: Literal["auto", "fast", "best", "standard", "medium", "hd", "high", "low"] | None = None
    user: str | None = None

    @field_validator("slo_ms")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number of milliseconds")
        return v

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**63:
            raise ValueError(f"must be in [0, 2**63), got {v}")
        return v

    def effective_quality(self) -> str:
        q = self.quality or "auto"
        return QUALITY_ALIASES.get(q, q)


def parse_size(text: str | None, supported: list[tuple[int, int]]) -> tuple[int, int]:
    if text is None:
        return supported[0]
    names = ", ".join(f"{w}x{h}" for w, h in supported)
    try:
        w_s, h_s = text.lower().split("x")
        size = (int(w_s), int(h_s))
    except ValueError:
        raise InvalidRequest(f"size must look like WIDTHxHEIGHT, one of {names}; got {text!r}", param="size") from None
    if size not in supported:
        raise InvalidRequest(f"size {text!r} is not supported by this server; use one of {names}", param="size")
    return size


def check_text(value: str, param: str) -> None:
    """Refuse what is not valid Unicode text (a lone surrogate such as ``"\\ud800"``, which JSON can
    carry): the models' tokenizers cannot encode it, and it would fail the batch it runs in."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{param} must be valid UTF-8 text; it holds a lone surrogate at character {exc.start}", param=param
        ) from None


def check_limits(req: ImageGenerationRequest, *, max_prompt_chars: int, max_n: int) -> None:
    check_text(req.prompt, "prompt")
    if req.user is not None:
        check_text(req.user, "user")
    if not req.prompt.strip():
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if len(req.prompt) > max_prompt_chars:
        raise InvalidRequest(f"prompt is {len(req.prompt)} characters; the limit is {max_prompt_chars}", param="prompt")
    if not 1 <= req.n <= max_n:
        raise InvalidRequest(f"n must be between 1 and {max_n}, got {req.n}", param="n")
