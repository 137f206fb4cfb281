"""The policy registry: every policy defined once, and everything else asks it.

A policy is a :class:`Policy`: how it routes queries (which fixes its planner columns), what it
ranks those columns by (its objective), whether it plans for quality as served, whether its
controller re-plans, whether a plan holds every worker, how ``bench compare`` configures its
server, and its help text. The planner (tables, solver, settings), the server's controller and
options, the benchmark and the CLI help read these fields instead of comparing names, so adding
a policy is one :func:`register` call (or one entry in :data:`BUILTIN`) plus its tests.

A module with no imports beyond the error type, so that the server's options and the benchmark
name the policies without reaching into the solver's code. :func:`names` lists baselines first
and ours last: the order tables and plots use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from diffserve.errors import UserError

#: How a policy sends queries to the models (the plan's ``routing`` field):
#: ``cascade`` light first, the discriminator defers doubted queries to heavy (sequential);
#: ``random-split`` a fraction of queries straight to heavy, no discriminator (parallel);
#: ``light-only`` / ``heavy-only`` one model.
ROUTINGS = ("cascade", "random-split", "light-only", "heavy-only")
#: What the planner ranks a policy's columns by: ``quality`` (best quality first) or ``threshold``
#: (highest threshold first, as the paper artifact's controller did).
RANKS = ("quality", "threshold")
#: How ``bench compare`` picks the demand a policy's server starts with: ``peak`` the trace's
#: highest re-plan window (the one plan a policy that never re-plans will ever have);
#: ``first-window`` the first window's rate (what a controller starting with the traffic sees).
BENCH_DEMANDS = ("peak", "first-window")
#: The planner's latency models (see :mod:`diffserve.planner.settings`).
LATENCY_MODELS = ("queueing", "batch")


@dataclass(frozen=True)
class BenchConfig:
    """How ``bench compare`` starts a policy's server (the flags of ``diffserve serve``)."""

    #: ``--degrade``: only our system has a degrade mode; the paper's baselines dropped late requests.
    degrade: bool = False
    #: ``--latency-model``: ``batch`` for a policy that plans as the paper artifact did.
    latency_model: str = "queueing"
    #: ``--demand``: one of :data:`BENCH_DEMANDS`.
    demand: str = "first-window"
    #: ``--pool-order`` (``auto``: EDF with SLO classes): ``fifo`` reads ours with FIFO pools
    pool_order: str = "auto"
    #: ``--cancel/--no-cancel``: withdraw the work of a client that left
    cancel: bool = True

    def __post_init__(self) -> None:
        if self.pool_order not in ("auto", "fifo", "edf"):
            raise ValueError(f"bench pool order must be auto, fifo or edf, got {self.pool_order!r}")
        if self.latency_model not in LATENCY_MODELS:
            raise ValueError(f"bench latency model must be one of {LATENCY_MODELS}, got {self.latency_model!r}")
        if self.demand not in BENCH_DEMANDS:
            raise ValueError(f"bench demand must be one of {BENCH_DEMANDS}, got {self.demand!r}")


@dataclass(frozen=True)
class Reading:
    """A further bench row of a policy: the same policy, its server started another way.

    A second reading of a baseline is shown beside its first, so that ours is never judged against
    only the weaker of the two. ``class_mix_only``: the reading differs only under SLO classes
    (FIFO pools, no cancellation), so it is a row of ``bench compare --class-mix`` and not of the
    plain compare."""

    label: str
    config: BenchConfig
    class_mix_only: bool = False


@dataclass(frozen=True)
class Policy:
    """One policy, all its behaviour in one place."""

    name: str
    #: one line for ``--help`` and the docs
    help: str
    #: one of :data:`ROUTINGS`; fixes the planner's columns (thresholds, heavy fractions, one model)
    routing: str
    #: one of :data:`RANKS`: the objective the MILP maximises over those columns
    rank: str = "quality"
    #: with degrade on and the queueing model, plan for the quality as served (degrade-aware
    #: objective, :mod:`diffserve.planner.degrade`) instead of every stage within the SLO
    served_objective: bool = False
    #: the controller re-plans every interval; ``False``: the first plan is kept for the whole run
    replans: bool = True
    #: a plan holds every worker: spare workers are given to the pools by default and the MILP
    #: minimises latency before it ranks columns (a plan kept for a whole run may as well be fast)
    holds_all_workers: bool = False
    #: ours (highlighted in plots, the row the verdicts compare against)
    ours: bool = False
    bench: BenchConfig = field(default_factory=BenchConfig)
    #: further rows the bench can run for this policy (:class:`Reading`)
    readings: tuple[Reading, ...] = ()

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"policy {self.name!r}: routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.rank not in RANKS:
            raise ValueError(f"policy {self.name!r}: rank must be one of {RANKS}, got {self.rank!r}")
        if self.served_objective and self.routing != "cascade":
            raise ValueError(f"policy {self.name!r}: the served objective is defined for cascades only")

    @property
    def cascade(self) -> bool:
        """Routes through the discriminator: its columns are thresholds and a threshold may be pinned."""
        return self.routing == "cascade"

    @property
    def sequential(self) -> bool:
        """Every query visits the light stage first (the heavy stage sees only deferred ones)."""
        return self.routing == "cascade"

    @property
    def degraded_role(self) -> str:
        """The model a degraded plan (no plan meets the SLO) serves alone: ``light`` or ``heavy``."""
        return "heavy" if self.routing == "heavy-only" else "light"

    @property
    def quality_mode(self) -> str:
        """How its answers are scored: ``random-split`` (no discriminator) or ``cascade``."""
        return "random-split" if self.routing == "random-split" else "cascade"

    @property
    def default_spare_workers(self) -> str:
        """What the planner does with workers no pool needs when the settings do not say."""
        return "fill" if self.holds_all_workers else "idle"


#: The built-in policies, baselines first and ours last.
BUILTIN: tuple[Policy, ...] = (
    Policy("clipper-light", "the light model alone (Clipper-style, one model)", routing="light-only",
           replans=True, holds_all_workers=True),
    Policy("clipper-heavy", "the heavy model alone (Clipper-style, one model)", routing="heavy-only",
           replans=True, holds_all_workers=True),
    # the bench plans static as the paper's planner did, with batch latencies (issue #19: planned with
    # our queueing model it picked lower thresholds and scored worse, a weaker reading than the
    # paper's); ``static-queueing`` keeps that reading as a second row
    Policy("static", "a cascade planned once for the peak demand, never re-planned", routing="cascade",
           replans=False, holds_all_workers=True, bench=BenchConfig(demand="peak", latency_model="batch"),
           readings=(Reading("static-queueing", BenchConfig(demand="peak")),)),
    Policy("diffserve-paper", "the paper artifact's controller: a cascade that maximises the threshold",
           routing="cascade", rank="threshold", bench=BenchConfig(latency_model="batch")),
    Policy("proteus", "a random split of queries between light and heavy, no discriminator (Proteus-style)",
           routing="random-split"),
    Policy("diffserve", "ours: the query-aware cascade planned for quality as served, with degrade-to-light",
           routing="cascade", served_objective=True, ours=True, bench=BenchConfig(degrade=True),
           readings=(Reading("diffserve-fifo", BenchConfig(degrade=True, pool_order="fifo"), class_mix_only=True),
                     Reading("diffserve-no-cancel", BenchConfig(degrade=True, cancel=False), class_mix_only=True))),
)

_REGISTRY: dict[str, Policy] = {p.name: p for p in BUILTIN}

#: Ours: the query-aware cascade with degrade-to-light.
OURS = next(p.name for p in BUILTIN if p.ours)
#: The built-in cascade that plans once and never re-plans: what a bench serving a fixed,
#: hand-built plan starts the server with.
STATIC = "static"
#: The built-in policy names (a snapshot; :func:`names` also lists registered ones).
POLICIES = tuple(p.name for p in BUILTIN)
#: Built-in policies that keep a fixed plan for a whole run and therefore give it every worker.
STATIC_POLICIES = tuple(p.name for p in BUILTIN if p.holds_all_workers)


def names() -> tuple[str, ...]:
    """Every registered policy, baselines first (in registration order) and ours last."""
    ordered = sorted(_REGISTRY.values(), key=lambda p: p.ours)
    return tuple(p.name for p in ordered)


def get(name: str, *, flag: str | None = None) -> Policy:
    """The policy called ``name``; an unknown name is a :class:`UserError` naming the choices (and
    the command-line ``flag`` it came from, when given)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        if flag:
            raise UserError(f"{flag} must be one of {', '.join(names())}, got {name!r}") from None
        raise UserError(f"unknown policy {name!r}; choose one of: {', '.join(names())}") from None


def bench_labels(*, class_mix: bool = False) -> tuple[str, ...]:
    """Every row ``bench compare`` can run, in table order: each policy, then its further readings
    (``class_mix``: also those of ``--class-mix`` runs only)."""
    return tuple(q for n in names() for q in (
        n, *(r.label for r in _REGISTRY[n].readings if class_mix or not r.class_mix_only)))


def bench_row(label: str, *, flag: str | None = None, class_mix: bool = False) -> tuple[Policy, BenchConfig]:
    """The policy behind a bench row and how the bench starts it (``static-queueing`` -> static
    with the queueing model; with ``class_mix`` also ``diffserve-fifo`` -> ours with FIFO pools);
    an unknown label is a :class:`UserError` naming the choices."""
    for policy in _REGISTRY.values():
        if policy.name == label:
            return policy, policy.bench
        for reading in policy.readings:
            if reading.label == label and (class_mix or not reading.class_mix_only):
                return policy, reading.config
    where = f"{flag} must be one of" if flag else f"unknown policy {label!r}; choose one of:"
    raise UserError(f"{where} {', '.join(bench_labels(class_mix=class_mix))}" + (f", got {label!r}" if flag else ""))


def class_row(label: str) -> tuple[Policy, BenchConfig]:
    """A row of ``bench compare --class-mix``: :func:`bench_row` with the class-mix readings."""
    return bench_row(label, class_mix=True)


def register(policy: Policy) -> Policy:
    """Add ``policy`` to the registry (a new name; replacing a policy would change its plans)."""
    if policy.name in _REGISTRY:
        raise ValueError(f"a policy named {policy.name!r} is already registered")
    _REGISTRY[policy.name] = policy
    return policy


def unregister(name: str) -> None:
    """Remove a policy added by :func:`register` (the built-ins stay)."""
    if any(p.name == name for p in BUILTIN):
        raise ValueError(f"{name!r} is a built-in policy")
    _REGISTRY.pop(name, None)


@contextmanager
def registered(policy: Policy) -> Iterator[Policy]:
    """``policy`` registered for the duration of a ``with`` block (tests, experiments)."""
    register(policy)
    try:
        yield policy
    finally:
        unregister(policy.name)


def cascade_policies() -> tuple[str, ...]:
    """The policies whose threshold an operator may pin (they route through the discriminator)."""
    return tuple(n for n in names() if _REGISTRY[n].cascade)


def choices_help() -> str:
    """The ``--policy`` help: every policy with its one line."""
    return "; ".join(f"{p.name}: {p.help}" for p in (_REGISTRY[n] for n in names()))
