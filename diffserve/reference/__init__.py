"""The DiffServe paper's reference scenario: its A100 profile, three cascades, SLOs, traces, prompts.

Core, below every stage: it imports :mod:`diffserve.formats` and the schemas, never the profiler,
the cascade builder or the server. By default the figures come from the package data shipped with
diffserve; ``--reference-dir DIR`` or ``DIFFSERVE_REFERENCE_DIR`` replays the artifact's own files
instead (:mod:`.locate`). Source: "DiffServe: Efficiently Serving Text-to-Image Diffusion Models
with Query-Aware Model Scaling" (MLSys 2025, arXiv 2411.15381), artifact qizhengyang98/DiffServe.
"""

from diffserve.reference import locate, shipped
from diffserve.reference.locate import ENV_VAR, artifact_dir, use_artifact_dir
from diffserve.reference.scenario import (
    CASCADES,
    CITATION,
    HF_IDS,
    PAIRS,
    diffusiondb_prompt_lines,
    load_time_estimate_s,
    on_source,
    reference_cascade,
    reference_profile,
    slo_ms,
    source_line,
)
from diffserve.reference.traces import NAMED_TRACES, NamedTrace

__all__ = [
    "CASCADES", "CITATION", "ENV_VAR", "HF_IDS", "NAMED_TRACES", "NamedTrace", "PAIRS", "artifact_dir",
    "diffusiondb_prompt_lines", "load_time_estimate_s", "locate", "on_source", "reference_cascade", "reference_profile",
    "shipped", "slo_ms", "source_line", "use_artifact_dir",
]
