"""Quality of a light/heavy mix, from the cascade's measured curve.

The planner owns the canonical functions (``diffserve.planner.quality``); this module calls them
when they are present and otherwise falls back to the same reading of the curve, so the
evaluation can be built and tested on its own. Two modes:

- ``cascade``: the discriminator picks which queries go heavy; quality at heavy fraction ``f`` is
  the cascade curve ``q`` read at the threshold whose deferral ``f(t)`` equals ``f``.
- ``random-split``: queries go heavy at random (Proteus-style, no discriminator). Without a
  measured curve for random mixes the fallback interpolates linearly between the light-only and
  heavy-only quality, which is what a random mix converges to per query.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from diffserve.schemas import CascadePair

QualityMode = Literal["cascade", "random-split"]


def _curve(pair: CascadePair) -> tuple[np.ndarray, np.ndarray]:
    """(heavy fraction, quality) points of the cascade, one quality per distinct fraction."""
    fs, qs = [], []
    for f, q in zip(pair.f_t, pair.q_t):
        if fs and abs(f - fs[-1]) < 1e-12:
            continue  # a plateau of f(t): the first threshold reaching it stands for it
        fs.append(f)
        qs.append(q)
    return np.asarray(fs, dtype=float), np.asarray(qs, dtype=float)


def _endpoints(pair: CascadePair) -> tuple[float, float]:
    fs, qs = _curve(pair)
    q_light = pair.q_light if pair.q_light is not None else float(np.interp(0.0, fs, qs))
    q_heavy = pair.q_heavy if pair.q_heavy is not None else float(np.interp(1.0, fs, qs))
    return q_light, q_heavy


def _fallback(pair: CascadePair, mode: QualityMode) -> Callable[[float], float]:
    if mode == "cascade":
        fs, qs = _curve(pair)
        return lambda f: float(np.interp(min(max(f, 0.0), 1.0), fs, qs))
    q_light, q_heavy = _endpoints(pair)
    return lambda f: float(q_light + (q_heavy - q_light) * min(max(f, 0.0), 1.0))


def quality_function(pair: CascadePair, mode: QualityMode = "cascade") -> Callable[[float], float]:
    """``f -> quality`` for a heavy fraction ``f`` in [0, 1], in the pair's metric units."""
    if mode not in ("cascade", "random-split"):
        raise ValueError(f"quality mode must be 'cascade' or 'random-split', got {mode!r}")
    try:
        from diffserve.planner import quality as planner_quality
    except ImportError:
        return _fallback(pair, mode)
    func = getattr(planner_quality, "cascade_quality" if mode == "cascade" else "random_split_quality", None)
    if func is None:
        return _fallback(pair, mode)
    return lambda f: float(func(pair, min(max(f, 0.0), 1.0)))


def quality_source(mode: QualityMode) -> str:
    """A sentence for reports saying where the quality figures come from."""
    try:
        from diffserve.planner import quality  # noqa: F401

        origin = "diffserve.planner.quality"
    except ImportError:
        origin = "the evaluation's reading of the cascade curve"
    what = (
        "the cascade's measured quality curve at the heavy fraction"
        if mode == "cascade"
        else "a random split between the models (no discriminator) at the heavy fraction"
    )
    return f"{what} ({origin})"
