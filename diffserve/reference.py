"""The DiffServe paper's testbed, built at run time from the artifact's own files.

Source: the artifact of "DiffServe: Efficiently Serving Text-to-Image Diffusion Models with
Query-Aware Model Scaling" (MLSys 2025, arXiv 2411.15381), repository qizhengyang98/DiffServe,
March 2025. Its files are read where they lie (:mod:`diffserve.reference_dir`), never copied:

* ``profiles/stable_diffusion_runtimes_*.csv``: A100-80GB batch latencies of the five models, read
  by the same importer as ``diffserve profile import-csv``;
* ``discriminator/dist_{sdturbo,sdxs}.txt``: per-image discriminator outputs, 4 images per prompt;
* ``quality/fid_vs_light_fraction.csv``: MS-COCO FID of each cascade's output against the
  fraction of queries answered by the light model;
* ``apps/*.json``: each cascade's latency SLO.

Every reference cascade is built by :mod:`diffserve.cascade_builder.from_scores`, the code behind
``diffserve build-cascade --from-scores``. f(t) is the empirical CDF of 1 - the mean of each
prompt's 4 scores, evaluated exactly at each of the artifact's 201 thresholds; it matches the
published 21-point ``f_t_sdturbo_sdv15.csv`` within 0.001 (the list has three decimals; the
largest gap is at t = 0.15, 0.5134 from the scores against 0.514 published).

**SDXL-Lightning -> SDXL replays SDXS scores.** The artifact's SDXL-Lightning score file is
byte-identical to ``dist_sdxs.txt``: the paper ran that cascade with the SDXS discriminator
outputs, and so does ``reference-sdxl``. Its f(t) is therefore SDXS's, not a measurement of
SDXL-Lightning images.

These are facts measured by the paper's authors, not by diffserve. They let the planner, the
emulated backend and the benchmarks replay the paper's 16 x A100 testbed on any machine.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from dataclasses import dataclass

import numpy as np

from diffserve.cascade_builder.from_scores import QualityTable, pair_from_scores, read_confidences, read_quality_table
from diffserve.errors import UserError
from diffserve.profiler.csv_import import import_csvs
from diffserve.reference_dir import reference_file
from diffserve.schemas import CascadeFile, ProfileFile

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
    scores: str  # file in discriminator/
    column: str  # column of the quality table
    app: str  # file in apps/, holds the SLO
    note: str = ""


PAIRS = {
    "sdturbo": ReferencePair("sd-turbo", "sd-v1.5", "dist_sdturbo.txt", "sdturbo_to_sdv15", "sdturbo_sdv15.json"),
    "sdxs": ReferencePair("sdxs", "sd-v1.5", "dist_sdxs.txt", "sdxs_to_sdv15", "sdxs_sdv15.json"),
    "sdxl": ReferencePair(
        "sdxl-lightning", "sdxl", "dist_sdxs.txt", "sdxlltn_to_sdxl", "sdxlltn_sdxl.json",
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


def load_time_estimate_s(model: str) -> float:
    return round(LOAD_FIXED_S + WEIGHTS_GB[model] / LOAD_GB_PER_S, 2)


def reference_profile() -> ProfileFile:
    """The A100 latency profile of the five models, imported from the artifact's CSVs."""
    paths = [reference_file("profiles", name) for name in PROFILE_FILES]
    profile = import_csvs(paths)
    for name, model in profile.models.items():
        model.source = f"reference:{HF_IDS[name]}"
        model.load_time_s = load_time_estimate_s(name)
    profile.created = _PUBLISHED
    profile.source = f"{CITATION}; {profile.source}; {LOAD_TIME_NOTE}"
    return profile


@functools.lru_cache(maxsize=None)
def _confidences(scores: str) -> np.ndarray:
    conf = read_confidences(reference_file("discriminator", scores))
    conf.flags.writeable = False
    return conf


@functools.lru_cache(maxsize=None)
def _table(column: str) -> QualityTable:
    return read_quality_table(reference_file("quality", QUALITY_TABLE), column=column, metric="fid")


def slo_ms(key: str) -> float:
    """A pair's latency SLO as the artifact's ``apps/*.json`` sets it."""
    app = json.loads(reference_file("apps", PAIRS[key].app).read_text(encoding="utf-8"))
    return float(app["latencySLOInMSec"])


def reference_cascade(name: str = "reference") -> CascadeFile:
    """A reference cascade by its ``--cascade`` name, built from the artifact's score files."""
    if name not in CASCADES:
        raise UserError(f"unknown reference cascade {name!r} (known: {', '.join(CASCADES)})")
    profile = reference_profile()
    pairs = []
    for i, key in enumerate(CASCADES[name]):
        spec = PAIRS[key]
        source = f"{CITATION}: f(t) from discriminator/{spec.scores}, Q(t) from quality/{QUALITY_TABLE} ({spec.column})"
        if spec.note:
            source += f"; {spec.note}"
        pair = pair_from_scores(
            _confidences(spec.scores), _table(spec.column), light=spec.light, heavy=spec.heavy, profile=profile,
            source=source, recommended=i == 0,
        )
        pair.discriminator.feature_model = "EfficientNet-V2-S (paper)"
        pairs.append(pair)
    return CascadeFile(created=_PUBLISHED, source=CITATION, prompts="the artifact's 5,000 scored prompts; FID on MS-COCO (paper)", pairs=pairs)
