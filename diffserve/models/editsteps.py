"""How many denoising steps an edit runs: the one rule the diffusers backend, the emulated backend
and the profiler share, so that an edit's modelled latency is the latency that really runs.

An img2img or in-painting edit at strength ``s`` starts from the input image noised to a point
``s`` of the way along the schedule and runs only the rest: about ``s x steps`` of the model's
steps. diffusers computes the steps it runs as ``int(num_inference_steps * strength)``, which is
0 for a one-step model at ``s < 1`` (SD-Turbo's model card asks for ``steps * strength >= 1``).
So the steps to *run* are decided here (at least one, at most the model's) and the
``num_inference_steps`` to pass is derived from them. Standard library only: cheap to import.
"""

from __future__ import annotations

import math

#: Strength when a request names none and sets no ``input_fidelity``: a clear change that keeps
#: the composition (diffusers' img2img default is 0.8; SD-Turbo's card uses 0.5).
DEFAULT_STRENGTH = 0.6
#: The spec's ``input_fidelity`` (how closely the output follows the input) as a strength.
FIDELITY_STRENGTH = {"high": 0.3, "low": 0.8}


def steps_run(steps: int, strength: float) -> int:
    """Denoising steps an edit at ``strength`` runs on a model of ``steps`` steps (>= 1)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    return min(steps, max(1, round(steps * strength)))


def pipeline_steps(steps: int, strength: float) -> int:
    """The ``num_inference_steps`` that makes diffusers run exactly :func:`steps_run` steps."""
    want = steps_run(steps, strength)
    n = max(want, math.ceil(want / strength))
    while int(n * strength) < want:  # float rounding: 3 * 0.1 * 10 style cases
        n += 1
    while n > want and int((n - 1) * strength) >= want:
        n -= 1
    return n


def step_fraction(steps: int | None, strength: float) -> float:
    """The share of a full generation's denoising an edit runs; 1.0 when the steps are unknown."""
    if steps is None:
        return 1.0
    return steps_run(steps, strength) / steps
