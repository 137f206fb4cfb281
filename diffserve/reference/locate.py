"""The paper artifact's own files, used only where the user names their folder.

``--reference-dir DIR`` (a ``diffserve`` option before the subcommand) or ``DIFFSERVE_REFERENCE_DIR``
names the folder; without either, the reference scenario comes from the figures shipped inside
the package (:mod:`diffserve.reference.shipped`). Nothing is searched for: an earlier version
walked up from the working directory for any ``shared/`` folder, so an unrelated folder could
capture it and a bare clone behaved unlike CI.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffserve.errors import UserError

ENV_VAR = "DIFFSERVE_REFERENCE_DIR"
#: a file every copy of the artifact holds; a folder without it is not the artifact
MARKER = Path("quality") / "fid_vs_light_fraction.csv"


def check_artifact_dir(path: str | Path, *, origin: str) -> Path:
    """``path`` if it holds the artifact; a UserError naming ``origin`` (the flag or variable) if not."""
    folder = Path(path).expanduser()
    if not (folder / MARKER).is_file():
        raise UserError(f"{origin} is not the DiffServe artifact folder (no {MARKER.as_posix()} in {folder})")
    return folder


def artifact_dir() -> Path | None:
    """The artifact folder named by ``DIFFSERVE_REFERENCE_DIR``, or None (then shipped data is used)."""
    configured = os.environ.get(ENV_VAR, "").strip()
    if not configured:
        return None
    return check_artifact_dir(configured, origin=f"{ENV_VAR}={configured}")


def use_artifact_dir(path: str | Path) -> Path:
    """Replay the artifact's files from ``path`` in this process and in every process it starts.

    Setting the variable (not a module global) is what makes the benchmark's server subprocesses
    read the same files as the command that started them.
    """
    folder = check_artifact_dir(path, origin=f"--reference-dir {path}").resolve()
    os.environ[ENV_VAR] = str(folder)
    return folder


def artifact_file(*parts: str) -> Path:
    """A file inside the named artifact folder; UserError when no folder is named or the file is missing."""
    folder = artifact_dir()
    if folder is None:
        raise UserError(f"this needs the DiffServe artifact's own files: pass --reference-dir DIR or set {ENV_VAR}")
    path = folder.joinpath(*parts)
    if not path.is_file():
        raise UserError(f"the artifact folder {folder} has no {'/'.join(parts)}")
    return path
