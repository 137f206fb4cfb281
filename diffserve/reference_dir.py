"""Where the DiffServe paper's artifact data lives on this machine.

The artifact's files (latency CSVs, discriminator scores, FID tables, traces) are read where they
are, never copied into the package. ``DIFFSERVE_REFERENCE_DIR`` names the folder; without it we
look for ``shared/reference/diffserve-artifact`` in every folder above the working directory and
above this package, so that commands run from a checkout, from a temporary folder (the benchmark's
subprocesses) or from an editable install all find the same data.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffserve.errors import UserError

ENV_VAR = "DIFFSERVE_REFERENCE_DIR"
RELATIVE = Path("shared") / "reference" / "diffserve-artifact"
#: a file every copy of the artifact holds; a folder without it is not the artifact
MARKER = Path("quality") / "fid_vs_light_fraction.csv"


def _candidates() -> list[Path]:
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    seen: list[Path] = []
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / RELATIVE
            if candidate not in seen:
                seen.append(candidate)
    return seen


def reference_dir() -> Path:
    """The artifact folder; UserError naming ``DIFFSERVE_REFERENCE_DIR`` when it cannot be found."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        if not (path / MARKER).is_file():
            raise UserError(f"{ENV_VAR}={configured} is not the DiffServe artifact folder (no {MARKER.as_posix()} in it)")
        return path
    for candidate in _candidates():
        if (candidate / MARKER).is_file():
            return candidate
    raise UserError(
        f"the DiffServe paper's artifact data was not found: set {ENV_VAR} to the folder that holds "
        f"{MARKER.as_posix()} (looked for {RELATIVE.as_posix()} above {Path.cwd()} and above the diffserve package)"
    )


def reference_file(*parts: str) -> Path:
    """A file inside the artifact folder; UserError when that file is missing."""
    path = reference_dir().joinpath(*parts)
    if not path.is_file():
        raise UserError(f"the artifact folder {reference_dir()} has no {'/'.join(parts)}")
    return path
