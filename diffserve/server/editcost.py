"""What a batch that holds edits costs: each kind of work in it is its own pipeline call.

A worker runs a batch's generations as one text-to-image call and its edits as one img2img or
in-painting call per strength (diffusers takes one strength per call), so a mixed batch would be a
few groups run back to back; the pools' batcher takes one kind per batch (``group_key``), so a
batch is one call. An edit group at strength ``s`` runs ``steps_run(steps, s)`` of the model's
steps (:mod:`diffserve.models.editsteps`); the emulated backend charges it that share of the
profiled batch latency. What the emulation leaves out: encoding the input image with the VAE (a
fraction of one decoder pass; the reference profiles have no figure for it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from diffserve.models.editsteps import step_fraction
from diffserve.schemas import ProfileFile
from diffserve.server.stage import EditInput, Job

#: Denoising steps of the paper's reference models, which the artifact does not publish: the usual
#: step counts of their model cards (an assumption, used only to scale emulated edit latency).
REFERENCE_STEPS = {"sd-turbo": 1, "sdxs": 1, "sd-v1.5": 50, "sdxl-lightning": 4, "sdxl": 50}

GroupKey = tuple[str, float]  # ("generate", 1.0) | ("img2img" | "inpaint", strength)


def model_steps(profile: ProfileFile, model: str) -> int | None:
    """The model's step count: the profile's (``diffserve profile`` records it), else the reference's."""
    steps = profile.models[model].steps if model in profile.models else None
    return steps or REFERENCE_STEPS.get(model)


def edit_groups(edits: Sequence[EditInput | None]) -> dict[GroupKey, list[int]]:
    """Indices per pipeline call (``None``: a generation), in first-seen order; the diffusers
    worker runs these calls, the emulated backend charges for them."""
    groups: dict[GroupKey, list[int]] = {}
    for i, edit in enumerate(edits):
        groups.setdefault(group_key(edit), []).append(i)
    return groups


def group_key(edit: EditInput | None) -> GroupKey:
    """The pipeline call a job runs in: generations together, edits per (kind, strength)."""
    return ("generate", 1.0) if edit is None else (edit.kind, edit.strength)


def batch_ms(table: Callable[[int], float], steps: int | None, jobs: Sequence[Job]) -> float:
    """Model time of a batch: each group at its batch size's latency, edits scaled by steps run.
    A batch of generations only is ``table(len(jobs))``, exactly as before edits existed."""
    total = 0.0
    for (kind, strength), idx in edit_groups([j.edit for j in jobs]).items():
        share = 1.0 if kind == "generate" else step_fraction(steps, strength)
        total += table(len(idx)) * share
    return total
