"""The policy names: the one list that the planner, the server's options and the benchmark share.

A module of its own with no imports, so that the server's options and the benchmark name the
policies without reaching into the solver's code. Listed baselines first and ours last: the order
tables and plots use.
"""

from __future__ import annotations

#: Ours: the query-aware cascade with degrade-to-light.
OURS = "diffserve"
#: Every policy the planner can solve for.
POLICIES = ("clipper-light", "clipper-heavy", "static", "diffserve-paper", "proteus", OURS)
#: Policies that keep a fixed plan for a whole run and therefore give it every worker.
STATIC_POLICIES = ("static", "clipper-light", "clipper-heavy")
