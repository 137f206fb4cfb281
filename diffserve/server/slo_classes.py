"""SLO classes: several latency targets on one cluster (``--slo-class interactive=2.5s ...``).

A request names its class by the ``X-Diffserve-Class`` header or the ``slo_class`` body field
(both given and different is a 400, so a client never wonders which one counted). A request naming no class gets the *default* class,
whose SLO is the server's ``--slo``; a server started without ``--slo-class`` has that class
only and behaves exactly as before (FIFO pools, one SLO). An unknown class is a 400 naming the
value and the classes this server has.

Everything per-request follows from the class's SLO: the deadline (arrival + SLO), admission
(can the pool answer by that deadline?), the degrade decision (can the heavy model still make it?)
and ``Retry-After`` (how long until work of this urgency drains). With classes the pools order
their queues earliest-deadline-first (:mod:`diffserve.server.pool`), so a loose class waits only
while tighter work is due sooner, and never past its own deadline for lack of a turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffserve.errors import UserError
from diffserve.server.errors import InvalidRequest

#: The class of requests that name none; its SLO is the server's ``--slo``.
DEFAULT_CLASS = "default"
#: The request header naming a class (HTTP headers are case-insensitive).
CLASS_HEADER = "X-Diffserve-Class"
#: The request body's extension field naming a class.
CLASS_FIELD = "slo_class"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class SloClass:
    name: str
    slo_ms: float


def parse_class_spec(text: str, *, option: str = "--slo-class") -> tuple[str, float]:
    """``"interactive=2.5s"`` -> ``("interactive", 2500.0)``; a clear UserError otherwise."""
    from diffserve.units import parse_duration_ms

    name, sep, value = str(text).partition("=")
    name = name.strip().lower()
    if not sep or not value.strip():
        raise UserError(f"{option} must look like NAME=SLO (interactive=2.5s), got {text!r}")
    check_class_name(name, option=option)
    return name, parse_duration_ms(value.strip(), name=f"{option} {name}")


def check_class_name(name: str, *, option: str = "--slo-class") -> str:
    if not _NAME.match(name):
        raise UserError(f"{option}: class name {name!r} must be lower-case letters, digits, '-' or '_' (32 at most), starting with a letter")
    return name


def parse_class_specs(texts: list[str] | tuple[str, ...], *, option: str = "--slo-class") -> dict[str, float]:
    """Several ``NAME=SLO`` specs (each may also hold a comma-separated list) -> ``{name: slo_ms}``."""
    out: dict[str, float] = {}
    for text in texts:
        for part in str(text).split(","):
            if not part.strip():
                continue
            name, ms = parse_class_spec(part, option=option)
            if name in out:
                raise UserError(f"{option}: class {name!r} is given twice")
            out[name] = ms
    return out


class SloClasses:
    """The classes of one server: the default class plus the named ones."""

    def __init__(self, default_slo_ms: float, classes: dict[str, float] | None = None) -> None:
        self.default_slo_ms = float(default_slo_ms)
        named = dict(classes or {})
        for name, ms in named.items():
            if ms <= 0:
                raise ValueError(f"SLO class {name!r} needs a positive SLO, got {ms!r} ms")
        self._classes: dict[str, SloClass] = {DEFAULT_CLASS: SloClass(DEFAULT_CLASS, float(named.pop(DEFAULT_CLASS, default_slo_ms)))}
        for name, ms in named.items():
            self._classes[name] = SloClass(name, float(ms))

    @property
    def multi(self) -> bool:
        """Whether classes were configured (the pools then order work earliest-deadline-first)."""
        return len(self._classes) > 1

    @property
    def names(self) -> list[str]:
        return list(self._classes)

    def __iter__(self):
        return iter(self._classes.values())

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def slo_ms(self, name: str) -> float:
        return self._classes[name].slo_ms

    @property
    def tightest_ms(self) -> float:
        return min(c.slo_ms for c in self._classes.values())

    @property
    def loosest_ms(self) -> float:
        return max(c.slo_ms for c in self._classes.values())

    def as_dict(self) -> dict[str, float]:
        return {c.name: c.slo_ms for c in self._classes.values()}

    def resolve(self, name: str | None, *, param: str = CLASS_FIELD) -> SloClass:
        """The class a request named (``None``: the default); unknown -> a precise 400."""
        if name is None or name == "":
            return self._classes[DEFAULT_CLASS]
        key = str(name).strip().lower()
        found = self._classes.get(key)
        if found is None:
            raise InvalidRequest(
                f"unknown SLO class {name!r} in {param}; this server has: {', '.join(self._classes)}",
                param=param, reason="invalid",
            )
        return found


def class_of_request(header: str | None, body: str | None) -> tuple[str | None, str]:
    """The class a request names and where (``param`` for errors): header and body must agree."""
    if header is not None and body is not None and header.strip().lower() != body.strip().lower():
        raise InvalidRequest(
            f"the {CLASS_HEADER} header ({header!r}) and the {CLASS_FIELD} field ({body!r}) name different classes",
            param=CLASS_FIELD, reason="invalid",
        )
    if header is not None:
        return header, CLASS_HEADER
    return body, CLASS_FIELD
