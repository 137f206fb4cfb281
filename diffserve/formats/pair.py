"""One cascade pair from a deferral curve f(t), a quality table and a profile (no image generated).

Q(t) is the quality table at light fraction ``1 - f(t)``, interpolated linearly between its rows
(the artifact interpolates the same table). Used by ``build-cascade --from-scores`` and by the
reference cascades, whether their f(t) comes from the artifact's score files or from the CDF
shipped with diffserve.
"""

from __future__ import annotations

import numpy as np

from diffserve.errors import UserError
from diffserve.formats.scores import DEFAULT_GRID_POINTS, QualityTable, deferral_curve, threshold_grid
from diffserve.schemas import CascadePair, DiscriminatorRef, ProfileFile


def pair_from_scores(
    confidence: np.ndarray,
    table: QualityTable,
    *,
    light: str,
    heavy: str,
    profile: ProfileFile,
    grid_points: int = DEFAULT_GRID_POINTS,
    source: str,
    recommended: bool = False,
) -> CascadePair:
    """One cascade pair: f(t) from the confidences, Q(t) from the table, latencies from the profile."""
    if len(confidence) == 0:
        raise UserError("no discriminator scores to build f(t) from")
    grid = threshold_grid(grid_points)
    return pair_from_curve(
        grid, deferral_curve(confidence, grid), table, n_eval_prompts=len(confidence), light=light, heavy=heavy,
        profile=profile, source=source, recommended=recommended,
    )


def pair_from_curve(
    grid: np.ndarray,
    f_t: np.ndarray,
    table: QualityTable,
    *,
    n_eval_prompts: int,
    light: str,
    heavy: str,
    profile: ProfileFile,
    source: str,
    recommended: bool = False,
) -> CascadePair:
    """One cascade pair from f(t) already evaluated on ``grid`` (an empirical CDF over ``n_eval_prompts``)."""
    latency = {}
    for role, name in (("light", light), ("heavy", heavy)):
        if name not in profile.models:
            raise UserError(f"unknown {role} model {name!r}: it is not in the profile (it has: {', '.join(profile.models)})")
        try:
            latency[name] = profile.models[name].latency_ms(1)
        except KeyError as exc:
            raise UserError(str(exc).strip('"')) from None
    if light == heavy:
        raise UserError(f"the light and heavy models must differ, got {light!r} twice")
    if latency[light] >= latency[heavy]:
        raise UserError(
            f"the light model must be faster than the heavy one: {light} takes {latency[light]:g} ms, {heavy} {latency[heavy]:g} ms at batch 1"
        )
    q_t = table.at_light_fraction(1.0 - f_t)
    return CascadePair(
        light=light, heavy=heavy, recommended=recommended, metric=table.metric,
        grid=[float(t) for t in grid], f_t=[round(float(v), 6) for v in f_t], q_t=[round(float(v), 4) for v in q_t],
        q_light=table.q_light, q_heavy=table.q_heavy,
        discriminator=DiscriminatorRef(kind="replayed"),
        latency_ms=latency, n_eval_prompts=n_eval_prompts, source=source,
    )


