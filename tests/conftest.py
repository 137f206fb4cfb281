"""Shared fixtures: offline mode, one torch thread, and the paper artifact's own files where named.

Every test runs on the reference figures shipped inside diffserve, as a bare clone or an installed
wheel does: ``DIFFSERVE_REFERENCE_DIR`` is taken out of the environment when this file loads, so
neither the tests nor the processes they start read the artifact by accident. Tests that need
the artifact's own files ask for the ``reference_dir`` fixture; they carry the ``artifact``
marker (added here) and get the variable back. They run where it names the artifact (CI's
``-m artifact`` pass) and are deselected by ``scripts/test.sh`` where it does not.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ARTIFACT_ENV = "DIFFSERVE_REFERENCE_DIR"
ARTIFACT_DIR = os.environ.pop(ARTIFACT_ENV, None) or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses the artifact's files is an ``artifact`` test, whether or not it says so."""
    for item in items:
        if "reference_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker("artifact") is None:
            item.add_marker(pytest.mark.artifact)



@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory):
    """One built tiny zoo per test session, in a temporary cache, shared by every test file."""
    import torch

    torch.set_num_threads(1)
    cache = tmp_path_factory.getbasetemp() / "diffserve-cache"
    old = os.environ.get("DIFFSERVE_CACHE")
    os.environ["DIFFSERVE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DIFFSERVE_CACHE", None)
    else:
        os.environ["DIFFSERVE_CACHE"] = old


@pytest.fixture()
def reference_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The paper artifact's own files (never copied into the repo), named by DIFFSERVE_REFERENCE_DIR.

    The variable is set again for the test, so the reference scenario reads these files too.
    """
    if ARTIFACT_DIR is None:
        pytest.skip(f"needs the DiffServe artifact's own files: set {ARTIFACT_ENV} (scripts/test.sh deselects these without it)")
    from diffserve.reference.locate import check_artifact_dir

    folder = check_artifact_dir(ARTIFACT_DIR, origin=f"{ARTIFACT_ENV}={ARTIFACT_DIR}")
    monkeypatch.setenv(ARTIFACT_ENV, str(folder))
    return folder
