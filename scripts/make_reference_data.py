"""Transcribe the DiffServe artifact's published figures into diffserve's package data.

    python scripts/make_reference_data.py /path/to/diffserve-artifact

writes ``diffserve/data/reference/``: the A100 latencies, the FID table, the SLOs, each score
file's deferral curve as an empirical CDF (counts of prompts below each of the artifact's 201
thresholds, not the per-prompt scores), the Azure Functions hourly shape, each maf trace's
requests per second (a histogram: no arrival time or prompt of the trace files) and DiffusionDB's
first 5,000 prompts (CC0). Each file states where its figures come from. Rerunning it on the same
artifact rewrites the same bytes; ``tests/test_reference_data.py`` checks that where the artifact
is present. The raw score files and trace files are never copied.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffserve.evaluation.sources import demand_per_second, read_trace  # noqa: E402
from diffserve.fileio import atomic_write_text  # noqa: E402
from diffserve.formats.runtime_csv import NAMES_BY_SUFFIX, PREFERRED_ACCEL, read_runtime_csv  # noqa: E402
from diffserve.formats.scores import read_confidences, threshold_grid  # noqa: E402
from diffserve.reference.shipped import (  # noqa: E402
    CITATION_HEADER,
    DATA,
    DEFERRAL_GRID_POINTS,
    PROMPTS_FILE,
    SCORE_FILES,
)
from diffserve.reference.traces import NAMED_TRACES  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "diffserve" / "data" / "reference"


def _header(what: str, files: list[str]) -> str:
    lines = [f"# {what}", *CITATION_HEADER, f"#   from (paths in the artifact's data folder): {', '.join(files)}", "# Transcribed by scripts/make_reference_data.py; do not edit by hand."]
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def latency(art: Path) -> str:
    files = [f"stable_diffusion_runtimes_{s}.csv" for s in NAMES_BY_SUFFIX]
    out = [_header("Batch latency (ms) of the five models on one A100-80GB (the artifact's onnxruntime_gpu_ampere rows).", [f"profiles/{f}" for f in files])]
    out.append("device: NVIDIA A100-SXM4-80GB\n")
    out.append(f"accel: {PREFERRED_ACCEL}\n")
    out.append("# per batch size: [median_ms, p90_ms]; 100000 ms marks a batch the artifact lists as infeasible\n")
    out.append("models:\n")
    seen: set[str] = set()
    for suffix, names in NAMES_BY_SUFFIX.items():
        accel, batches = read_runtime_csv(art / "profiles" / f"stable_diffusion_runtimes_{suffix}.csv")
        assert accel == PREFERRED_ACCEL
        for label, name in zip(("sdturbo", "sdv15"), names):
            if name in seen:
                continue
            seen.add(name)
            out.append(f"  {name}:\n    file: stable_diffusion_runtimes_{suffix}.csv\n    label: {label}\n    batches:\n")
            for b in batches[label]:
                median, p90 = (b.median_ms, b.p90_ms) if b.feasible else (100000, 100000)
                out.append(f"      {b.batch_size}: [{_num(median)}, {_num(p90)}]\n")
    return "".join(out)


def quality(art: Path) -> str:
    with (art / "quality" / "fid_vs_light_fraction.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in rows[0] if c != "light_fraction"]
    out = [_header("FID (MS-COCO) of each cascade's output against the fraction of queries the light model answers.", ["quality/fid_vs_light_fraction.csv"])]
    out.append("metric: fid\n")
    out.append(f"light_fraction: [{', '.join(_num(float(r['light_fraction'])) for r in rows)}]\n")
    out.append("columns:\n")
    for c in columns:
        out.append(f"  {c}: [{', '.join(_num(float(r[c])) for r in rows)}]\n")
    return "".join(out)


def slos(art: Path) -> str:
    out = [_header("Latency SLO of each cascade (latencySLOInMSec of the artifact's app files).", [f"apps/{p.name}" for p in sorted((art / "apps").glob("*.json"))])]
    out.append("slo_ms:\n")
    for path in sorted((art / "apps").glob("*.json")):
        out.append(f"  {path.stem}: {_num(json.loads(path.read_text(encoding='utf-8'))['latencySLOInMSec'])}\n")
    return "".join(out)


def deferral(art: Path) -> str:
    grid = threshold_grid(DEFERRAL_GRID_POINTS)
    out = [_header(
        "Deferral curve f(t) of each discriminator score file, as the empirical CDF of its per-prompt confidences.",
        [f"discriminator/{f}" for f in [*SCORE_FILES.values(), "f_t_sdturbo_sdv15.csv"]],
    )]
    out.append("# A prompt's confidence is 1 - the mean P(fake) of its 4 light images; below[i] counts the prompts whose\n")
    out.append(f"# confidence is < t_i, at the artifact's {DEFERRAL_GRID_POINTS} thresholds t_i = i / {DEFERRAL_GRID_POINTS - 1}. f(t_i) = below[i] / prompts.\n")
    out.append(f"grid_points: {DEFERRAL_GRID_POINTS}\n")
    out.append("curves:\n")
    for key, name in SCORE_FILES.items():
        conf = read_confidences(art / "discriminator" / name)
        below = (conf[None, :] < grid[:, None]).sum(axis=1)
        out.append(f"  {key}:\n    prompts: {len(conf)}\n    below: [{', '.join(str(int(v)) for v in below)}]\n")
    with (art / "discriminator" / "f_t_sdturbo_sdv15.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out.append("# the artifact's own 21-point list for SD-Turbo -> SD v1.5 (three decimals), kept to check the CDF against\n")
    out.append("published_sdturbo:\n")
    out.append(f"  t: [{', '.join(_num(float(r['t'])) for r in rows)}]\n")
    out.append(f"  f_t: [{', '.join(_num(float(r['f_t'])) for r in rows)}]\n")
    return "".join(out)


def shape(art: Path) -> str:
    with (art / "traces" / "azure_functions_hourly_invocations.csv").open(newline="", encoding="utf-8") as handle:
        values = [float(r["invocations"]) for r in csv.DictReader(handle)]
    out = [_header(
        "Azure Functions hourly invocation counts (347 hours) that the paper's maf traces were shaped from.",
        ["traces/azure_functions_hourly_invocations.csv"],
    )]
    out.append(f"hours: {len(values)}\n")
    out.append("invocations:\n")
    out.extend(f"  - {v!r}\n" for v in values)
    return "".join(out)


def trace_counts(art: Path) -> str:
    files = [f"traces/{t.artifact_file}" for t in NAMED_TRACES.values()]
    out = [_header(
        "Requests per second of the paper's three maf traces: each trace file's histogram at one second, "
        "nothing finer (no arrival time, no prompt index).", files,
    )]
    out.append("# The seconds are model seconds from the trace's start; a request at t ms counts in second floor(t / 1000).\n")
    out.append("traces:\n")
    for name, spec in NAMED_TRACES.items():
        counts = demand_per_second(read_trace(art / "traces" / spec.artifact_file))
        out.append(f"  {name}:\n    requests: {int(counts.sum())}\n    per_second: [{', '.join(str(int(c)) for c in counts)}]\n")
    return "".join(out)


def prompts(art: Path) -> str:
    text = (art / "prompts" / "diffusiondb_first_5k.txt").read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    assert not any(line.startswith("#") for line in lines)
    head = [
        "# DiffusionDB's first 5,000 prompts (poloclub/diffusiondb, 2M subset), one per line, in the order the",
        "# paper's traces index them. DiffusionDB's prompts are released under CC0 1.0 (public domain dedication,",
        "# https://creativecommons.org/publicdomain/zero/1.0/); Wang et al., \"DiffusionDB\", ACL 2023.",
        *CITATION_HEADER,
        "#   from (paths in the artifact's data folder): prompts/diffusiondb_first_5k.txt",
        "# Lines starting with '#' before the first prompt are this header; the prompts follow it verbatim.",
    ]
    return "\n".join(head + lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="the artifact folder (profiles/, discriminator/, quality/, apps/, traces/, prompts/)")
    parser.add_argument("--output", type=Path, default=OUT, help=f"folder to write (default: {OUT})")
    args = parser.parse_args()
    art, out = args.artifact, args.output
    for name, make in (
        (DATA["latency"], latency), (DATA["quality"], quality), (DATA["slo"], slos), (DATA["deferral"], deferral),
        (DATA["shape"], shape), (DATA["trace_counts"], trace_counts), (PROMPTS_FILE, prompts),
    ):
        atomic_write_text(out / name, make(art))
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
