"""Prometheus metrics, one registry per app so that tests and several servers never collide.

The serving loops report events through :class:`MetricsHooks` (:mod:`diffserve.server.hooks`);
they never touch prometheus objects directly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from diffserve.schemas import PlanFile
from diffserve.server.hooks import NoHooks, ServingHooks

_LATENCY_BUCKETS_MS = (25, 50, 100, 200, 400, 800, 1600, 2500, 3500, 5000, 7500, 10000, 20000, 60000)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_length = Gauge("diffserve_queue_length", "jobs waiting per pool", ["model"], registry=r)
        self.workers = Gauge("diffserve_workers", "workers assigned per pool", ["model"], registry=r)
        self.batch_size_target = Gauge("diffserve_batch_size_target", "plan batch size per pool", ["model"], registry=r)
        self.batch_size = Histogram("diffserve_batch_size", "executed batch sizes", ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.stage_latency = Histogram(
            "diffserve_stage_latency_ms", "model-time latency per stage", ["model", "part"], buckets=_LATENCY_BUCKETS_MS, registry=r
        )
        self.request_latency = Histogram(
            "diffserve_request_latency_ms", "model-time end-to-end latency of answered images", buckets=_LATENCY_BUCKETS_MS, registry=r
        )
        self.time_to_first_image = Histogram(
            "diffserve_time_to_first_image_ms",
            "model time from arrival until a picture of the image reached the client: its partial (light) image "
            "when streamed, otherwise the whole response",
            ["stream"], buckets=_LATENCY_BUCKETS_MS, registry=r,
        )
        self.accepted = Counter("diffserve_accepted", "images admitted (accepted = completed + failed + cancelled)", registry=r)
        self.rejected = Counter("diffserve_rejected", "requests (not images) refused before admission, by reason; the ledger in both units is diffserve_ledger_requests/images_total", ["reason"], registry=r)
        self.requests = Counter("diffserve_requests", "admitted images (not requests, despite the name) by outcome: completed, failed, cancelled", ["outcome"], registry=r)
        self.answered_by = Counter("diffserve_answered_by", "images by the model that answered", ["model"], registry=r)
        self.deferred = Counter("diffserve_deferred", "images the discriminator sent to the heavy model", registry=r)
        self.scored = Counter("diffserve_scored", "light images scored by the discriminator", registry=r)
        self.degraded = Counter("diffserve_degraded", "light images returned because the heavy model could not make the deadline", registry=r)
        self.slo_violations = Counter("diffserve_slo_violations", "images answered late, failed or expired after admission", registry=r)
        self.dropped = Counter("diffserve_dropped", "jobs removed from a queue", ["model", "reason"], registry=r)
        self.worker_crashes = Counter(
            "diffserve_worker_crashes", "worker processes that died or hung, busy or idle (model: the pool it served)", ["model"], registry=r
        )
        self.workers_down = Gauge("diffserve_workers_down", "assigned workers not serving (loading, restarting, given up)", ["model"], registry=r)
        self.worker_gave_up = Counter("diffserve_worker_gave_up", "worker slots whose restarts failed too often", registry=r)
        self.threshold = Gauge("diffserve_threshold", "current discriminator threshold (-1 when none)", registry=r)
        self.deferral_rate = Gauge("diffserve_deferral_rate", "deferred / scored since start", registry=r)
        self.demand = Gauge("diffserve_demand_qps", "the controller's demand estimate (model-time QPS)", registry=r)
        self.replans = Counter("diffserve_replans", "controller decisions by result", ["result"], registry=r)
        self.inflight = Gauge("diffserve_inflight_images", "admitted images not yet answered", registry=r)
        # per SLO class (server/slo_classes.py; one class, "default", without --slo-class)
        self.class_requests = Counter(
            "diffserve_class_requests", "images by SLO class and outcome: completed, failed, cancelled, rejected", ["slo_class", "outcome"],
            registry=r)
        self.class_slo_violations = Counter(
            "diffserve_class_slo_violations", "images of the class answered late, failed or expired after admission", ["slo_class"], registry=r)
        self.class_degraded = Counter("diffserve_class_degraded", "light images returned for a deferred query, by class", ["slo_class"], registry=r)
        self.class_latency = Histogram(
            "diffserve_class_latency_ms", "model-time end-to-end latency of answered images, by class", ["slo_class"],
            buckets=_LATENCY_BUCKETS_MS, registry=r)
        self.class_demand = Gauge("diffserve_class_demand_qps", "the controller's demand estimate per class", ["slo_class"], registry=r)
        # GPU time (model seconds of one worker): what ran, and what cancellation at step boundaries saved
        self.gpu_seconds = Counter("diffserve_gpu_seconds", "worker model-time seconds spent running batches", ["model"], registry=r)
        self.gpu_seconds_saved = Counter(
            "diffserve_gpu_seconds_saved", "worker seconds not spent: batches stopped at a step boundary because every request in them was gone",
            ["model"], registry=r)
        self.batches_cancelled = Counter(
            "diffserve_batches_cancelled", "running batches stopped at a step boundary (all their requests gone)", ["model"], registry=r)
        # work done for clients that had gone away: with cancellation only the share of batches
        # that ran on for their live requests; without it, also work that started after the client left
        self.gpu_seconds_gone = Counter(
            "diffserve_gpu_seconds_gone",
            "worker seconds spent, pro rata over a batch's jobs, on jobs whose client had gone away by the batch's end", ["model"], registry=r)
        self.jobs_gone = Counter(
            "diffserve_jobs_gone", "jobs run whose client went away: before the batch started (none with cancellation) "
            "or while it ran", ["model", "when"], registry=r)

    # hooks used by pools and workers
    def queue_changed(self, model: str, length: int) -> None:
        self.queue_length.labels(model).set(length)

    def dropped_job(self, model: str, reason: str) -> None:
        self.dropped.labels(model, reason).inc()

    def class_answered(self, slo_class: str, latency_ms: float, *, degraded: bool, late: bool) -> None:
        self.class_latency.labels(slo_class).observe(latency_ms)
        if degraded:
            self.class_degraded.labels(slo_class).inc()
        if late:
            self.class_slo_violations.labels(slo_class).inc()

    def update_deferral_rate(self) -> None:
        scored = self.scored._value.get()
        self.deferral_rate.set(self.deferred._value.get() / scored if scored else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsHooks(NoHooks):
    """The serving loops' events (:class:`~diffserve.server.hooks.ServingHooks`) as the metrics
    of ``GET /metrics``: the one place that knows which event moves which metric."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def queue_changed(self, model: str, length: int) -> None:
        self.m.queue_changed(model, length)

    def dropped(self, model: str, reason: str) -> None:
        self.m.dropped_job(model, reason)

    def scored(self, deferred: bool) -> None:
        self.m.scored.inc()
        if deferred:
            self.m.deferred.inc()

    def cascade_step_done(self) -> None:
        self.m.update_deferral_rate()

    def answered(self, model: str, latency_ms: float, *, degraded: bool, late: bool, slo_class: str = "default") -> None:
        self.m.answered_by.labels(model).inc()
        self.m.request_latency.observe(latency_ms)
        if degraded:
            self.m.degraded.inc()
        if late:
            self.m.slo_violations.inc()
        self.m.class_answered(slo_class, latency_ms, degraded=degraded, late=late)

    def plan_applied(self, plan: PlanFile) -> None:
        self.m.threshold.set(plan.threshold if plan.threshold is not None else -1)
        for p in plan.pools:
            self.m.batch_size_target.labels(p.model).set(p.batch_size)

    def admitted(self, n: int) -> None:
        self.m.accepted.inc(n)

    def rejected(self, reason: str, *, slo_class: str = "default", images: int = 1) -> None:
        self.m.rejected.labels(reason).inc()  # one request, however many images it asked for
        self.m.class_requests.labels(slo_class, "rejected").inc(images)  # images, as the class's other outcomes

    def inflight(self, n: int) -> None:
        self.m.inflight.set(n)

    def finished(self, outcome: str, *, slo_class: str = "default") -> None:
        self.m.requests.labels(outcome).inc()
        self.m.class_requests.labels(slo_class, outcome).inc()

    def failed_in_service(self, *, slo_class: str = "default") -> None:
        self.m.slo_violations.inc()
        self.m.class_slo_violations.labels(slo_class).inc()

    def worker_event(self, model: str | None, event: str) -> None:
        if event in ("crashed", "hung"):
            self.m.worker_crashes.labels(model or "idle").inc()
        elif event == "gave_up":
            self.m.worker_gave_up.inc()

    def pool_workers(self, model: str, workers: int, down: int) -> None:
        self.m.workers.labels(model).set(workers)
        self.m.workers_down.labels(model).set(down)

    def batch_ran(self, model: str, size: int, compute_ms: float) -> None:
        self.m.gpu_seconds.labels(model).inc(compute_ms / 1000.0)
        self.m.batch_size.labels(model).observe(size)
        self.m.stage_latency.labels(model, "compute").observe(compute_ms)

    def batch_cancelled(self, model: str, ran_ms: float, saved_ms: float) -> None:
        self.m.gpu_seconds.labels(model).inc(ran_ms / 1000.0)
        self.m.gpu_seconds_saved.labels(model).inc(saved_ms / 1000.0)
        self.m.batches_cancelled.labels(model).inc()

    def gone_work(self, model: str, size: int, ran_ms: float, *, gone_at_start: int, gone_at_end: int) -> None:
        self.m.gpu_seconds_gone.labels(model).inc(ran_ms / 1000.0 * gone_at_end / max(size, 1))
        if gone_at_start:
            self.m.jobs_gone.labels(model, "before_start").inc(gone_at_start)
        if gone_at_end > gone_at_start:
            self.m.jobs_gone.labels(model, "while_running").inc(gone_at_end - gone_at_start)

    def job_started(self, model: str, queued_ms: float) -> None:
        self.m.stage_latency.labels(model, "queue").observe(queued_ms)


#: The pool's hooks were the first events routed this way; the name stays for existing callers.
PoolMetricsHooks = MetricsHooks


def serving_hooks(metrics: Metrics | None, hooks: ServingHooks | None = None) -> ServingHooks:
    """``hooks`` when given, else the metrics' hooks, else hooks that ignore every event."""
    if hooks is not None:
        return hooks
    return MetricsHooks(metrics) if metrics is not None else NoHooks()
