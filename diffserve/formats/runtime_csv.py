"""Read the DiffServe artifact's runtime CSVs into a profile.

Format (``profiles/stable_diffusion_runtimes_*.csv`` in qizhengyang98/DiffServe)::

    ,Model,Accel,batchsize,avg_runtime,50th_pct,90th_pct,95th_pct
    0,sdturbo,onnxruntime_gpu_ampere,1,100,100,100,100

Each file holds the light model under the label ``sdturbo`` and the heavy one under ``sdv15``,
whatever the cascade really is, and repeats the rows for several ``Accel`` values: read one.
100000 ms marks an infeasible batch. The file name's suffix tells the real names.
"""

from __future__ import annotations

import csv
from pathlib import Path

from diffserve.errors import UserError
from diffserve.schemas import BatchProfile, ModelProfile, ProfileFile

INFEASIBLE_MS = 100_000.0
LABELS = ("sdturbo", "sdv15")
_COLUMNS = {"Model", "Accel", "batchsize", "avg_runtime", "50th_pct", "90th_pct", "95th_pct"}
#: Real (light, heavy) names per artifact file suffix, matching the reference profile's names.
NAMES_BY_SUFFIX = {
    "sdturbo": ("sd-turbo", "sd-v1.5"),
    "sdxs": ("sdxs", "sd-v1.5"),
    "sdxlltn": ("sdxl-lightning", "sdxl"),
}
PREFERRED_ACCEL = "onnxruntime_gpu_ampere"  # the A100 rows
ARTIFACT_DEVICE = "NVIDIA A100-SXM4-80GB"


def default_names(path: Path) -> tuple[str, str] | None:
    suffix = path.stem.rsplit("_", 1)[-1]
    return NAMES_BY_SUFFIX.get(suffix)


def batch_profile(size: int, median_ms: float, p90_ms: float) -> BatchProfile:
    """One batch as the artifact states it: ``INFEASIBLE_MS`` or more marks an infeasible batch.

    The artifact publishes p95, not p99; p99 stays empty rather than mislabelled.
    """
    if median_ms >= INFEASIBLE_MS:
        return BatchProfile(batch_size=size, feasible=False, reason=f"infeasible in the artifact ({median_ms:g} ms)")
    return BatchProfile(batch_size=size, median_ms=median_ms, p90_ms=p90_ms, throughput_ips=round(size * 1000 / median_ms, 3))


def read_runtime_csv(path: str | Path, *, accel: str | None = None) -> tuple[str, dict[str, list[BatchProfile]]]:
    """Batches per label (``sdturbo``/``sdv15``) of one Accel; returns the Accel used too."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = _COLUMNS - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path} is not a DiffServe runtime CSV: missing column(s) {', '.join(sorted(missing))}")
        rows = list(reader)
    accels = list(dict.fromkeys(r["Accel"] for r in rows))
    if not accels:
        raise UserError(f"{path} has no rows")
    chosen = accel or (PREFERRED_ACCEL if PREFERRED_ACCEL in accels else accels[0])
    if chosen not in accels:
        raise UserError(f"accel {chosen!r} is not in {path} (it has: {', '.join(accels)})")
    out: dict[str, dict[int, BatchProfile]] = {}
    for line, row in enumerate(rows, start=2):
        if row["Accel"] != chosen:
            continue
        try:
            size = int(row["batchsize"])
            median, p90, p95 = (float(row[k]) for k in ("50th_pct", "90th_pct", "95th_pct"))
        except ValueError:
            raise UserError(f"{path} line {line}: batchsize and latencies must be numbers") from None
        batch = batch_profile(size, median, p90)
        per_label = out.setdefault(row["Model"], {})
        if size in per_label:
            raise UserError(f"{path} line {line}: batch size {size} of {row['Model']} appears twice for accel {chosen}")
        per_label[size] = batch
    return chosen, {label: sorted(b.values(), key=lambda x: x.batch_size) for label, b in out.items()}


def import_csvs(
    paths: list[Path], *, accel: str | None = None, light: str | None = None, heavy: str | None = None,
    device: str = ARTIFACT_DEVICE,
) -> ProfileFile:
    """One profile from one or more artifact CSVs; a model in two files must agree."""
    models: dict[str, ModelProfile] = {}
    used: set[str] = set()
    for path in paths:
        path = Path(path)
        chosen, batches = read_runtime_csv(path, accel=accel)
        used.add(chosen)
        defaults = default_names(path)
        if defaults is None and (light is None or heavy is None):
            raise UserError(
                f"cannot tell which models {path.name} holds; pass --light and --heavy "
                f"(known file suffixes: {', '.join(NAMES_BY_SUFFIX)})"
            )
        names = {"sdturbo": light or defaults[0], "sdv15": heavy or defaults[1]}  # type: ignore[index]
        for label, rows in batches.items():
            if label not in names:
                raise UserError(f"{path}: unknown model label {label!r}; the artifact uses {', '.join(LABELS)}")
            name = names[label]
            model = ModelProfile(name=name, source=f"artifact:{path.name}:{label}", batches=rows)
            if name in models and models[name].batches != model.batches:
                raise UserError(f"{name} has different latencies in {models[name].source} and {model.source}")
            models.setdefault(name, model)
    return ProfileFile(
        device=device,
        device_type="cuda",
        source=f"imported from the DiffServe artifact ({', '.join(p.name for p in map(Path, paths))}; accel {', '.join(sorted(used))})",
        models=models,
    )
