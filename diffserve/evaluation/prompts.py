"""The prompt set that trace prompt indices point into.

A trace names prompts by index (the paper's traces index DiffusionDB). Any text file with one
prompt per line works; without one a small built-in set is used, which is enough for the
emulated backend, whose latency does not depend on the text.
"""

from __future__ import annotations

from pathlib import Path

from diffserve.errors import UserError

BUILTIN_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a cozy cabin in a snowy forest, warm light in the windows",
    "a red fox sitting in a field of sunflowers",
    "a futuristic city skyline at night, neon reflections on wet streets",
    "a bowl of ramen on a wooden table, studio lighting",
    "an oil painting of a sailing ship in a storm",
    "a macro photo of a dew drop on a leaf",
)


def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts from ``path`` (one per line, blank lines skipped) or the built-in set."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    source = Path(path)
    if not source.is_file():
        raise UserError(f"prompt file not found: {source}")
    prompts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {source} holds no prompts")
    return prompts


def prompt_for(prompts: list[str], index: int) -> str:
    """The prompt of a trace index; indices wrap so a small set still serves a large trace."""
    return prompts[index % len(prompts)]
