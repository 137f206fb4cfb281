"""The prompt set that trace prompt indices point into.

A trace names prompts by index (the paper's traces index DiffusionDB's first 5,000 prompts). Any
set :mod:`diffserve.datasets` reads works (a text file with one prompt per line, DiffusionDB,
MS-COCO captions, PartiPrompts); without one the built-in set is used, which is enough for the
emulated backend, whose latency does not depend on the text.
"""

from __future__ import annotations

from pathlib import Path


def load_prompts(spec: str | Path | None) -> list[str]:
    """The prompt texts of ``spec`` (a path, or ``builtin``/None for the built-in set), in file order."""
    from diffserve.datasets.loaders import load_prompts as load_set

    return load_set("builtin" if spec is None else spec).texts


def prompt_for(prompts: list[str], index: int) -> str:
    """The prompt of a trace index; indices wrap so a small set still serves a large trace."""
    return prompts[index % len(prompts)]
