"""Request bodies of ``POST /v1/images/edits``: the spec's ``CreateImageEditRequest`` (multipart)
and ``EditImageBodyJsonParam`` (JSON), plus diffserve's fields.

One pydantic model holds the text fields of both forms; the images travel apart (files in the
multipart form, ``images``/``mask`` references in the JSON form) and are checked by
:mod:`diffserve.server.uploads`. It extends the generation request, so every shared field
(``n``, ``quality``, ``size``, ``output_format`` ...) is checked the same way, with the same
400s; the fields only edits have:

- ``input_fidelity`` (spec): ``high`` keeps close to the input (strength 0.3), ``low`` departs
  from it (0.8); unset, the strength is 0.6;
- ``strength`` (diffserve): the share of the model's denoising steps the edit runs, in (0, 1];
  it overrides ``input_fidelity``. An edit at strength s costs about s x a generation's steps.

A multipart form carries every value as text: :func:`coerce_form` turns the numeric and boolean
fields into numbers and booleans first, with a 400 naming the field when one is not.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from diffserve.models.editsteps import DEFAULT_STRENGTH, FIDELITY_STRENGTH
from diffserve.server.errors import InvalidRequest
from diffserve.server.schemas_api import ImageGenerationRequest

#: Text fields of the multipart form that are not strings in the model.
_INT_FIELDS = ("n", "partial_images", "output_compression", "seed")
_FLOAT_FIELDS = ("slo_ms", "strength")
_BOOL_FIELDS = ("stream",)
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of an edit. ``style`` (a dall-e-3 generation option) is not an edit field."""

    input_fidelity: Literal["high", "low"] | None = None
    # --- diffserve extension
    strength: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _no_style(self) -> "ImageEditRequest":
        if self.style is not None:
            raise ValueError("style is an image generation option; edits do not take it")
        return self

    @field_validator("strength")
    @classmethod
    def _finite_strength(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number in (0, 1]")
        return v

    def effective_strength(self) -> float:
        if self.strength is not None:
            return float(self.strength)
        if self.input_fidelity is not None:
            return FIDELITY_STRENGTH[self.input_fidelity]
        return DEFAULT_STRENGTH


def coerce_form(fields: dict[str, str]) -> dict[str, Any]:
    """Multipart text values typed as the JSON form would carry them; a bad one is a 400."""
    out: dict[str, Any] = dict(fields)
    for name in _INT_FIELDS:
        if name in out:
            try:
                out[name] = int(out[name].strip())
            except ValueError:
                raise InvalidRequest(f"{name} must be an integer, got {fields[name][:64]!r}", param=name) from None
    for name in _FLOAT_FIELDS:
        if name in out:
            try:
                out[name] = float(out[name].strip())
            except ValueError:
                raise InvalidRequest(f"{name} must be a number, got {fields[name][:64]!r}", param=name) from None
    for name in _BOOL_FIELDS:
        if name in out:
            word = out[name].strip().lower()
            if word not in _TRUE | _FALSE:
                raise InvalidRequest(f"{name} must be true or false, got {fields[name][:64]!r}", param=name)
            out[name] = word in _TRUE
    return out
