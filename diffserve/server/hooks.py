"""The serving loops' events, reported through one hooks object instead of metrics calls.

The router, the runtime, the worker loops and the pools say what happened (a query was scored,
a batch ran, a request was rejected, ...) by calling a :class:`ServingHooks`; what is done with
it is the hooks' business. :class:`~diffserve.server.metrics.MetricsHooks` turns the events into
the Prometheus metrics of ``GET /metrics``; :class:`NoHooks` ignores them (tests, tools). This is
the shape of LitServe's callbacks: the loops stay free of any one observer's API, and another
observer (a tracer, a log of decisions) is one more implementation of this protocol.
"""

from __future__ import annotations

from typing import Protocol

from diffserve.schemas import PlanFile


class ServingHooks(Protocol):
    """Every event the serving loops report. The pool's two (``queue_changed``, ``dropped``) are
    :class:`~diffserve.server.pool.PoolHooks`. ``slo_class`` names the request's SLO class
    (server/slo_classes.py; ``default`` without ``--slo-class``)."""

    # pools
    def queue_changed(self, model: str, length: int) -> None: ...
    def dropped(self, model: str, reason: str) -> None: ...
    # router
    def scored(self, deferred: bool) -> None: ...
    def cascade_step_done(self) -> None: ...
    def answered(self, model: str, latency_ms: float, *, degraded: bool, late: bool, slo_class: str = "default") -> None: ...
    # runtime
    def plan_applied(self, plan: PlanFile) -> None: ...
    def admitted(self, n: int) -> None: ...
    def rejected(self, reason: str, *, slo_class: str = "default", images: int = 1) -> None: ...
    def inflight(self, n: int) -> None: ...
    def finished(self, outcome: str, *, slo_class: str = "default") -> None: ...
    def failed_in_service(self, *, slo_class: str = "default") -> None: ...
    def worker_event(self, model: str | None, event: str) -> None: ...
    # worker loops
    def pool_workers(self, model: str, workers: int, down: int) -> None: ...
    def batch_ran(self, model: str, size: int, compute_ms: float) -> None: ...
    def batch_cancelled(self, model: str, ran_ms: float, saved_ms: float) -> None: ...
    def gone_work(self, model: str, size: int, ran_ms: float, *, gone_at_start: int, gone_at_end: int) -> None: ...
    def job_started(self, model: str, queued_ms: float) -> None: ...


class NoHooks:
    """Hooks that ignore every event."""

    def queue_changed(self, model: str, length: int) -> None:
        pass

    def dropped(self, model: str, reason: str) -> None:
        pass

    def scored(self, deferred: bool) -> None:
        pass

    def cascade_step_done(self) -> None:
        pass

    def answered(self, model: str, latency_ms: float, *, degraded: bool, late: bool, slo_class: str = "default") -> None:
        pass

    def plan_applied(self, plan: PlanFile) -> None:
        pass

    def admitted(self, n: int) -> None:
        pass

    def rejected(self, reason: str, *, slo_class: str = "default", images: int = 1) -> None:
        pass

    def inflight(self, n: int) -> None:
        pass

    def finished(self, outcome: str, *, slo_class: str = "default") -> None:
        pass

    def failed_in_service(self, *, slo_class: str = "default") -> None:
        pass

    def worker_event(self, model: str | None, event: str) -> None:
        pass

    def pool_workers(self, model: str, workers: int, down: int) -> None:
        pass

    def batch_ran(self, model: str, size: int, compute_ms: float) -> None:
        pass

    def batch_cancelled(self, model: str, ran_ms: float, saved_ms: float) -> None:
        pass

    def gone_work(self, model: str, size: int, ran_ms: float, *, gone_at_start: int, gone_at_end: int) -> None:
        pass

    def job_started(self, model: str, queued_ms: float) -> None:
        pass
