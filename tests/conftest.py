"""Shared fixtures: offline mode, one torch thread, and the paper's reference data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



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


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The paper artifact's data in ../shared (never copied into the repo), found as the CLI finds it."""
    from diffserve.errors import UserError
    from diffserve.reference_dir import reference_dir as locate

    try:
        return locate()
    except UserError as exc:
        pytest.skip(str(exc))
