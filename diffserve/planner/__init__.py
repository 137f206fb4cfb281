"""Planning: choose the cascade pair, workers and batch size per model, and the threshold.

Public API::

    from diffserve.planner import POLICIES, solve_plan
    plan = solve_plan(profile, cascade, demand_qps=20, slo_ms=5000, workers=16)

See docs/planning.md for the model (MILP, queueing estimate, degraded mode, policies).
"""

from diffserve.planner.quality import cascade_quality, random_split_quality
from diffserve.planner.settings import DEFAULT_HEADROOM, PlanSettings, plan_settings
from diffserve.policies import POLICIES
from diffserve.planner.solve import solve_plan

__all__ = ["POLICIES", "DEFAULT_HEADROOM", "PlanSettings", "plan_settings", "solve_plan", "cascade_quality",
           "random_split_quality"]
