"""Arrival processes for the load generator, all in *model time* (milliseconds from the start).

The generator divides these times by the server's speedup to get wall times, so the same trace
means the same load whatever the emulation speed. Every source returns a sorted list of
:class:`Arrival`; randomness always comes from an injected ``numpy.random.Generator`` so a seed
reproduces a run exactly.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffserve.errors import UserError


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request to send: when (model ms from the start) and which prompt."""

    time_ms: float
    prompt_index: int


def read_trace(path: str | Path) -> list[Arrival]:
    """Read a trace in the paper's format: one ``arrival_ms,prompt_index`` line per request.

    Blank lines and ``#`` comments are skipped and a non-numeric first line is taken as a header.
    Arrivals are returned sorted by time (a stable sort keeps the file's order for ties), so a
    trace assembled by concatenation still replays correctly.
    """
    source = Path(path)
    if not source.is_file():
        raise UserError(f"trace file not found: {source}")
    arrivals: list[Arrival] = []
    with source.open(encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = [p.strip() for p in line.split(",")]
            try:
                if len(parts) != 2:
                    raise ValueError
                time_ms, index = float(parts[0]), int(float(parts[1]))
            except ValueError:
                if not arrivals and lineno == 1:
                    continue  # a header line
                raise UserError(f"{source}:{lineno}: expected 'arrival_ms,prompt_index', got {line[:80]!r}") from None
            if not math.isfinite(time_ms) or time_ms < 0:
                raise UserError(f"{source}:{lineno}: arrival_ms must be a finite number >= 0, got {parts[0]!r}")
            if index < 0:
                raise UserError(f"{source}:{lineno}: prompt_index must be >= 0, got {parts[1]!r}")
            arrivals.append(Arrival(time_ms, index))
    if not arrivals:
        raise UserError(f"trace file {source} holds no arrivals")
    return sorted(arrivals, key=lambda a: a.time_ms)


def named_trace(name: str) -> tuple[list[Arrival], str]:
    """One of the paper's traces by name (``maf-4to32``), and a label saying where it came from.

    With the artifact's folder named (``--reference-dir``), its own trace file is replayed exactly;
    otherwise the trace is drawn from the shipped requests per second of that file: each second
    keeps the file's count, its arrival times are drawn uniformly within it (a Poisson process given
    its count) and the prompts uniformly, with the name's fixed seed (:func:`arrivals_from_counts`).
    A fresh draw from the Azure Functions shape (``--shape --qps-range``, the paper's procedure)
    has the same total but other counts per second (266 of 1to8's 347 seconds differ), and its
    busiest 2 s window can differ by 15 %: the peak ``static`` is planned for.
    """
    from diffserve.reference import NAMED_TRACES, artifact_dir
    from diffserve.reference.shipped import trace_counts

    spec = NAMED_TRACES.get(name)
    if spec is None:
        raise UserError(f"unknown trace name {name!r} (known: {', '.join(NAMED_TRACES)}; or give a trace file)")
    folder = artifact_dir()
    if folder is not None:
        return read_trace(folder / "traces" / spec.artifact_file), f"{name} (the artifact's {spec.artifact_file})"
    arrivals = arrivals_from_counts(trace_counts(name), np.random.default_rng(spec.seed), spec.n_prompts)
    return arrivals, f"{name} (drawn from the shipped per-second counts of the artifact's {spec.artifact_file}, seed {spec.seed})"


def trace_arrivals(spec: str | Path) -> tuple[list[Arrival], str]:
    """``--trace``: a file, or one of the paper's trace names when no such file exists."""
    from diffserve.reference import NAMED_TRACES

    text = str(spec)
    if text in NAMED_TRACES and not Path(text).exists():
        return named_trace(text)
    return read_trace(spec), Path(spec).name


def poisson_arrivals(
    rate_qps: float, duration_s: float, rng: np.random.Generator, *, n_prompts: int = 5000
) -> list[Arrival]:
    """A homogeneous Poisson process at ``rate_qps`` for ``duration_s`` model seconds."""
    if rate_qps <= 0 or duration_s <= 0:
        raise UserError(f"Poisson source needs a positive rate and duration, got rate={rate_qps}, duration={duration_s}")
    return _piecewise_poisson([(0.0, duration_s * 1000.0, rate_qps)], rng, n_prompts)


def read_shape(path: str | Path, column: str | None = None) -> list[float]:
    """The numeric column of a shape file (for example hourly invocation counts).

    ``column`` names the column; by default the last column of a CSV with a header, or the
    only column of a plain list of numbers.
    """
    source = Path(path)
    if not source.is_file():
        raise UserError(f"shape file not found: {source}")
    rows = [r for r in csv.reader(source.read_text(encoding="utf-8").splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"shape file {source} is empty")
    header: list[str] | None = None
    try:
        [float(c) for c in rows[0] if c.strip()]
    except ValueError:
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if column is not None:
        if header is None or column not in header:
            raise UserError(f"shape file {source} has no column {column!r} (columns: {header})")
        col = header.index(column)
    else:
        col = -1
    values = []
    for i, row in enumerate(rows, start=2 if header else 1):
        try:
            values.append(float(row[col]))
        except (ValueError, IndexError):
            raise UserError(f"{source}:{i}: not a number in the shape column: {row}") from None
    if len(values) < 1 or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"shape file {source} needs finite values >= 0")
    return values


def shape_arrivals(
    shape: list[float],
    qps_range: tuple[float, float],
    seconds_per_point: float,
    rng: np.random.Generator,
    *,
    n_prompts: int = 5000,
) -> list[Arrival]:
    """Arrivals that follow ``shape`` rescaled linearly onto ``qps_range``, by the paper's procedure.

    The smallest point maps to the low rate and the largest to the high rate; each point lasts
    ``seconds_per_point`` model seconds (the paper's traces compress one hour of invocations into
    one second). As the artifact's ``traces/maf/shape/2_generate_trace_from_shape.py`` does, each
    point gets ``round(rate x length)`` requests spaced by exponential gaps of mean
    ``length / requests`` (rounded to whole ms; Poisson arrivals within the point); a gap as long as
    the point itself is dropped, and arrivals may run on past the point's end. The count per point
    is therefore the rate's, not a Poisson draw around it, so two draws differ only in where
    requests fall: the artifact's 4to32 trace holds 6,680 requests, and this procedure gives
    6,680 +- 1 on the same shape.
    """
    low, high = qps_range
    if not 0 < low <= high:
        raise UserError(f"QPS range needs 0 < low <= high, got {qps_range}")
    if seconds_per_point <= 0:
        raise UserError(f"seconds per shape point must be positive, got {seconds_per_point}")
    if n_prompts < 1:
        raise UserError(f"the prompt set must hold at least one prompt, got {n_prompts}")
    lo, hi = min(shape), max(shape)
    span = hi - lo
    length_ms = seconds_per_point * 1000.0
    times: list[np.ndarray] = []
    for i, value in enumerate(shape):
        rate = low if span == 0 else low + (high - low) * (value - lo) / span
        requests = int(round(rate * seconds_per_point))
        if requests < 1:
            continue
        gaps = np.rint(rng.exponential(scale=length_ms / requests, size=requests))
        times.append(i * length_ms + np.cumsum(gaps)[gaps < length_ms])
    all_times = np.sort(np.concatenate(times)) if times else np.empty(0)
    prompts = rng.integers(0, n_prompts, size=len(all_times))
    return [Arrival(round(float(t), 3), int(p)) for t, p in zip(all_times, prompts)]


def bursty_arrivals(
    on_qps: float,
    off_qps: float,
    on_s: float,
    off_s: float,
    duration_s: float,
    rng: np.random.Generator,
    *,
    n_prompts: int = 5000,
) -> list[Arrival]:
    """An on/off process: Poisson at ``on_qps`` for ``on_s`` seconds, then ``off_qps`` for ``off_s``."""
    if on_qps <= 0 or off_qps < 0 or on_s <= 0 or off_s < 0 or duration_s <= 0:
        raise UserError(
            f"bursty source needs on_qps > 0, off_qps >= 0, on_s > 0, off_s >= 0, duration > 0; got "
            f"{on_qps}, {off_qps}, {on_s}, {off_s}, {duration_s}"
        )
    segments, t, end = [], 0.0, duration_s * 1000.0
    while t < end:
        for length_s, rate in ((on_s, on_qps), (off_s, off_qps)):
            stop = min(end, t + length_s * 1000.0)
            if stop > t:
                segments.append((t, stop, rate))
            t = stop
    return _piecewise_poisson(segments, rng, n_prompts)


def _piecewise_poisson(
    segments: list[tuple[float, float, float]], rng: np.random.Generator, n_prompts: int
) -> list[Arrival]:
    """Poisson arrivals with a rate constant on each ``(start_ms, end_ms, qps)`` segment.

    The count of each segment is Poisson and its times uniform, which is the same process as
    exponential gaps but vectorised and exact at segment edges.
    """
    if n_prompts < 1:
        raise UserError(f"the prompt set must hold at least one prompt, got {n_prompts}")
    times: list[np.ndarray] = []
    for start, end, rate in segments:
        if rate <= 0 or end <= start:
            continue
        count = rng.poisson(rate * (end - start) / 1000.0)
        times.append(np.sort(rng.uniform(start, end, size=count)))
    all_times = np.concatenate(times) if times else np.empty(0)
    prompts = rng.integers(0, n_prompts, size=len(all_times))
    return [Arrival(round(float(t), 3), int(p)) for t, p in zip(all_times, prompts)]


def bound(arrivals: list[Arrival], *, duration_s: float | None = None, max_requests: int | None = None) -> list[Arrival]:
    """The arrivals within the first ``duration_s`` model seconds, at most ``max_requests`` of them."""
    out = arrivals
    if duration_s is not None:
        if duration_s <= 0:
            raise UserError(f"duration must be positive, got {duration_s}")
        out = [a for a in out if a.time_ms < duration_s * 1000.0]
    if max_requests is not None:
        if max_requests < 1:
            raise UserError(f"max requests must be at least 1, got {max_requests}")
        out = out[:max_requests]
    return out


#: How ``bench compare`` treats a trace file across seeds (see :func:`resample_within_seconds`).
ARRIVAL_MODES = ("resample", "resample-times", "replay")


def arrivals_from_counts(counts: "np.ndarray | list[int]", rng: np.random.Generator, n_prompts: int) -> list[Arrival]:
    """``counts[i]`` arrivals in model second ``i``, each uniform within it (a Poisson process given
    its count), with prompts drawn uniformly from ``n_prompts``."""
    if n_prompts < 1:
        raise UserError(f"the prompt set must hold at least one prompt, got {n_prompts}")
    times = _times_within_seconds(counts, rng)
    return [Arrival(float(t), int(p)) for t, p in zip(times, rng.integers(0, n_prompts, size=len(times)))]


def _times_within_seconds(counts: "np.ndarray | list[int]", rng: np.random.Generator) -> np.ndarray:
    """Sorted arrival times (ms): ``counts[i]`` of them uniform within second ``i``."""
    starts = np.repeat(np.arange(len(counts), dtype=float), np.asarray(counts, dtype=int))
    return np.sort((starts + rng.random(len(starts))) * 1000.0)


def resample_within_seconds(arrivals: list[Arrival], rng: np.random.Generator, n_prompts: int | None = None) -> list[Arrival]:
    """The trace's per-second counts, with each second's arrivals redrawn as a Poisson process.

    Given its count ``n``, a Poisson process in one second places its ``n`` arrivals uniformly at
    random: so each second keeps exactly the trace's count (the demand every planner and the
    oracle see, :func:`demand_per_second`, is unchanged) while the times within it vary by seed.
    This is the arrival noise that replaying the file's exact times on every seed leaves out of
    a comparison's spread.

    With ``n_prompts``, each request's prompt is redrawn too, uniformly from that many (the paper's
    traces drew theirs so): which prompts a trace happened to hold is the same kind of noise as
    where its requests fell, and the discriminator's draws follow the prompts. Two traces with
    the same per-second counts then give the same requests for a seed (the shipped named traces
    and the artifact's files do: :func:`named_trace`). Without it the prompt indices keep the
    file's order.
    """
    if not arrivals:
        return []
    counts = demand_per_second(arrivals)
    if n_prompts is not None:
        return arrivals_from_counts(counts, rng, n_prompts)
    times = _times_within_seconds(counts, rng)
    ordered = sorted(arrivals, key=lambda a: a.time_ms)
    return [Arrival(float(t), a.prompt_index) for t, a in zip(times, ordered)]


def demand_per_second(arrivals: list[Arrival], n_seconds: int | None = None) -> np.ndarray:
    """Arrivals counted per model second: the demand timeline every report shares."""
    if not arrivals:
        return np.zeros(n_seconds or 0, dtype=int)
    secs = np.floor(np.array([a.time_ms for a in arrivals]) / 1000.0).astype(int)
    size = max(int(secs.max()) + 1, n_seconds or 0)
    return np.bincount(secs, minlength=size)


def window_rates(arrivals: list[Arrival], window_s: float) -> np.ndarray:
    """Mean arrival rate (qps) in consecutive windows of ``window_s`` model seconds."""
    if not arrivals:
        return np.zeros(0)
    times = np.array([a.time_ms for a in arrivals]) / 1000.0
    n = math.floor(times.max() / window_s) + 1
    counts = np.bincount(np.floor(times / window_s).astype(int), minlength=n)
    return counts / window_s
