"""Discriminator confidences drawn from a cascade's measured deferral curve (emulated backend).

The cascade file stores f(t): the fraction of queries whose confidence is below t. Drawing
u ~ U(0, 1) and returning the smallest t with f(t) >= u gives P(confidence < t) = f(t), so the
emulated server defers the same fraction of queries as the measured discriminator at every
threshold. u is seeded by (run seed, request seed, prompt): a repeated request gets the same
answer, and a run with another ``--seed`` draws another set of confidences.
"""

from __future__ import annotations

import hashlib

from diffserve.schemas import CascadePair


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (stable across processes, unlike hash())."""
    digest = hashlib.blake2b("\x00".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class ScoreSampler:
    def __init__(self, pair: CascadePair, seed: int = 0) -> None:
        self.grid = list(pair.grid)
        self.f_t = list(pair.f_t)
        self.seed = seed

    @classmethod
    def from_curve(cls, grid: list[float], f_t: list[float], seed: int = 0) -> "ScoreSampler":
        """From the bare curve (what a worker process is sent instead of the whole pair)."""
        sampler = cls.__new__(cls)
        sampler.grid, sampler.f_t, sampler.seed = list(grid), list(f_t), seed
        return sampler

    def inverse(self, u: float) -> float:
        """Smallest t with f(t) >= u, interpolating linearly inside the grid segment."""
        grid, f = self.grid, self.f_t
        if u <= f[0]:
            return grid[0]
        for i in range(1, len(grid)):
            if f[i] >= u:
                lo, hi = f[i - 1], f[i]
                if hi <= lo:
                    return grid[i]
                return grid[i - 1] + (grid[i] - grid[i - 1]) * (u - lo) / (hi - lo)
        return grid[-1]

    def confidence(self, prompt: str, seed: int) -> float:
        return self.inverse(unit_hash("confidence", self.seed, seed, prompt))
