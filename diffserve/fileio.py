"""Atomic, schema-checked YAML files: the hand-off between pipeline stages.

Every stage writes through :func:`write_model` so that a crash or Ctrl-C never leaves a
half-written file for the next stage, and reads through :func:`read_model` so that a wrong or
hand-edited file fails with the field named instead of a traceback deep inside a later stage.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from diffserve.errors import UserError

M = TypeVar("M", bound=BaseModel)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dump_yaml(model: BaseModel) -> str:
    """YAML text of a pydantic model, keys in declaration order, ready for people to read."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)


def write_model(path: str | os.PathLike[str], model: BaseModel) -> Path:
    return atomic_write_text(path, dump_yaml(model))


def read_yaml(path: str | os.PathLike[str], *, what: str = "file") -> object:
    source = Path(path)
    if not source.exists():
        raise UserError(f"{what} not found: {source}")
    if source.is_dir():
        raise UserError(f"{what} must be a file, got the directory {source}")
    try:
        return yaml.safe_load(source.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} {source} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{what} {source} is not valid YAML{where}") from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field path, as a person fixing the file needs."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def parse_model(data: object, cls: type[M], *, what: str) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{what} does not match the {cls.__name__} schema: {format_validation_error(exc)}") from None


def read_model(path: str | os.PathLike[str], cls: type[M], *, what: str | None = None) -> M:
    label = what or cls.__name__
    return parse_model(read_yaml(path, what=label), cls, what=f"{label} {path}")
