"""Request bodies of the HTTP API: OpenAI's published ``CreateImageRequest`` plus diffserve's fields.

Every field of the published schema is accepted (``null`` means the spec's default, as the spec's
``nullable`` says). Validated with pydantic ``extra="forbid"`` so that a misspelt field is a 422
naming it instead of being silently ignored. What the spec allows but this server cannot honour
(a transparent background, a size the backend does not produce, more images than the server
allows) is a 400 naming the field and the value, checked in :func:`check_limits`.

Quality: OpenAI's six words are mapped onto diffserve's three routings (``QUALITY_ROUTING``):
``low`` -> ``fast`` (light model only), ``auto``/``standard``/``medium`` -> ``auto`` (the cascade
decides per query), ``high``/``hd`` -> ``best`` (heavy model only). diffserve's own ``fast`` and
``best`` stay accepted.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from diffserve.server.errors import InvalidRequest

#: OpenAI's quality words (and diffserve's own) -> the routing the router understands.
QUALITY_ROUTING = {
    "low": "fast", "fast": "fast",
    "auto": "auto", "standard": "auto", "medium": "auto",
    "high": "best", "hd": "best", "best": "best",
}
#: The routing, reported back in the spec's own quality words (responses and stream events).
ROUTING_QUALITY = {"fast": "low", "auto": "medium", "best": "high"}

OutputFormat = Literal["png", "jpeg", "webp"]


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- OpenAI CreateImageRequest (openai/openai-openapi), every field
    prompt: str
    model: str | None = None
    n: StrictInt = 1
    quality: Literal["auto", "standard", "medium", "hd", "high", "low", "fast", "best"] = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: StrictInt = 100
    stream: StrictBool = False
    partial_images: StrictInt = Field(default=0, ge=0, le=3)
    size: str = "auto"
    moderation: Literal["low", "auto"] | None = None
    background: Literal["transparent", "opaque", "auto"] = "auto"
    style: Literal["vivid", "natural"] | None = None
    user: str | None = None
    # --- diffserve extensions
    seed: StrictInt | None = None
    slo_ms: float | None = Field(default=None, gt=0)
    #: the request's SLO class (server/slo_classes.py); the X-Diffserve-Class header says the same
    slo_class: str | None = Field(default=None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """The spec marks its fields ``nullable``: an explicit null is the default, not an error.
        Only known fields are dropped, so an unknown one still gets its 422."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields and k != "prompt")}
        return data

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
        return QUALITY_ROUTING[self.quality]

    def ignored(self) -> dict[str, Any]:
        """Fields that were accepted but change nothing here, so the response can say so."""
        out: dict[str, Any] = {}
        for name in ("style", "moderation"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.output_format == "png" and "output_compression" in self.model_fields_set:
            out["output_compression"] = self.output_compression  # PNG is lossless
        if not self.stream and "partial_images" in self.model_fields_set:
            out["partial_images"] = self.partial_images  # only streams carry partial images
        if self.stream and self.response_format == "url":
            out["response_format"] = "url"  # stream events carry the image itself (b64_json)
        return out


#: ``size`` values of the published ``CreateImageRequest`` enum (tests/openai_images/schemas.json).
SPEC_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536", "256x256", "512x512", "1792x1024", "1024x1792")
_SIZE_RE = re.compile(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}")  # ASCII only: no full-width digits, no "X", no spaces


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_size(text: str | None, supported: list[tuple[int, int]]) -> tuple[int, int]:
    """``size`` exactly as the spec writes it: ``auto`` (the backend's first, native size) or one of
    the sizes this server produces (``supported``), spelled ``WIDTHxHEIGHT`` with ASCII digits and a
    lowercase ``x``. Anything else is a 400 that names the value and what would be accepted, so a
    client that sent ``" 512x512 "`` or ``"512X512"`` learns its spelling, not a different picture."""
    if text is None or text == "auto":
        return supported[0]
    names = ", ".join(["auto", *(size_name(s) for s in supported)])
    if not isinstance(text, str) or not _SIZE_RE.fullmatch(text):
        raise InvalidRequest(
            f"size must be 'auto' or WIDTHxHEIGHT in ASCII digits with a lowercase x and no spaces, one of {names}; got {text!r}",
            param="size",
        )
    size = (int(text.split("x")[0]), int(text.split("x")[1]))
    if size not in supported:
        where = "a size of the OpenAI spec that" if text in SPEC_SIZES else "a size that"
        raise InvalidRequest(f"size {text!r} is {where} this server does not produce; use one of {names}", param="size")
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
        raise InvalidRequest(f"n must be between 1 and {max_n} on this server, got {req.n}", param="n")
    if not 0 <= req.output_compression <= 100:
        raise InvalidRequest(f"output_compression must be between 0 and 100 (percent), got {req.output_compression}", param="output_compression")
    if req.background == "transparent":
        raise InvalidRequest(
            "background 'transparent' cannot be honoured: the diffusion models here paint opaque images; use 'opaque' or 'auto'",
            param="background",
        )
