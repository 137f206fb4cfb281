"""The planning MILP, in PuLP (HiGHS through highspy, a declared dependency; CBC where PuLP bundles it).

For each cascade pair p (one-hot ``pair_p`` when the file has several):

* ``z[p,j]`` one-hot over the candidate thresholds (columns of the table; each fixes f(t));
* ``yl[p,i]`` / ``yh[p,i]`` one-hot over each model's (batch, workers) options: this is the
  one-hot batch size and the integer worker count of the issue in one variable
  (workers = sum k * y, batch = sum b * y);
* ``Sl[p]``, ``Sh[p]`` >= 0: the predicted p99 time in each stage.

Constraints: the one-hots sum to ``pair_p``; for every option i,
``S >= sum_j L[i,j] z[p,j] - M (1 - y[i])`` (exact: z picks one column, so the sum *is* the
latency of option i at the chosen threshold; ``L`` carries a value above the SLO where the option
cannot hold the SLO or lacks capacity for headroom x rate, which the big-M ``M = max L`` switches
off when the option is not chosen); the deferred path ``Sl + Sh <= SLO`` (random split:
each stage ``<= SLO``); ``sum k y <= workers``.

Objective (minimised), lexicographic through integer weights:
``rank(j) (W+1) + workers + (Sl+Sh) / (2 SLO + 1)``; ``rank`` is 0 for the best quality (or, for
the paper's policy, the highest t); workers <= W < W+1 and the latency term < 1, so quality
strictly dominates, then fewer workers, then lower latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pulp

from diffserve.planner.instance import PairTable


@dataclass
class Choice:
    """One solved plan, solver-independent: indices into the tables."""

    table: int
    column: int
    light_option: int
    heavy_option: int
    objective_key: tuple  # (rank, workers, latency), or (rank, latency, workers) when latency comes first


def available_solvers() -> list[str]:
    names = pulp.listSolvers(onlyAvailable=True)
    out = []
    if "HiGHS" in names:
        out.append("highs")
    if "PULP_CBC_CMD" in names:
        out.append("cbc")
    return out


_HIGHS_QUIET = False


def _silence_highs_banner() -> None:
    """highspy prints a copyright banner to fd 1 when its first Highs() is built; that would
    corrupt a CLI's stdout, so build the first one with fd 1 pointed at /dev/null."""
    global _HIGHS_QUIET
    if _HIGHS_QUIET:
        return
    import os
    import sys

    try:
        import highspy
    except ImportError:
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _HIGHS_QUIET = True


def _solver(name: str, time_limit_s: float | None) -> pulp.LpSolver:
    if name == "highs":
        _silence_highs_banner()
        return pulp.HiGHS(msg=False, gapRel=0.0, gapAbs=1e-7, timeLimit=time_limit_s)
    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, gapRel=0.0, gapAbs=1e-7, timeLimit=time_limit_s)
    raise ValueError(f"unknown MILP solver {name!r}")


def _stage_constraints(prob, tag, stage, z, y, big_m):
    s_var = pulp.LpVariable(f"S{tag}", lowBound=0)
    for i, row in enumerate(stage.latency):
        nz = np.flatnonzero(row)
        if nz.size == 0:
            continue
        if np.all(row == row[0]):
            prob += s_var >= float(row[0]) * y[i]
            continue
        expr = pulp.LpAffineExpression([(z[j], float(row[j])) for j in nz])
        prob += s_var >= expr - big_m + big_m * y[i]
    return s_var


def solve_milp(
    tables: list[PairTable],
    *,
    workers: int,
    slo_ms: float,
    solver: str,
    time_limit_s: float | None = 10.0,
    latency_first: bool = False,
) -> tuple[Choice | None, str]:
    """Solve the MILP over all pair tables; returns (choice or None when infeasible, status).

    ``latency_first`` swaps the tie-breaks (lower latency, then fewer workers): static policies
    keep every worker anyway, so they should pick the batch sizes that are fastest with them.
    """
    prob = pulp.LpProblem("diffserve_plan", pulp.LpMinimize)
    objective = []
    worker_terms = []
    latency_scale = 1.0 / (2.0 * slo_ms + 1.0)
    worker_scale = 1.0
    if latency_first:  # latency in units of 1e-3 ms dominates; workers break exact ties
        latency_scale, worker_scale = 1.0, 1.0 / (workers + 1) / 1e3
    rank_scale = (workers + 1) if not latency_first else 4.0 * slo_ms + 4.0
    handles = []
    multi = len(tables) > 1
    pair_vars = []
    for p, tab in enumerate(tables):
        pick = pulp.LpVariable(f"pair_{p}", cat=pulp.LpBinary) if multi else 1
        pair_vars.append(pick)
        ncol = len(tab.fractions)
        z = [pulp.LpVariable(f"z_{p}_{j}", cat=pulp.LpBinary) for j in range(ncol)]
        yl = [pulp.LpVariable(f"yl_{p}_{i}", cat=pulp.LpBinary) for i in range(len(tab.light.options))]
        yh = [pulp.LpVariable(f"yh_{p}_{i}", cat=pulp.LpBinary) for i in range(len(tab.heavy.options))]
        prob += pulp.lpSum(z) == pick
        prob += pulp.lpSum(yl) == pick
        prob += pulp.lpSum(yh) == pick
        big_m = float(max(tab.light.latency.max(), tab.heavy.latency.max(), 1.0))
        s_l = _stage_constraints(prob, f"l_{p}", tab.light, z, yl, big_m)
        s_h = _stage_constraints(prob, f"h_{p}", tab.heavy, z, yh, big_m)
        if tab.sequential:
            prob += s_l + s_h <= slo_ms
        else:
            prob += s_l <= slo_ms
            prob += s_h <= slo_ms
        objective.append(pulp.lpSum(float(tab.rank[j] * rank_scale) * z[j] for j in range(ncol)))
        objective.append(latency_scale * (s_l + s_h))
        for yvars, stage in ((yl, tab.light), (yh, tab.heavy)):
            worker_terms += [(v, float(k)) for v, (_, k) in zip(yvars, stage.options) if k]
        handles.append((z, yl, yh, s_l, s_h))
    if multi:
        prob += pulp.lpSum(pair_vars) == 1
    workers_expr = pulp.LpAffineExpression(worker_terms)
    prob += workers_expr <= workers
    prob += pulp.lpSum(objective) + worker_scale * workers_expr
    status = prob.solve(_solver(solver, time_limit_s))
    label = pulp.LpStatus.get(status, str(status))
    if label != "Optimal":
        return None, label
    for p, (z, yl, yh, s_l, s_h) in enumerate(handles):
        if multi and (pair_vars[p].value() or 0) < 0.5:
            continue
        j = _argmax(z)
        il, ih = _argmax(yl), _argmax(yh)
        tab = tables[p]
        used = tab.light.options[il][1] + tab.heavy.options[ih][1]
        lat = float(tab.light.latency[il, j] + tab.heavy.latency[ih, j])
        key = (int(tab.rank[j]), lat, used) if latency_first else (int(tab.rank[j]), used, lat)
        return Choice(p, j, il, ih, key), label
    return None, "no pair selected"


def _argmax(variables) -> int:
    values = [v.value() or 0.0 for v in variables]
    return int(np.argmax(values))


