"""Prompt datasets: plain text, DiffusionDB, MS-COCO captions, PartiPrompts and the built-in set."""

from diffserve.datasets.loaders import BUILTIN, FORMATS, detect_format, load_builtin, load_prompts
from diffserve.datasets.prompts import Prompt, PromptSet, safe_id

__all__ = ["BUILTIN", "FORMATS", "Prompt", "PromptSet", "detect_format", "load_builtin", "load_prompts", "safe_id"]
