"""``bench compare --class-mix``: several SLO classes on one cluster, ours against two baselines,
and the disconnect scenario (``--disconnect-after``, ``--disconnect-share``).

Each arrival's class is drawn per seed from the mix's shares (``interactive:2.5s:0.3,batch:30s:0.7``),
so every run of a seed sees the same classes. The runs (virtual time, in-process):

- ``diffserve``: the server with the mix's SLO classes, earliest-deadline-first pools and the
  class-mix planner (planner/class_mix.py);
- ``diffserve-fifo``: the same server, classes and planner, with FIFO pools;
- ``single-class``: no classes: everything is served at the tightest class's SLO;
- with a disconnect scenario, also ``diffserve-no-cancel``: ours, but work of a client that left
  runs on (``serve --no-cancel``), the reference for the GPU-seconds that cancellation saves.

``diffserve-fifo`` and ``diffserve-no-cancel`` are class readings of ours in the policy registry
(``Reading(..., class_mix_only=True)`` in ``Policy.readings``, :func:`diffserve.policies.class_row`): how their servers differ is stated there.

Every row carries ``classes: {name: {slo_ms, sent, slo_violation_ratio, fid, degraded_share, ...}}``,
each class scored against its own SLO by the usual rules (metrics.score_records); requests whose
client left on purpose are not scored (``disconnected`` counts them). The row's own
``slo_violation_ratio`` is every class's violations over everything scored, and its ``fid`` the
request-weighted mean of the classes' FIDs. ``heavy_gpu_seconds`` is the heavy model's worker time
(``diffserve_gpu_seconds``), ``gpu_seconds_saved`` what cancellation at step boundaries saved.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from diffserve import policies as registry
from diffserve.errors import UserError
from diffserve.evaluation import report
from diffserve.evaluation.compare import CompareSpec, _fmt, aggregate_seeds, compare_title, serve_options
from diffserve.evaluation.inprocess import DISCONNECTED, InProcessLoad, run_in_process
from diffserve.evaluation.metrics import score_records
from diffserve.evaluation.records import RequestRecord
from diffserve.evaluation.runner import RunSpec, write_outputs
from diffserve.server.build import ServeOptions
from diffserve.server.slo_classes import check_class_name

OURS = "diffserve"
FIFO = "diffserve-fifo"
SINGLE = "single-class"
NO_CANCEL = "diffserve-no-cancel"
MIX_POLICIES = (SINGLE, FIFO, OURS)
CLASS_KEYS = ("slo_violation_ratio", "fid", "degraded_share", "latency_p99_ms")
#: A row's GPU-time figures (the disconnect scenario's), kept per seed with their spread
GPU_KEYS = ("heavy_gpu_seconds", "heavy_gpu_seconds_gone", "heavy_jobs_gone_before_start", "heavy_jobs_gone_while_running",
            "gpu_seconds_saved", "batches_cancelled", "status_500")


@dataclass(frozen=True)
class MixClass:
    name: str
    slo_ms: float
    share: float


def parse_class_mix(text: str) -> list[MixClass]:
    """``interactive:2.5s:0.3,batch:30s:0.7`` -> the classes; shares must add up to 1."""
    from diffserve.units import parse_duration_ms

    out: list[MixClass] = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        bits = [b.strip() for b in part.split(":")]
        if len(bits) != 3:
            raise UserError(f"--class-mix entries look like NAME:SLO:SHARE (interactive:2.5s:0.3), got {part.strip()!r}")
        name = check_class_name(bits[0].lower(), option="--class-mix")
        try:
            share = float(bits[2])
        except ValueError:
            share = float("nan")
        if not 0 < share <= 1:
            raise UserError(f"--class-mix {name}: the share must be in (0, 1], got {bits[2]!r}")
        if any(c.name == name for c in out):
            raise UserError(f"--class-mix: class {name!r} is given twice")
        out.append(MixClass(name, parse_duration_ms(bits[1], name=f"--class-mix {name}"), share))
    if not out:
        raise UserError("--class-mix names no class")
    total = sum(c.share for c in out)
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"--class-mix shares must add up to 1, got {total:g}")
    return out


def classes_of_arrivals(mix: list[MixClass], n: int, seed: int) -> list[str]:
    """Each arrival's class, drawn from the shares with a generator seeded by ``seed`` alone."""
    rng = random.Random(f"class-mix/{seed}")
    edges = np.cumsum([c.share for c in mix])
    out = []
    for _ in range(n):
        i = int(np.searchsorted(edges, rng.random(), side="right"))
        out.append(mix[min(i, len(mix) - 1)].name)
    return out


def disconnecting(n: int, share: float, seed: int) -> frozenset[int]:
    """The arrivals whose client goes away, drawn with ``share`` per arrival (seeded)."""
    rng = random.Random(f"disconnect/{seed}")
    return frozenset(i for i in range(n) if rng.random() < share)


@dataclass
class Disconnect:
    after_ms: float
    share: float

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise UserError(f"--disconnect-share must be in (0, 1), got {self.share:g}")


def mix_options(spec: CompareSpec, mix: list[MixClass], label: str, seed: int) -> ServeOptions:
    """The server of one run: ours with the classes; FIFO the same with FIFO pools; single-class
    with no classes at the tightest SLO; no-cancel ours without cancellation."""
    opts = serve_options(spec, OURS, seed)
    tight = min(c.slo_ms for c in mix)
    if label == SINGLE:
        return replace(opts, slo_ms=tight, demand_qps=spec.demand_for(OURS, seed))
    classes = {c.name: c.slo_ms for c in mix}
    bench = registry.class_row(label)[1]  # ours, or its class reading (diffserve-fifo, diffserve-no-cancel)
    return replace(opts, slo_classes=classes, pool_order=bench.pool_order, cancel=bench.cancel)


def score_classes(records: list[RequestRecord], classes: list[str], mix: list[MixClass], spec: CompareSpec) -> dict[str, Any]:
    """Per class: its records (those whose client stayed) scored against its own SLO."""
    out: dict[str, Any] = {}
    for c in mix:
        mine = [r for r in records if classes[r.index] == c.name and not (r.error or "").startswith(DISCONNECTED)]
        if not mine:
            out[c.name] = {"slo_ms": c.slo_ms, "sent": 0, **{k: None for k in CLASS_KEYS}}
            continue
        s = score_records(mine, spec.pair, c.slo_ms, "cascade")
        out[c.name] = {
            "slo_ms": c.slo_ms, "sent": s.n_requests, "slo_violation_ratio": s.slo_violation_ratio, "fid": s.fid,
            "degraded_share": s.degraded_ratio, "latency_p99_ms": s.latency_p99_ms,
        }
    return out


def _observer(into: dict[str, Any], heavy: str) -> Callable:
    def observe(runtime) -> None:
        m = runtime.metrics
        into["heavy_gpu_seconds"] = round(m.gpu_seconds.labels(heavy)._value.get(), 3)
        into["gpu_seconds"] = round(sum(m.gpu_seconds.labels(p)._value.get() for p in runtime.pools), 3)
        into["gpu_seconds_saved"] = round(sum(m.gpu_seconds_saved.labels(p)._value.get() for p in runtime.pools), 3)
        into["batches_cancelled"] = int(sum(m.batches_cancelled.labels(p)._value.get() for p in runtime.pools))
        # the heavy work done for clients that had left (pro rata in a batch), and when they left
        into["heavy_gpu_seconds_gone"] = round(m.gpu_seconds_gone.labels(heavy)._value.get(), 3)
        into["heavy_jobs_gone_before_start"] = int(m.jobs_gone.labels(heavy, "before_start")._value.get())
        into["heavy_jobs_gone_while_running"] = int(m.jobs_gone.labels(heavy, "while_running")._value.get())
        led = runtime.ledger
        into["ledger"] = vars(led).copy()
        into["ledger_holds"] = led.accepted == led.completed + led.failed + led.cancelled
    return observe


def run_class_mix(
    spec: CompareSpec,
    mix: list[MixClass],
    *,
    disconnect: Disconnect | None = None,
    policies: tuple[str, ...] = MIX_POLICIES,
    on_policy_start: Callable[[str, int], None] | None = None,
    on_request_done: Callable[[str], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every run of the mix on every seed; writes results.json/results.md; returns one row per run."""
    if spec.clock != "virtual":
        raise UserError("--class-mix runs in virtual time (--clock virtual): the in-process client names each request's class")
    labels = tuple(policies) + ((NO_CANCEL,) if disconnect is not None and NO_CANCEL not in policies else ())
    unknown = [p for p in labels if p not in (*MIX_POLICIES, NO_CANCEL)]
    if unknown:
        raise UserError(f"--policies with --class-mix: unknown {unknown[0]!r}; choose from {', '.join((*MIX_POLICIES, NO_CANCEL))}")
    spec.output.mkdir(parents=True, exist_ok=True)
    tight = min(c.slo_ms for c in mix)
    rows: list[dict[str, Any]] = []
    for label in labels:
        runs = []
        for seed in spec.seeds:
            name = label if len(spec.seeds) == 1 else f"{label} seed {seed}"
            folder = spec.output / label / f"seed-{seed}"
            arrivals = spec.arrivals_at(seed)
            classes = classes_of_arrivals(mix, len(arrivals), seed)
            leaving = disconnecting(len(arrivals), disconnect.share, seed) if disconnect else frozenset()
            opts = mix_options(spec, mix, label, seed)
            load = InProcessLoad(
                slo_ms=max(c.slo_ms for c in mix), classes=None if label == SINGLE else classes, disconnects=leaving,
                disconnect_after_ms=disconnect.after_ms if disconnect else 0.0,
            )
            figures: dict[str, Any] = {}
            run = RunSpec(label=label, arrivals=arrivals, prompts=spec.prompts, profile=spec.profile, pair=spec.pair,
                          workers=spec.workers, slo_ms=tight, seed=seed, clock="virtual", quality_mode="cascade")
            if on_policy_start:
                on_policy_start(name, len(arrivals))
            started = time.monotonic()
            result = run_in_process(
                opts, arrivals, spec.prompts, seed=seed, solve_ms=spec.solve_ms, load=load,
                on_done=(lambda _r, n=name: on_request_done(n)) if on_request_done else None,
                observe=_observer(figures, spec.pair.heavy),
            )
            row, _tl = write_outputs(run, result, folder)
            per_class = score_classes(result.records, classes, mix, spec)
            scored = sum(v["sent"] for v in per_class.values())
            violations = sum((v["slo_violation_ratio"] or 0.0) * v["sent"] for v in per_class.values())
            fids = [(v["sent"], v["fid"]) for v in per_class.values() if v["fid"] is not None]
            row.update(
                figures,
                classes=per_class,
                slo_violation_ratio=round(violations / scored, 6) if scored else 0.0,
                fid=round(sum(w * f for w, f in fids) / sum(w for w, _ in fids), 4) if fids else None,
                disconnected=sum(1 for r in result.records if (r.error or "").startswith(DISCONNECTED)),
                status_500=sum(1 for r in result.records if r.status == 500),
                server_command="in-process, virtual time: serve " + _flags(opts),
                policy_wall_s=round(time.monotonic() - started, 2),
            )
            runs.append(row)
            log(f"{name}: " + ", ".join(
                f"{c} viol {_fmt3(v['slo_violation_ratio'])} FID {_fmt(v['fid'])}" for c, v in per_class.items()
            ) + f"; heavy GPU-s {figures.get('heavy_gpu_seconds')}")
        rows.append(_aggregate(runs))
        report.write_json(spec.output / "results.json", mix_document(spec, mix, disconnect, rows))
    report.write_json(spec.output / "results.json", mix_document(spec, mix, disconnect, rows))
    report.atomic_write_text(spec.output / "results.md", mix_markdown(spec, mix, disconnect, rows))
    return rows


def _flags(opts: ServeOptions) -> str:
    from diffserve.evaluation.compare import serve_flags

    flags = serve_flags(opts)
    flags += [f"--slo-class {n}={ms:g}ms" for n, ms in opts.slo_classes.items()]
    if opts.pool_order != "auto":
        flags.append(f"--pool-order {opts.pool_order}")
    if not opts.cancel:
        flags.append("--no-cancel")
    return " ".join(flags)


def _fmt3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`aggregate_seeds`, plus each class's metrics averaged over seeds with their spread."""
    row = aggregate_seeds([{k: v for k, v in r.items() if k not in ("classes", "ledger")} for r in runs])
    row["ledger_holds"] = all(r.get("ledger_holds", False) for r in runs)
    for key in GPU_KEYS:  # the disconnect figures' spread over seeds, and each seed's
        values = [r.get(key) for r in runs]
        row[f"{key}_std"] = round(float(np.std(values, ddof=1)), 6) if len(values) > 1 and None not in values else None
    row["gpu_per_seed"] = [{k: r.get(k) for k in GPU_KEYS} for r in runs]
    row["ledgers"] = [r.get("ledger") for r in runs]
    classes: dict[str, Any] = {}
    for name, first in runs[0]["classes"].items():
        entry: dict[str, Any] = {"slo_ms": first["slo_ms"], "sent": float(np.mean([r["classes"][name]["sent"] for r in runs]))}
        for key in CLASS_KEYS:
            values = [r["classes"][name][key] for r in runs]
            if any(v is None for v in values):
                entry[key], entry[f"{key}_std"] = None, None
                continue
            entry[key] = round(float(np.mean(values)), 6)
            entry[f"{key}_std"] = round(float(np.std(values, ddof=1)), 6) if len(values) > 1 else 0.0
        entry["per_seed"] = [{k: r["classes"][name][k] for k in ("slo_violation_ratio", "fid", "degraded_share")} for r in runs]
        classes[name] = entry
    row["classes"] = classes
    return row


def mix_document(spec: CompareSpec, mix: list[MixClass], disconnect: Disconnect | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    doc = {
        "trace": spec.trace_label, "workers": spec.workers, "clock": spec.clock, "seeds": list(spec.seeds),
        "class_mix": [{"name": c.name, "slo_ms": c.slo_ms, "share": c.share} for c in mix],
        "disconnect": None if disconnect is None else {"after_ms": disconnect.after_ms, "share": disconnect.share},
        "policies": rows,
    }
    for key, name in (("heavy_gpu_seconds", "heavy_gpu_seconds_saved_share"), ("heavy_gpu_seconds_gone", "heavy_gpu_seconds_gone_saved_share")):
        saving = cancellation_saving(rows, key)
        if saving is not None:
            doc[name] = saving
            per_seed = saving_per_seed(rows, key)
            doc[f"{name}_per_seed"] = per_seed
            doc[f"{name}_std"] = round(float(np.std(per_seed, ddof=1)), 4) if len(per_seed) > 1 else 0.0
    return doc


def saving_per_seed(rows: list[dict[str, Any]], key: str = "heavy_gpu_seconds") -> list[float]:
    """:func:`cancellation_saving` of each seed (ours and no-cancel run the same seeds, paired)."""
    by = {r["policy"]: r for r in rows}
    pairs = zip(by[OURS].get("gpu_per_seed") or [], by[NO_CANCEL].get("gpu_per_seed") or [])
    return [round(1.0 - a[key] / b[key], 4) for a, b in pairs if a.get(key) is not None and b.get(key)]


def cancellation_saving(rows: list[dict[str, Any]], key: str = "heavy_gpu_seconds") -> float | None:
    """How much less heavy GPU time ours spent than the same server without cancellation: in
    all (``heavy_gpu_seconds``, the issue's criterion) or for departed clients (``heavy_gpu_seconds_gone``)."""
    by = {r["policy"]: r for r in rows}
    if OURS not in by or NO_CANCEL not in by:
        return None
    ours, ref = by[OURS].get(key), by[NO_CANCEL].get(key)
    if ours is None or not ref:
        return None
    return round(1.0 - ours / ref, 4)


def saving_sentence(doc: dict[str, Any]) -> str:
    """The disconnect scenario's verdict: the fall in all heavy GPU-seconds (the issue's criterion)
    and in those spent on departed clients: of the means over seeds, then each seed's pair."""
    def pct(name: str) -> str:
        seeds = doc.get(f"{name}_per_seed") or []
        return f"{100 * doc[name]:.1f} %" + (f" (per seed {', '.join(f'{100 * v:.1f}' for v in seeds)})" if len(seeds) > 1 else "")

    text = f"Heavy GPU-seconds with cancellation are {pct('heavy_gpu_seconds_saved_share')} below the same run without it"
    if "heavy_gpu_seconds_gone_saved_share" in doc:
        text += f"; those spent on departed clients' work {pct('heavy_gpu_seconds_gone_saved_share')} below"
    return text + "."


GONE_HEADER = ("| run | heavy GPU-s | of it for departed clients | departed clients' heavy jobs started after / before they left | "
               "GPU-s saved at step boundaries | batches stopped | 500s | ledger holds |")


def gone_row(row: dict[str, Any]) -> str:
    """One row of the disconnect table (means over seeds, with spread where the row has it)."""
    return (f"| {row['policy']} | {_pm(row, 'heavy_gpu_seconds', 0)} | {_pm(row, 'heavy_gpu_seconds_gone', 0)} | "
            f"{_pm(row, 'heavy_jobs_gone_before_start', 0)} / {_pm(row, 'heavy_jobs_gone_while_running', 0)} | "
            f"{_pm(row, 'gpu_seconds_saved', 1)} | {_pm(row, 'batches_cancelled', 1)} | {_pm(row, 'status_500', 0)} | "
            f"{row.get('ledger_holds')} |")


def _pm(entry: dict[str, Any], key: str, digits: int) -> str:
    value = entry.get(key)
    if value is None:
        return "n/a"
    std = entry.get(f"{key}_std")
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def mix_markdown(spec: CompareSpec, mix: list[MixClass], disconnect: Disconnect | None, rows: list[dict[str, Any]]) -> str:
    title = compare_title(spec).replace(f", SLO {spec.slo_ms / 1000:g} s", "")
    mix_text = ", ".join(f"{c.name} {c.slo_ms / 1000:g} s ({100 * c.share:g} %)" for c in mix)
    lines = [f"# {title}: class mix {mix_text}", ""]
    if disconnect:
        lines += [f"{100 * disconnect.share:g} % of clients disconnect {disconnect.after_ms / 1000:g} s after sending.", ""]
    lines += ["| run | class | SLO | sent | violations | FID | degraded | p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for name, e in row["classes"].items():
            lines.append(
                f"| {row['policy']} | {name} | {e['slo_ms'] / 1000:g} s | {e['sent']:.0f} | {_pm(e, 'slo_violation_ratio', 4)} | "
                f"{_pm(e, 'fid', 2)} | {_pm(e, 'degraded_share', 4)} | {_pm(e, 'latency_p99_ms', 0)} |"
            )
    lines += ["", GONE_HEADER, "| --- " * GONE_HEADER.count(" | ") + "| --- |"]
    lines += [gone_row(row) for row in rows]
    doc = mix_document(spec, mix, disconnect, rows)
    if "heavy_gpu_seconds_saved_share" in doc:
        lines += ["", saving_sentence(doc)]
    lines += ["", "Each class is scored against its own SLO; mean ± sample sd over seeds. Emulated models (the paper's A100 "
              "profile and FID curves), virtual time.", ""]
    return "\n".join(lines)
