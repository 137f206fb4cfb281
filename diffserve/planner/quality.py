"""Quality of a cascade's output as a function of how many queries go to the heavy model.

The planner, the benchmark and the emulated server all turn a deferral fraction into a quality
figure through these two functions, so that every number in a report comes from the same curve.

* :func:`cascade_quality` reads the *measured* curve of a discriminator-driven cascade: the pair
  file gives ``f_t`` (fraction deferred at threshold ``t``) and ``q_t`` (quality of the mixed
  output at ``t``); a fraction ``f`` maps back to ``q`` by linear interpolation along ``f_t``.
  This curve is U-shaped for FID (the paper's SD-Turbo -> SD v1.5 reaches 16.79 with 60 % deferred
  against 18.55 all-heavy) because the discriminator sends the *hard* prompts to the heavy model.
* :func:`random_split_quality` is the Proteus-style split with no discriminator. When
  ``build-cascade`` measured the random-split curve (``f_rand``/``q_rand`` in the pair file) it
  is read from there. Otherwise it is the linear mix ``(1-f) q_light + f q_heavy``, and that is a
  *pessimistic* figure, not an estimate: a mixture's feature mean and covariance are those of the
  mixture of the parts' Gaussians, FID is the Gelbrich lower bound of the 2-Wasserstein distance,
  and W2^2 is convex under mixing, so the mixture's FID is at most the linear mix of the parts'
  FIDs, and may be lower than either model alone (:func:`linear_mix_quality`). The benchmark therefore also scores
  Proteus on the cascade curve (its optimistic reading) and ours must beat both.
"""

from __future__ import annotations

import bisect

from diffserve.errors import UserError
from diffserve.schemas import CascadePair, interpolate


def _check_fraction(heavy_fraction: float) -> float:
    f = float(heavy_fraction)
    if not 0.0 <= f <= 1.0 or f != f:
        raise UserError(f"heavy_fraction must lie in [0, 1], got {heavy_fraction!r}")
    return f


def light_quality(pair: CascadePair) -> float:
    """Quality of the light model alone: ``q_light`` when given, else the curve at zero deferral."""
    if pair.q_light is not None:
        return float(pair.q_light)
    return _curve_at(pair, 0.0)


def heavy_quality(pair: CascadePair) -> float:
    """Quality of the heavy model alone: ``q_heavy`` when given, else the curve at full deferral."""
    if pair.q_heavy is not None:
        return float(pair.q_heavy)
    return _curve_at(pair, 1.0)


def _curve_at(pair: CascadePair, f: float) -> float:
    """q at deferral fraction f along the measured (f_t, q_t) curve.

    f_t is non-decreasing and may have plateaus (many thresholds deferring the same fraction);
    on a plateau the curve is single-valued in practice, and we take the value at its left end
    so that the answer does not depend on how densely the plateau was sampled.
    """
    fs, qs = pair.f_t, pair.q_t
    if f <= fs[0]:
        return float(qs[0])
    if f >= fs[-1]:
        return float(qs[-1])
    i = bisect.bisect_left(fs, f)  # fs[i-1] < f <= fs[i]
    if fs[i] == f:
        return float(qs[i])
    f0, f1, q0, q1 = fs[i - 1], fs[i], qs[i - 1], qs[i]
    return float(q0 + (q1 - q0) * (f - f0) / (f1 - f0))


def cascade_quality(pair: CascadePair, heavy_fraction: float) -> float:
    """Q of the discriminator cascade when a fraction ``heavy_fraction`` of queries is deferred.

    Outside the measured range of f_t the curve is extended to the single-model figures:
    f = 0 is the light model alone, f = 1 the heavy model alone.
    """
    f = _check_fraction(heavy_fraction)
    fs = pair.f_t
    if f < fs[0]:  # below the smallest measured deferral: mix towards the light model alone
        q0 = light_quality(pair)
        return q0 + (_curve_at(pair, fs[0]) - q0) * (f / fs[0]) if fs[0] > 0 else q0
    if f > fs[-1]:  # above the largest measured deferral: mix towards the heavy model alone
        q1 = heavy_quality(pair)
        span = 1.0 - fs[-1]
        return _curve_at(pair, fs[-1]) + (q1 - _curve_at(pair, fs[-1])) * ((f - fs[-1]) / span)
    return _curve_at(pair, f)


def linear_mix_quality(pair: CascadePair, heavy_fraction: float) -> float:
    """The linear mix ``(1-f) q_light + f q_heavy``: for FID the worst a random mixture can score."""
    f = _check_fraction(heavy_fraction)
    return (1.0 - f) * light_quality(pair) + f * heavy_quality(pair)


def random_split_quality(pair: CascadePair, heavy_fraction: float) -> float:
    """Q of a random split (no discriminator): the measured curve when the pair has one, else the
    linear mix (pessimistic for FID, see the module docstring)."""
    f = _check_fraction(heavy_fraction)
    if pair.f_rand is not None and pair.q_rand is not None:
        return interpolate(f, pair.f_rand, pair.q_rand)
    return linear_mix_quality(pair, f)


def better(metric: str, a: float, b: float) -> bool:
    """True when quality ``a`` is strictly better than ``b`` under ``metric`` (FID: lower)."""
    return a < b if metric == "fid" else a > b
