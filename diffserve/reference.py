"""The DiffServe paper's published figures, transcribed, as a ready-made profile and cascade.

Source: the artifact of "DiffServe: Efficiently Serving Text-to-Image Diffusion Models with
Query-Aware Model Scaling" (MLSys 2025, arXiv 2411.15381), repository qizhengyang98/DiffServe,
March 2025: ``profiles/stable_diffusion_runtimes_*.csv`` (A100-80GB batch latencies),
``discriminator/f_t_sdturbo_sdv15.csv`` (deferral curve) and ``quality/fid_vs_light_fraction.csv``
(MS-COCO FID of the cascade's output against the fraction of queries answered by the light model).

These are facts measured by the paper's authors, not by diffserve. They let the planner, the
emulated backend and the benchmarks replay the paper's 16 x A100 testbed on any machine.
"""

from __future__ import annotations

import datetime as _dt

from diffserve.schemas import (
    BatchProfile,
    CascadeFile,
    CascadePair,
    DiscriminatorRef,
    ModelProfile,
    ProfileFile,
    interpolate,
)

CITATION = "DiffServe artifact (arXiv 2411.15381, MLSys 2025), qizhengyang98/DiffServe, A100-80GB"
_PUBLISHED = _dt.datetime(2025, 3, 1, tzinfo=_dt.timezone.utc)

BATCH_SIZES = (1, 2, 4, 8, 16, 32)

#: Median batch latency in ms on one A100-80GB; ``None`` marks a batch the artifact lists as infeasible.
A100_LATENCY_MS: dict[str, tuple[float | None, ...]] = {
    "sd-turbo": (100, 150, 220, 410, 770, 1560),
    "sdxs": (50, 60, 80, 130, 240, 480),
    "sd-v1.5": (1780, 2160, 3680, 6790, 12880, 25350),
    "sdxl-lightning": (550, 980, 1850, 3580, 7100, None),
    "sdxl": (6100, 10650, 20920, 40230, 79110, None),
}

#: Hugging Face ids of the models the figures were measured on (for the real backend).
HF_IDS = {
    "sd-turbo": "stabilityai/sd-turbo",
    "sdxs": "IDKiro/sdxs-512-0.9",
    "sd-v1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl-lightning": "ByteDance/SDXL-Lightning",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}

#: FID of each model alone on MS-COCO.
FID_ALONE = {"sd-v1.5": 18.55, "sd-turbo": 22.77, "sdxs": 24.86, "sdxl": 23.31, "sdxl-lightning": 33.27}

#: Deferral curve of SD-Turbo -> SD v1.5: (threshold t, fraction of queries sent to the heavy model).
F_T_SDTURBO_SDV15 = (
    (0.00, 0.000), (0.05, 0.360), (0.10, 0.449), (0.15, 0.514), (0.20, 0.582), (0.25, 0.690),
    (0.30, 0.788), (0.35, 0.837), (0.40, 0.878), (0.45, 0.922), (0.50, 0.993), (0.55, 0.999),
    (0.60, 1.000), (0.65, 1.000), (0.70, 1.000), (0.75, 1.000), (0.80, 1.000), (0.85, 1.000),
    (0.90, 1.000), (0.95, 1.000), (1.00, 1.000),
)

#: FID of the cascade's output against the fraction of queries answered by the light model.
LIGHT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FID_VS_LIGHT_FRACTION = {
    ("sd-turbo", "sd-v1.5"): (18.55, 17.85, 17.33, 16.98, 16.79, 16.95, 17.26, 17.95, 18.86, 20.17, 22.77),
    ("sdxs", "sd-v1.5"): (18.55, 17.68, 17.08, 16.97, 17.13, 17.58, 18.21, 19.23, 20.54, 22.34, 24.86),
    ("sdxl-lightning", "sdxl"): (23.31, 23.14, 23.27, 23.67, 24.42, 25.33, 26.34, 27.53, 28.86, 31.01, 33.27),
}

#: Latency SLO of each cascade in the artifact's ``apps/*.json``.
SLO_MS = {("sd-turbo", "sd-v1.5"): 5000, ("sdxs", "sd-v1.5"): 5000, ("sdxl-lightning", "sdxl"): 15000}

#: Threshold grid of the shipped cascade: 201 points, the published curve interpolated linearly.
GRID_POINTS = 201


def reference_profile() -> ProfileFile:
    """The A100 latency profile of the five models, as a :class:`ProfileFile`."""
    models = {}
    for name, latencies in A100_LATENCY_MS.items():
        batches = []
        for size, ms in zip(BATCH_SIZES, latencies):
            if ms is None:
                batches.append(BatchProfile(batch_size=size, feasible=False, reason="infeasible in the published profile"))
            else:
                batches.append(
                    BatchProfile(
                        batch_size=size, median_ms=ms, p90_ms=ms, p99_ms=ms, throughput_ips=round(size * 1000 / ms, 3)
                    )
                )
        models[name] = ModelProfile(name=name, source=f"reference:{HF_IDS[name]}", batches=batches)
    return ProfileFile(
        created=_PUBLISHED,
        device="NVIDIA A100-SXM4-80GB",
        device_type="cuda",
        source=CITATION,
        models=models,
    )


def reference_cascade() -> CascadeFile:
    """SD-Turbo -> SD v1.5 with the published deferral curve and FID-vs-light-fraction figures.

    q(t) = FID(light fraction = 1 - f(t)), both curves interpolated linearly between the
    published points. The discriminator is ``replayed``: no weights ship, the emulated backend
    draws confidences whose distribution reproduces f(t).
    """
    ts, fs = zip(*F_T_SDTURBO_SDV15)
    fids = FID_VS_LIGHT_FRACTION[("sd-turbo", "sd-v1.5")]
    grid = [round(i / (GRID_POINTS - 1), 6) for i in range(GRID_POINTS)]
    f_t = [round(interpolate(t, ts, fs), 6) for t in grid]
    q_t = [round(interpolate(1.0 - f, LIGHT_FRACTIONS, fids), 4) for f in f_t]
    pair = CascadePair(
        light="sd-turbo",
        heavy="sd-v1.5",
        recommended=True,
        metric="fid",
        grid=grid,
        f_t=f_t,
        q_t=q_t,
        q_light=FID_ALONE["sd-turbo"],
        q_heavy=FID_ALONE["sd-v1.5"],
        discriminator=DiscriminatorRef(kind="replayed", feature_model="EfficientNet-V2-S (paper)"),
        latency_ms={m: A100_LATENCY_MS[m][0] for m in ("sd-turbo", "sd-v1.5")},
        n_eval_prompts=5000,
        source=CITATION,
    )
    return CascadeFile(created=_PUBLISHED, source=CITATION, prompts="MS-COCO (paper)", pairs=[pair])
