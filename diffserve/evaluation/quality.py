"""Quality of a light/heavy mix, read off the cascade's measured curves.

The planner owns the curves (:mod:`diffserve.planner.quality`); the benchmark reads the very same
functions, so a reported figure and a planned one come from one curve. Two modes:

- ``cascade``: the discriminator picks which queries go heavy; quality at heavy fraction ``f`` is
  the cascade curve read at the threshold whose deferral ``f(t)`` equals ``f``.
- ``random-split``: queries go heavy at random (Proteus-style, no discriminator). The measured
  random-split curve when ``build-cascade`` wrote one, else the linear mix of the two models'
  qualities, which for FID is the pessimistic end (a mixture's FID is at most the linear mix).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from diffserve.planner import quality as curves
from diffserve.schemas import CascadePair

QualityMode = Literal["cascade", "random-split"]


def quality_function(pair: CascadePair, mode: QualityMode = "cascade") -> Callable[[float], float]:
    """``f -> quality`` for a heavy fraction ``f`` in [0, 1], in the pair's metric units."""
    if mode == "cascade":
        curve = curves.QualityCurve.of(pair)  # read once: scoring asks it every second
        return lambda f: float(curve.at(min(max(f, 0.0), 1.0)))
    if mode == "random-split":
        return lambda f: curves.random_split_quality(pair, min(max(f, 0.0), 1.0))
    raise ValueError(f"quality mode must be 'cascade' or 'random-split', got {mode!r}")


def quality_source(pair: CascadePair, mode: QualityMode) -> str:
    """A phrase for reports saying which curve the quality figures come from."""
    if mode == "cascade":
        return "the cascade's measured quality curve at the heavy fraction"
    if pair.f_rand is not None:
        return "the measured random-split curve (no discriminator) at the heavy fraction"
    return "the linear mix of the two models' qualities (a random split's pessimistic end) at the heavy fraction"
