"""Parsing of the human-friendly values that CLI flags and YAML files accept."""

from __future__ import annotations

import re

from diffserve.errors import UserError

_DURATION = re.compile(r"^\s*(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|min)?\s*$")
_UNIT_TO_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "min": 60_000.0}


def parse_duration_ms(text: str | float | int, *, name: str = "duration", default_unit: str = "s") -> float:
    """Parse ``"5s"``, ``"500ms"`` or ``"2m"`` into milliseconds.

    A bare number takes ``default_unit`` so that ``--slo 5`` means five seconds, which is what a
    person typing it means; units are accepted because SLOs are quoted both ways.
    """
    if isinstance(text, (int, float)):
        value, unit = float(text), default_unit
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise UserError(f"{name} must look like 5s, 500ms or 2m, got {text!r}")
        value, unit = float(match["value"]), match["unit"] or default_unit
    if value <= 0:
        raise UserError(f"{name} must be positive, got {text!r}")
    return value * _UNIT_TO_MS[unit]


def parse_int_list(text: str, *, name: str = "list", minimum: int = 1) -> list[int]:
    """Parse ``"1,2,4"`` into sorted unique ints, each at least ``minimum``."""
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise UserError(f"{name} must be a comma-separated list of integers, got {text!r}")
    values: set[int] = set()
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise UserError(f"{name} must be a comma-separated list of integers, got {item!r} in {text!r}") from None
        if value < minimum:
            raise UserError(f"{name} values must be >= {minimum}, got {value}")
        values.add(value)
    return sorted(values)


def parse_range(text: str, *, name: str = "range") -> tuple[float, float]:
    """Parse ``"1:40"`` into ``(1.0, 40.0)`` with ``0 < low <= high``."""
    parts = str(text).split(":")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"{name} must look like LOW:HIGH (for example 1:40), got {text!r}") from None
    if not 0 < low <= high:
        raise UserError(f"{name} needs 0 < LOW <= HIGH, got {text!r}")
    return low, high


def parse_duration_list_ms(text: str, *, name: str = "list", default_unit: str = "s") -> list[float]:
    """Parse ``"2.5s,5s,10s"`` into sorted unique milliseconds (each as :func:`parse_duration_ms`)."""
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise UserError(f"{name} must be a comma-separated list of durations such as 2.5s,5s, got {text!r}")
    return sorted({parse_duration_ms(item, name=name, default_unit=default_unit) for item in items})
