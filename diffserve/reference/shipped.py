"""The paper's reference scenario as shipped inside diffserve (``diffserve/data/reference/``).

The figures are transcribed from the DiffServe artifact by ``scripts/make_reference_data.py``;
each file names its source in its header. None of them is one of the artifact's raw files: the
latencies, FID table and SLOs are the published figures; each discriminator is kept as the
empirical CDF of its per-prompt confidences at the artifact's 201 thresholds (the exact f(t)
the artifact's score files give, nothing finer); each trace is kept as its requests per second
(the histogram at one second: :mod:`diffserve.evaluation.sources` draws the arrival times within
each second and the prompts again), beside the Azure Functions shape they were drawn from;
DiffusionDB's first 5,000 prompts are CC0.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import yaml

from diffserve.errors import UserError

PAPER = "DiffServe: Efficiently Serving Text-to-Image Diffusion Models with Query-Aware Model Scaling (MLSys 2025, arXiv 2411.15381)"
ARTIFACT_REPO = "https://github.com/qizhengyang98/DiffServe"
ARTIFACT_COMMIT = "cfe793afa283ab97c41c7b911771d5fbe15dcead"
ARTIFACT_DATE = "March 2025"
CITATION_HEADER = [
    f"# Source: {PAPER};",
    f"#   artifact {ARTIFACT_REPO}, commit {ARTIFACT_COMMIT[:12]} ({ARTIFACT_DATE});",
    "#   facts published by the paper's authors, not measured by diffserve.",
]

#: package data files, by what they hold
DATA = {
    "latency": "latency_a100.yaml",
    "quality": "fid_vs_light_fraction.yaml",
    "slo": "slo.yaml",
    "deferral": "deferral_cdf.yaml",
    "shape": "azure_functions_hourly.yaml",
    "trace_counts": "trace_counts.yaml",
}
PROMPTS_FILE = "diffusiondb_first_5k.txt"
#: the artifact's per-image score files, by the key the deferral CDF is stored under
SCORE_FILES = {"sdturbo": "dist_sdturbo.txt", "sdxs": "dist_sdxs.txt"}
#: the artifact's threshold grid, t = 0, 0.005, ..., 1
DEFERRAL_GRID_POINTS = 201
LOCATION = "diffserve/data/reference"


def _text(name: str) -> str:
    try:
        return resources.files("diffserve").joinpath("data", "reference", name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"diffserve's shipped reference data {LOCATION}/{name} is missing: reinstall diffserve") from None


@functools.lru_cache(maxsize=None)
def _yaml(key: str) -> dict:
    data = yaml.safe_load(_text(DATA[key]))
    if not isinstance(data, dict):
        raise UserError(f"diffserve's shipped reference data {LOCATION}/{DATA[key]} is damaged: reinstall diffserve")
    return data


def latency() -> dict:
    """``{"device", "accel", "models": {name: {"file", "label", "batches": {size: [median_ms, p90_ms]}}}}``."""
    return _yaml("latency")


def quality_columns() -> tuple[list[float], dict[str, list[float]]]:
    """The light fractions and each cascade's FID at them (columns named as in the artifact's CSV)."""
    data = _yaml("quality")
    return list(data["light_fraction"]), {k: list(v) for k, v in data["columns"].items()}


def slo_ms(app: str) -> float:
    """The latency SLO of an app file of the artifact, by its stem (``sdturbo_sdv15``)."""
    table = _yaml("slo")["slo_ms"]
    if app not in table:
        raise UserError(f"no shipped SLO for {app!r} (known: {', '.join(table)})")
    return float(table[app])


def deferral(key: str) -> tuple[np.ndarray, int]:
    """f(t) at the 201 thresholds of the score file ``key`` (see SCORE_FILES), and its prompt count."""
    data = _yaml("deferral")
    if data["grid_points"] != DEFERRAL_GRID_POINTS:
        raise UserError(f"{LOCATION}/{DATA['deferral']} holds {data['grid_points']} thresholds, not {DEFERRAL_GRID_POINTS}")
    curve = data["curves"][key]
    below = np.asarray(curve["below"], dtype=np.int64)
    prompts = int(curve["prompts"])
    if len(below) != DEFERRAL_GRID_POINTS or below[0] != 0 or below[-1] > prompts or np.any(np.diff(below) < 0):
        raise UserError(f"{LOCATION}/{DATA['deferral']}: the curve {key!r} is not a CDF over {DEFERRAL_GRID_POINTS} thresholds")
    # count / n is the float np.mean of the same boolean mask gives: f(t) equals the artifact's bit for bit
    return below / prompts, prompts


def published_sdturbo() -> list[tuple[float, float]]:
    """The artifact's own 21-point f(t) list for SD-Turbo -> SD v1.5 (three decimals)."""
    pub = _yaml("deferral")["published_sdturbo"]
    return list(zip(pub["t"], pub["f_t"]))


def hourly_shape() -> list[float]:
    """The 347 hourly Azure Functions invocation counts the paper's traces follow."""
    return [float(v) for v in _yaml("shape")["invocations"]]


def trace_counts(name: str) -> list[int]:
    """Requests in each second of the paper's trace ``name`` (``maf-4to32``)."""
    traces = _yaml("trace_counts")["traces"]
    if name not in traces:
        raise UserError(f"no shipped per-second counts for the trace {name!r} (known: {', '.join(traces)})")
    counts = [int(c) for c in traces[name]["per_second"]]
    if sum(counts) != int(traces[name]["requests"]) or min(counts, default=0) < 0:
        raise UserError(f"diffserve's shipped reference data {LOCATION}/{DATA['trace_counts']} is damaged: reinstall diffserve")
    return counts


def diffusiondb_lines() -> list[str]:
    """The 5,000 prompt lines (one is empty in the source too), without the licence header."""
    lines = _text(PROMPTS_FILE).split("\n")
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    body = lines[start:]
    return body[:-1] if body and body[-1] == "" else body
