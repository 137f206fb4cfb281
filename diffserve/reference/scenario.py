"""The DiffServe paper's testbed as a reference profile and reference cascades.

Two sources give the same scenario:

* **shipped** (the default): the figures transcribed into diffserve's package data
  (:mod:`.shipped`), so a wheel installed anywhere replays the paper's testbed;
* **the artifact's own files**, where ``--reference-dir`` or ``DIFFSERVE_REFERENCE_DIR`` names
  their folder (:mod:`.locate`): the latency CSVs, the per-image score files, the FID table and
  the app files, read as they are.

Both build every pair through :func:`diffserve.formats.pair.pair_from_curve`, and the shipped
f(t) is the artifact's empirical CDF at the same 201 thresholds, so the profile and cascades are
equal field for field apart from their ``source`` line (``tests/test_reference_data.py``).

f(t) is the empirical CDF of 1 - the mean of each prompt's 4 scores; it matches the published
21-point ``f_t_sdturbo_sdv15.csv`` within 0.001 (the list has three decimals; the largest gap is
at t = 0.15, 0.5134 from the scores against 0.514 published).

**SDXL-Lightning -> SDXL replays SDXS scores.** The artifact's SDXL-Lightning score file is
byte-identical to ``dist_sdxs.txt``: the paper ran that cascade with the SDXS discriminator
outputs, and so does ``reference-sdxl``. Its f(t) is therefore SDXS's, not a measurement of
SDXL-Lightning images.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from diffserve.errors import UserError
from diffserve.formats.pair import pair_from_curve, pair_from_scores
from diffserve.formats.runtime_csv import ARTIFACT_DEVICE, batch_profile, import_csvs
from diffserve.formats.scores import QualityTable, quality_table, read_confidences, read_quality_table, threshold_grid
from diffserve.reference import shipped
from diffserve.reference.locate import ENV_VAR, artifact_dir
from diffserve.schemas import CascadeFile, ModelProfile, ProfileFile

CITATION = "DiffServe artifact (arXiv 2411.15381, MLSys 2025), qizhengyang98/DiffServe, A100-80GB"
_PUBLISHED = _dt.datetime(2025, 3, 1, tzinfo=_dt.timezone.utc)

PROFILE_FILES = tuple(f"stable_diffusion_runtimes_{s}.csv" for s in ("sdturbo", "sdxs", "sdxlltn"))
QUALITY_TABLE = "fid_vs_light_fraction.csv"

#: Hugging Face ids of the models the figures were measured on (for the real backend).
HF_IDS = {
    "sd-turbo": "stabilityai/sd-turbo",
    "sdxs": "IDKiro/sdxs-512-0.9",
    "sd-v1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl-lightning": "ByteDance/SDXL-Lightning",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}

#: fp16 weights of each pipeline in GB (UNet + text encoder(s) + VAE), from the parameter counts
#: of the model cards: SD v1.5 0.86 B + 0.12 B + 0.08 B; SD-Turbo (SD 2.1) 0.87 B + 0.35 B + 0.08 B;
#: SDXS-512 0.32 B + 0.12 B + tiny VAE; SDXL and SDXL-Lightning 2.57 B + 0.82 B + 0.08 B.
WEIGHTS_GB = {"sd-turbo": 2.6, "sdxs": 0.9, "sd-v1.5": 2.1, "sdxl-lightning": 6.9, "sdxl": 6.9}
#: The load-time ESTIMATE (the artifact publishes none): fixed pipeline construction plus the fp16
#: weights read from a local NVMe disk and copied to the GPU at an effective 2 GB/s.
LOAD_FIXED_S, LOAD_GB_PER_S = 2.0, 2.0
LOAD_TIME_NOTE = f"load_time_s is an estimate ({LOAD_FIXED_S:g} s + fp16 weights at {LOAD_GB_PER_S:g} GB/s), not measured"


@dataclass(frozen=True)
class ReferencePair:
    light: str
    heavy: str
    scores: str  # key of shipped.SCORE_FILES: the score file in discriminator/
    column: str  # column of the quality table
    app: str  # stem of the file in apps/ that holds the SLO
    note: str = ""


PAIRS = {
    "sdturbo": ReferencePair("sd-turbo", "sd-v1.5", "sdturbo", "sdturbo_to_sdv15", "sdturbo_sdv15"),
    "sdxs": ReferencePair("sdxs", "sd-v1.5", "sdxs", "sdxs_to_sdv15", "sdxs_sdv15"),
    "sdxl": ReferencePair(
        "sdxl-lightning", "sdxl", "sdxs", "sdxlltn_to_sdxl", "sdxlltn_sdxl",
        note="SDXS scores replayed: the artifact's SDXL-Lightning score file is byte-identical to dist_sdxs.txt",
    ),
}

#: The names ``--cascade`` accepts, and the pairs of each (the first is the recommended one).
CASCADES = {
    "reference": ("sdturbo",),
    "reference-sdxs": ("sdxs",),
    "reference-sdxl": ("sdxl",),
    "reference-pool": ("sdturbo", "sdxs"),
}

_listener: Callable[[str], None] | None = None
_announced: set[str] = set()


def on_source(listener: Callable[[str], None] | None) -> None:
    """Call ``listener`` once with each reference source this process reads (the CLI prints it)."""
    global _listener
    _listener = listener


def source_line() -> str:
    """Which figures the reference scenario comes from now, in one line for people."""
    folder = artifact_dir()
    if folder is not None:
        return f"reference data: the DiffServe artifact's own files in {folder} ({ENV_VAR})"
    return (
        f"reference data: the paper's figures shipped with diffserve ({shipped.LOCATION}, from "
        f"qizhengyang98/DiffServe@{shipped.ARTIFACT_COMMIT[:7]}); --reference-dir DIR replays the artifact's own files"
    )


def _announce() -> None:
    line = source_line()
    if _listener is not None and line not in _announced:
        _announced.add(line)
        _listener(line)


def load_time_estimate_s(model: str) -> float:
    return round(LOAD_FIXED_S + WEIGHTS_GB[model] / LOAD_GB_PER_S, 2)


def _shipped_profile() -> ProfileFile:
    data = shipped.latency()
    models = {}
    for name, spec in data["models"].items():
        batches = [batch_profile(int(size), float(m), float(p90)) for size, (m, p90) in spec["batches"].items()]
        models[name] = ModelProfile(name=name, source=f"artifact:{spec['file']}:{spec['label']}", batches=batches)
    files = ", ".join(dict.fromkeys(spec["file"] for spec in data["models"].values()))
    return ProfileFile(
        device=data.get("device", ARTIFACT_DEVICE), device_type="cuda", models=models,
        source=f"shipped with diffserve ({shipped.LOCATION}/{shipped.DATA['latency']}, transcribed from {files}; accel {data['accel']})",
    )


def reference_profile() -> ProfileFile:
    """The A100 latency profile of the five models, from the shipped figures or the artifact's CSVs."""
    _announce()
    folder = artifact_dir()
    profile = import_csvs([folder / "profiles" / name for name in PROFILE_FILES]) if folder else _shipped_profile()
    for name, model in profile.models.items():
        model.source = f"reference:{HF_IDS[name]}"
        model.load_time_s = load_time_estimate_s(name)
    profile.created = _PUBLISHED
    profile.source = f"{CITATION}; {profile.source}; {LOAD_TIME_NOTE}"
    return profile


@functools.lru_cache(maxsize=None)
def _artifact_confidences(path: Path) -> np.ndarray:
    conf = read_confidences(path)
    conf.flags.writeable = False
    return conf


def _table(folder: Path | None, column: str) -> QualityTable:
    if folder is not None:
        return read_quality_table(folder / "quality" / QUALITY_TABLE, column=column, metric="fid")
    fractions, columns = shipped.quality_columns()
    if column not in columns:
        raise UserError(f"the shipped FID table has no column {column!r} (has: {', '.join(columns)})")
    return quality_table(fractions, columns[column], column=column, metric="fid",
                         where=f"{shipped.LOCATION}/{shipped.DATA['quality']}")


def slo_ms(key: str) -> float:
    """A pair's latency SLO as the artifact's ``apps/*.json`` sets it."""
    app = PAIRS[key].app
    folder = artifact_dir()
    if folder is None:
        return shipped.slo_ms(app)
    path = folder / "apps" / f"{app}.json"
    if not path.is_file():
        raise UserError(f"the artifact folder {folder} has no apps/{app}.json")
    return float(json.loads(path.read_text(encoding="utf-8"))["latencySLOInMSec"])


def reference_cascade(name: str = "reference") -> CascadeFile:
    """A reference cascade by its ``--cascade`` name."""
    if name not in CASCADES:
        raise UserError(f"unknown reference cascade {name!r} (known: {', '.join(CASCADES)})")
    profile = reference_profile()
    folder = artifact_dir()
    pairs = []
    for i, key in enumerate(CASCADES[name]):
        spec = PAIRS[key]
        score_file = shipped.SCORE_FILES[spec.scores]
        table = _table(folder, spec.column)
        common = dict(light=spec.light, heavy=spec.heavy, profile=profile, recommended=i == 0)
        if folder is not None:
            source = f"{CITATION}: f(t) from discriminator/{score_file}, Q(t) from quality/{QUALITY_TABLE} ({spec.column})"
            conf = _artifact_confidences(folder / "discriminator" / score_file)
            pair = pair_from_scores(conf, table, grid_points=shipped.DEFERRAL_GRID_POINTS, source=source + _note(spec), **common)
        else:
            source = (f"{CITATION}: f(t) the empirical CDF of discriminator/{score_file}, Q(t) the FID table "
                      f"({spec.column}), shipped with diffserve ({shipped.LOCATION})")
            f_t, n_prompts = shipped.deferral(spec.scores)
            pair = pair_from_curve(threshold_grid(shipped.DEFERRAL_GRID_POINTS), f_t, table, n_eval_prompts=n_prompts,
                                   source=source + _note(spec), **common)
        pair.discriminator.feature_model = "EfficientNet-V2-S (paper)"
        pairs.append(pair)
    return CascadeFile(created=_PUBLISHED, source=CITATION, prompts="the artifact's 5,000 scored prompts; FID on MS-COCO (paper)", pairs=pairs)


def _note(spec: ReferencePair) -> str:
    return f"; {spec.note}" if spec.note else ""


def diffusiondb_prompt_lines() -> list[str]:
    """DiffusionDB's first 5,000 prompt lines (CC0), from the artifact's file or the shipped copy."""
    folder = artifact_dir()
    if folder is None:
        return shipped.diffusiondb_lines()
    path = folder / "prompts" / "diffusiondb_first_5k.txt"
    if not path.is_file():
        raise UserError(f"the artifact folder {folder} has no prompts/diffusiondb_first_5k.txt")
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines
