"""Load the pipeline's files by path, or the paper's reference data by name.

Every CLI command takes ``--profile``/``--cascade`` through these functions so the same words
work everywhere and bad paths fail the same way. ``reference`` is the paper's A100 profile and its
SD-Turbo -> SD v1.5 cascade; ``reference-sdxs``, ``reference-sdxl`` and ``reference-pool`` are the
paper's other cascades (see :mod:`diffserve.reference`): the figures shipped with diffserve, or
the artifact's own files where ``--reference-dir``/``DIFFSERVE_REFERENCE_DIR`` names them.
"""

from __future__ import annotations

from pathlib import Path

from diffserve.fileio import read_model
from diffserve.schemas import CascadeFile, PlanFile, ProfileFile

REFERENCE = "reference"
REFERENCE_CASCADES = ("reference", "reference-sdxs", "reference-sdxl", "reference-pool")


def is_reference(spec: str | Path | None) -> bool:
    """Whether a ``--profile``/``--cascade`` value names reference data rather than a file."""
    return spec is not None and str(spec) in REFERENCE_CASCADES


def load_profile(spec: str | Path) -> ProfileFile:
    if str(spec) == REFERENCE:
        from diffserve.reference import reference_profile

        return reference_profile()
    return read_model(spec, ProfileFile, what="profile")


def load_cascade(spec: str | Path) -> CascadeFile:
    if is_reference(spec):
        from diffserve.reference import reference_cascade

        return reference_cascade(str(spec))
    return read_model(spec, CascadeFile, what="cascade")


def load_plan(path: str | Path) -> PlanFile:
    return read_model(path, PlanFile, what="plan")
