"""Load the pipeline's files by path, or the shipped reference by the name ``reference``.

Every CLI command takes ``--profile``/``--cascade`` through these functions so the same words
work everywhere and bad paths fail the same way.
"""

from __future__ import annotations

from pathlib import Path

from diffserve.fileio import read_model
from diffserve.schemas import CascadeFile, PlanFile, ProfileFile

REFERENCE = "reference"


def load_profile(spec: str | Path) -> ProfileFile:
    if str(spec) == REFERENCE:
        from diffserve.reference import reference_profile

        return reference_profile()
    return read_model(spec, ProfileFile, what="profile")


def load_cascade(spec: str | Path) -> CascadeFile:
    if str(spec) == REFERENCE:
        from diffserve.reference import reference_cascade

        return reference_cascade()
    return read_model(spec, CascadeFile, what="cascade")


def load_plan(path: str | Path) -> PlanFile:
    return read_model(path, PlanFile, what="plan")
