"""The prompt record and prompt set that every scoring and cascade stage iterates over.

A prompt keeps a stable ``id`` (used for image cache file names and for splitting by prompt),
optional ``difficulty`` and free-form ``metadata`` (PartiPrompts' Category and Challenge, COCO's
image id), and, where the dataset has one, the path of the real image it describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffserve.errors import UserError

_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_id(text: str) -> str:
    """A file-name-safe form of an id (ids become cache file names)."""
    cleaned = _SAFE_ID.sub("_", str(text)).strip("._")
    return cleaned or "prompt"


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    difficulty: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    image_path: Path | None = None


@dataclass
class PromptSet:
    """An ordered list of prompts with unique ids, plus where it came from."""

    name: str
    prompts: list[Prompt]

    def __post_init__(self) -> None:
        if not self.prompts:
            raise UserError(f"prompt set {self.name} is empty")
        seen: set[str] = set()
        for p in self.prompts:
            if p.id in seen:
                raise UserError(f"prompt set {self.name} has the id {p.id!r} twice; ids must be unique")
            seen.add(p.id)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def has_images(self) -> bool:
        """True when every prompt has a real image on disk (MS-COCO with its image folder)."""
        return all(p.image_path is not None and p.image_path.is_file() for p in self.prompts)

    def sample(self, n: int | None, seed: int = 0) -> "PromptSet":
        """``n`` prompts drawn without replacement by ``seed``, kept in their original order.

        Keeping the original order makes a sample of a sample stable and the cache easy to read;
        the same ``(n, seed)`` always gives the same prompts.
        """
        if n is None or n >= len(self.prompts):
            return self
        if n < 1:
            raise UserError(f"the number of prompts must be at least 1, got {n}")
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(self.prompts), size=n, replace=False))
        return PromptSet(name=f"{self.name}[n={n},seed={seed}]", prompts=[self.prompts[i] for i in keep])
