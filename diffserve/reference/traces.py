"""The paper's three request traces, by name: ``maf-1to8``, ``maf-2to16``, ``maf-4to32``.

The paper made each from the Azure Functions hourly shape
(:func:`diffserve.reference.shipped.hourly_shape`) rescaled linearly onto a QPS range, one hour
compressed into one second, with Poisson arrivals within each second and prompt indices drawn
uniformly from DiffusionDB's first 5,000 (``bench --shape --qps-range`` runs that procedure).
diffserve ships each file's requests per second (:func:`diffserve.reference.shipped.trace_counts`),
and :func:`diffserve.evaluation.sources.named_trace` draws the times within each second and the
prompts with a fixed seed, so a name means one trace everywhere, like a file, with the artifact's
demand second by second; the artifact's own trace files replace the draw where
``--reference-dir`` names them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NamedTrace:
    name: str
    qps_range: tuple[float, float]
    paper_workers: int  # the cluster the paper ran this trace on
    artifact_file: str  # traces/<file> in the artifact folder
    seed: int = 0  # fixed, chosen before any result was seen; never tuned
    seconds_per_point: float = 1.0
    n_prompts: int = 5000


NAMED_TRACES = {
    t.name: t
    for t in (
        NamedTrace("maf-1to8", (1.0, 8.0), 4, "maf_trace_1to8qps.txt"),
        NamedTrace("maf-2to16", (2.0, 16.0), 8, "maf_trace_2to16qps.txt"),
        NamedTrace("maf-4to32", (4.0, 32.0), 16, "maf_trace_4to32qps.txt"),
    )
}
