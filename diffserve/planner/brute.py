"""Brute force over every plan in the tables: the MILP's referee in tests and the benchmark.

Same tables, same objective key (quality rank, workers, latency), so any difference from
:func:`diffserve.planner.milp.solve_milp` is a bug in the formulation.
"""

from __future__ import annotations

import numpy as np

from diffserve.planner.instance import PairTable
from diffserve.planner.milp import Choice


def enumerate_best(
    tables: list[PairTable], *, workers: int, slo_ms: float, latency_first: bool = False
) -> Choice | None:
    best: Choice | None = None
    for p, tab in enumerate(tables):
        kl = tab.light.workers[:, None]
        kh = tab.heavy.workers[None, :]
        used = kl + kh
        fits = used <= workers
        for j in np.argsort(tab.rank, kind="stable"):
            rank = int(tab.rank[j])
            if best is not None and rank > best.objective_key[0]:
                break
            ll = tab.light.latency[:, j][:, None]
            lh = tab.heavy.latency[:, j][None, :]
            ok = fits & (ll <= slo_ms) & (lh <= slo_ms)
            if tab.sequential:
                ok &= (ll + lh) <= slo_ms
            if not ok.any():
                continue
            total = np.where(ok, ll + lh, np.inf)
            if latency_first:
                key = total + np.where(ok, used, workers + 1) / (workers + 1) / 1e3
            else:
                key = np.where(ok, used, workers + 1) * (4.0 * slo_ms + 4.0) + total
            il, ih = np.unravel_index(int(np.argmin(key)), key.shape)
            lat, n = float(total[il, ih]), int(used[il, ih])
            cand = Choice(p, int(j), int(il), int(ih), (rank, lat, n) if latency_first else (rank, n, lat))
            if best is None or cand.objective_key < best.objective_key:
                best = cand
    return best
