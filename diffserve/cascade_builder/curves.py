"""The two curves of a cascade, measured on held-out queries: f(t) and Q(t).

A query is deferred to the heavy model when the discriminator's confidence in its light image is
below ``t``. Confidences lie in ``[0, 1)``, so f(0) = 0 and f(1) = 1 exactly, and Q at the two
ends is the light model's and the heavy model's own quality. Q(t) is the quality of the actual
mixture each threshold produces, not an interpolation between the two models.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from diffserve.formats.scores import deferral_curve, threshold_grid  # noqa: F401  (core: shared with the reference scenario)


def mean_quality_curve(confidence: np.ndarray, light: np.ndarray, heavy: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Q(t) for a per-query score (CLIP): the mean over queries of the chosen image's score."""
    conf, light, heavy = (np.asarray(a, dtype=np.float64) for a in (confidence, light, heavy))
    defer = conf[None, :] < np.asarray(grid)[:, None]
    return np.where(defer, heavy[None, :], light[None, :]).mean(axis=1)


def set_quality_curve(
    confidence: np.ndarray,
    light: np.ndarray,
    heavy: np.ndarray,
    grid: np.ndarray,
    distance: Callable[[np.ndarray], float],
    *,
    max_evaluations: int = 21,
) -> np.ndarray:
    """Q(t) for a set metric (FID/KID against real images) of the mixed image set.

    ``light``/``heavy`` are per-query feature rows; ``distance(mixed_features)`` scores one set.
    A set metric costs a matrix square root per call, so it is evaluated at most
    ``max_evaluations`` times, at thresholds spread evenly over the grid (ends included; equal
    mixtures are computed once), and linearly interpolated in between.
    """
    conf = np.asarray(confidence)
    grid = np.asarray(grid, dtype=np.float64)
    picks = np.unique(np.round(np.linspace(0, len(grid) - 1, min(max_evaluations, len(grid)))).astype(int))
    cache: dict[bytes, float] = {}
    values = []
    for i in picks:
        mask = conf < grid[i]
        key = np.packbits(mask).tobytes()
        if key not in cache:
            cache[key] = float(distance(np.where(mask[:, None], heavy, light)))
        values.append(cache[key])
    return np.interp(grid, grid[picks], np.asarray(values))


def random_split_curve(
    n_queries: int, fractions: np.ndarray, score: Callable[[np.ndarray], float], seed: int = 0
) -> np.ndarray:
    """Q_rand(f): the quality of a random split (no discriminator) at each heavy fraction.

    ``score(heavy_mask)`` scores the image set with the masked queries answered by the heavy
    model. The heavy sets are nested (one seeded permutation, the first ``round(f n)`` of it), so
    the curve moves only by the queries added between fractions. This is the Proteus baseline's
    measured curve; without it the baseline is credited the linear mix of the endpoints, which for
    FID is its worst case.
    """
    if n_queries < 1:
        raise ValueError("no queries to build the random-split curve from")
    order = np.random.default_rng(seed).permutation(n_queries)
    values = []
    for f in np.asarray(fractions, dtype=np.float64):
        mask = np.zeros(n_queries, dtype=bool)
        mask[order[: int(round(f * n_queries))]] = True
        values.append(float(score(mask)))
    return np.asarray(values)


def oracle_choice(light: np.ndarray, heavy: np.ndarray) -> np.ndarray:
    """The router that knows which image is better per query (higher score wins): True = heavy."""
    return np.asarray(heavy) > np.asarray(light)
