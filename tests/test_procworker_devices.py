"""The diffusers worker runs the cascade's discriminator where its light model runs."""

from __future__ import annotations

from types import SimpleNamespace

import diffserve.models as models
import diffserve.models.discriminator as discriminator
import diffserve.server.procworker as procworker
from diffserve.server.procworker import DiffusersRunner


def test_the_discriminator_is_loaded_on_the_light_models_device(monkeypatch):
    loaded: dict[str, str] = {}
    monkeypatch.setattr(models, "load_variant", lambda variant, device=None: SimpleNamespace(device="cuda:1", random_weights=True))
    monkeypatch.setattr(models, "set_torch_threads", lambda n: None)
    monkeypatch.setattr(procworker, "_variant_for", lambda name, source: SimpleNamespace(name=name))
    monkeypatch.setattr(discriminator, "load_discriminator", lambda path, base=None, device="cpu": loaded.setdefault("device", device))
    spec = {"models": {"sd-turbo": "tiny-light"}, "light": "sd-turbo", "discriminator": "disc.joblib", "device": "cuda:1"}
    runner = DiffusersRunner(spec)
    assert loaded["device"] == "cuda:1" and runner.discriminator == "cuda:1"  # not the loader's CPU default
