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

from dataclasses import dataclass

import numpy as np

from diffserve.errors import UserError
from diffserve.schemas import CascadePair, interpolate


def _check_fraction(heavy_fraction: float) -> float:
    f = float(heavy_fraction)
    if not 0.0 <= f <= 1.0 or f != f:
        raise UserError(f"heavy_fraction must lie in [0, 1], got {heavy_fraction!r}")
    return f


def light_quality(pair: CascadePair) -> float:
    """Quality of the light model alone: ``q_light`` when given, else the curve at zero deferral
    (its first measured point: no fraction lies below it)."""
    if pair.q_light is not None:
        return float(pair.q_light)
    return float(pair.q_t[0])


def heavy_quality(pair: CascadePair) -> float:
    """Quality of the heavy model alone: ``q_heavy`` when given, else the curve at full deferral
    (its last measured point)."""
    if pair.q_heavy is not None:
        return float(pair.q_heavy)
    return float(pair.q_t[-1])


@dataclass(frozen=True)
class QualityCurve:
    """Q(f) of a discriminator cascade: the one reading of the measured curve.

    The knots are the measured (f_t, q_t) points, plateaus (many thresholds deferring the same
    fraction) kept at their left end so that the answer does not depend on how densely a plateau
    was sampled, extended to the light model alone at f = 0 and the heavy model alone at f = 1;
    between knots Q is linear. :func:`cascade_quality` reads one fraction, :meth:`at` an array
    (the planner's enumeration), from the same knots."""

    fractions: np.ndarray
    qualities: np.ndarray
    light: float
    lower_is_better: bool

    @classmethod
    def of(cls, pair: CascadePair) -> "QualityCurve":
        fs: list[float] = []
        qs: list[float] = []
        for f, q in zip(pair.f_t, pair.q_t):
            if fs and f <= fs[-1]:
                continue
            fs.append(float(f))
            qs.append(float(q))
        if fs[0] > 0:
            fs.insert(0, 0.0)
            qs.insert(0, light_quality(pair))
        if fs[-1] < 1:
            fs.append(1.0)
            qs.append(heavy_quality(pair))
        return cls(np.array(fs), np.array(qs), light_quality(pair), pair.lower_is_better)

    def at(self, f):
        return np.interp(f, self.fractions, self.qualities)


def cascade_quality(pair: CascadePair, heavy_fraction: float) -> float:
    """Q of the discriminator cascade when a fraction ``heavy_fraction`` of queries is deferred
    (:class:`QualityCurve`: outside the measured range of f_t the curve runs to the single-model
    figures, f = 0 the light model alone, f = 1 the heavy model alone)."""
    return float(QualityCurve.of(pair).at(_check_fraction(heavy_fraction)))


def served_mix(quality, heavy_share, degraded_share, light_quality_value):
    """Quality of a set of answers of which ``degraded_share`` are degraded and ``heavy_share`` are
    heavy images: the one pricing of degrade, used by the planner and the benchmark alike.

    A degraded answer is the light image of a query the discriminator deferred; it is scored as
    the light model alone (``light_quality_value``). The rest are a cascade whose heavy share is
    ``heavy_share / (1 - degraded_share)``, scored by ``quality`` at that share. Arrays broadcast."""
    d = np.asarray(degraded_share, dtype=float)
    kept = 1.0 - d
    with np.errstate(invalid="ignore", divide="ignore"):
        f_kept = np.where(kept > 1e-12, np.asarray(heavy_share, dtype=float) / np.where(kept > 1e-12, kept, 1.0), 0.0)
    return kept * quality(np.clip(f_kept, 0.0, 1.0)) + d * light_quality_value


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
