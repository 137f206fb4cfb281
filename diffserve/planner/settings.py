"""The planning contract: every setting that changes a plan, in one object built in one place.

``diffserve plan`` and ``diffserve serve`` (its first plan and every re-plan of its controller)
both build their :class:`PlanSettings` with :func:`plan_settings` from the same flags, so ``plan``
prints exactly the plan ``serve`` would run with those flags. The defaults describe the server
that ``diffserve serve`` starts: degrade-to-light on, a batcher that waits at most a quarter of a
batch's latency for a fuller batch, spare workers given to the pools.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from diffserve.errors import UserError
from diffserve import policies
from diffserve.policies import LATENCY_MODELS

#: Plans must hold the SLO at 1.2 x the demand estimate (the paper's controller used 20 %):
#: demand moves within a re-planning window and the estimate lags it.
DEFAULT_HEADROOM = 1.2
#: The server's batcher waits for a fuller batch at most this fraction of the batch's latency.
BATCHER_WAIT_FRACTION = 0.25
#: A deferred query's heavy batch must start this fraction of the batch's latency earlier than
#: ``deadline - batch latency``: a GPU batch runs a little longer than its profiled mean now and
#: then, and the event loop starts it a little late. The router withdraws (degrades) a queued
#: heavy job at that point, and the planner's degraded-share model uses the same patience.
START_GUARD_FRACTION = 0.01
#: Expected SLO violations a degrade-aware plan may cause (late light images; a deferred query
#: that cannot make its deadline is answered in time with its light image, which costs quality,
#: not a violation). The light stage is held at the (1 - budget) quantile.
DEFAULT_VIOLATION_BUDGET = 0.005
#: Stage quantile for plans that hold every stage within the SLO (every policy but ``diffserve``
#: with degrade on): without degrade a stage's tail is a violation, so p99; with degrade a heavy
#: query in the tail is answered with its light image, so p90.
STRICT_QUANTILE = 0.99
DEGRADE_QUANTILE = 0.90
SPARE_MODES = ("idle", "fill")


def heavy_start_reserve_ms(batch_latency_ms: float) -> float:
    """How long before its deadline a deferred query's heavy batch must start: its latency plus
    the start guard. The router and the heavy pool withdraw a queued deferred job at this point
    (it is answered with its light image); the planner's degraded-share model uses the same."""
    return batch_latency_ms * (1.0 + START_GUARD_FRACTION)


@dataclass(frozen=True)
class PlanSettings:
    """Everything besides demand, SLO, workers and policy that the planner needs to know.

    ``max_wait_ms`` / ``max_wait_fraction`` cap the batcher's wait for a fuller batch (both
    ``None``: uncapped, the conservative full-batch bound). ``spare_workers``: ``None`` keeps the
    per-policy default (``fill`` for static policies, ``idle`` otherwise). ``latency_model``:
    ``queueing`` (ours) or ``batch`` (the paper artifact's: batch latency only).
    """

    headroom: float = DEFAULT_HEADROOM
    degrade: bool = True
    quantile: float | None = None
    violation_budget: float = DEFAULT_VIOLATION_BUDGET
    max_wait_ms: float | None = None
    max_wait_fraction: float | None = BATCHER_WAIT_FRACTION
    spare_workers: str | None = "fill"
    latency_model: str = "queueing"

    def __post_init__(self) -> None:
        if not (isinstance(self.headroom, (int, float)) and math.isfinite(self.headroom)) or self.headroom < 1.0:
            raise UserError(f"headroom must be >= 1 (1.2 = plan for 20 % more than the demand), got {self.headroom!r}")
        if self.quantile is not None and not 0.5 <= self.quantile < 1.0:
            raise UserError(f"quantile must lie in [0.5, 1), got {self.quantile!r}")
        if not 0.0 < self.violation_budget < 0.5:
            raise UserError(f"violation budget must lie in (0, 0.5), got {self.violation_budget!r}")
        if self.spare_workers is not None and self.spare_workers not in SPARE_MODES:
            raise UserError(f"spare workers must be 'idle' or 'fill', got {self.spare_workers!r}")
        if self.latency_model not in LATENCY_MODELS:
            raise UserError(f"latency model must be one of {', '.join(LATENCY_MODELS)}, got {self.latency_model!r}")
        if self.max_wait_ms is not None and self.max_wait_ms < 0:
            raise UserError(f"max wait must be >= 0 ms, got {self.max_wait_ms!r}")

    @property
    def stage_quantile(self) -> float:
        """The quantile that plans holding every stage within the SLO check."""
        if self.quantile is not None:
            return self.quantile
        return DEGRADE_QUANTILE if self.degrade else STRICT_QUANTILE

    @property
    def queueing(self) -> bool:
        return self.latency_model == "queueing"

    def degrade_objective(self, policy: str) -> bool:
        """Whether ``policy`` is planned for quality as served (a policy with the served objective,
        degrade on, the queueing model)."""
        return policies.get(policy).served_objective and self.degrade and self.queueing

    def replace(self, **changes) -> "PlanSettings":
        return dataclasses.replace(self, **changes)


def plan_settings(
    *,
    degrade: bool = True,
    max_batch_wait_ms: float | None = None,
    spare_workers: str | None = "fill",
    latency_model: str = "queueing",
    headroom: float | None = None,
) -> PlanSettings:
    """The settings of a server started with these flags (and of ``diffserve plan`` given the same).

    ``max_batch_wait_ms`` ``None`` is the server's automatic batcher (a quarter of the batch's
    latency); a number is a fixed cap.
    """
    return PlanSettings(
        headroom=DEFAULT_HEADROOM if headroom is None else headroom,
        degrade=degrade,
        max_wait_ms=max_batch_wait_ms,
        max_wait_fraction=BATCHER_WAIT_FRACTION if max_batch_wait_ms is None else None,
        spare_workers=spare_workers,
        latency_model=latency_model,
    )
