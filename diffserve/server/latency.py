"""Batch latency from a profile, for batch sizes that were and were not profiled."""

from __future__ import annotations

import math

from diffserve.errors import UserError
from diffserve.schemas import ModelProfile, ProfileFile


class LatencyTable:
    """Median model-time latency of a batch of any size, from a model's feasible profile rows.

    Between profiled sizes the latency is interpolated linearly; above the largest feasible size
    the batch is split into chunks of that size run back to back, which is what a worker would do.
    """

    def __init__(self, profile: ModelProfile) -> None:
        rows = [(b.batch_size, float(b.serving_ms)) for b in profile.feasible_batches() if b.serving_ms]
        if not rows:
            raise UserError(f"model {profile.name!r} has no feasible batch size in the profile")
        self.name = profile.name
        self.sizes = [s for s, _ in rows]
        self.ms = [m for _, m in rows]
        self.load_time_s = profile.load_time_s

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def __call__(self, batch_size: int) -> float:
        n = max(1, int(batch_size))
        if n > self.sizes[-1]:
            full, rest = divmod(n, self.sizes[-1])
            return full * self.ms[-1] + (self(rest) if rest else 0.0)
        if n <= self.sizes[0]:
            return self.ms[0]
        for (s0, m0), (s1, m1) in zip(zip(self.sizes, self.ms), zip(self.sizes[1:], self.ms[1:])):
            if s0 <= n <= s1:
                return m0 + (m1 - m0) * (n - s0) / (s1 - s0)
        return self.ms[-1] * math.ceil(n / self.sizes[-1])  # unreachable, kept for safety


def profile_tables(profile: ProfileFile, models: list[str]) -> dict[str, LatencyTable]:
    """One :class:`LatencyTable` per model; every backend builds its latencies here."""
    for model in models:
        if model not in profile.models:
            raise UserError(f"model {model!r} of the cascade is not in the profile (it has: {', '.join(profile.models)})")
    return {m: LatencyTable(profile.model(m)) for m in models}
