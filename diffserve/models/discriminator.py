"""The discriminator at inference time: how real (or heavy-model-like) a light model's image looks.

Two backbones:

* ``clip-logreg`` (default, fast on a CPU): frozen open_clip image features and a scikit-learn
  logistic regression. Saved as one joblib file holding the classifier and the CLIP config.
* ``efficientnet`` (the paper's): torchvision EfficientNet-V2-S with a one-logit head,
  fine-tuned end to end. Saved as safetensors plus a JSON file with its preprocessing.

Either way :meth:`Discriminator.confidence` returns, per image, the probability of the positive
class (real images, or the heavy model's images when no real ones are given), in ``[0, 1)``. The
cascade defers a query to the heavy model when ``confidence < t``, so ``t = 0`` never defers and
``t = 1`` always does. The server loads the artifact named in ``cascade.yaml`` with
:func:`load_discriminator`.

Training lives in :mod:`diffserve.cascade_builder.discriminator`; this module holds only what
loading, scoring and saving need, so that the server never imports the training stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffserve.models.clip import ClipConfig, get_encoder
from diffserve.errors import UserError
from diffserve.fileio import atomic_write_bytes, atomic_write_text

ARTIFACT_FORMAT = "diffserve.discriminator"
ARTIFACT_VERSION = 1
#: Largest confidence we return, so that ``confidence < 1`` always holds and f(1) = 1 exactly.
MAX_CONFIDENCE = float(np.nextafter(1.0, 0.0))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _clamp(p: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(p, dtype=np.float64), 0.0, MAX_CONFIDENCE)


def _probe_images() -> list[Image.Image]:
    """Two fixed images whose features identify the exact feature network a classifier was fit on."""
    ramp = np.linspace(0, 255, 64, dtype=np.float64)
    a = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2, np.full((64, 64), 128.0)], -1)
    return [Image.fromarray(a.astype(np.uint8)), Image.fromarray((255 - a).astype(np.uint8))]


class Discriminator:
    """Common interface; see the module docstring for what confidence means."""

    kind: str = ""
    random_weights: bool = False
    feature_model: str = ""
    #: where the network runs; set by :func:`load_discriminator` (``device=``)
    device: str = "cpu"

    def confidence(self, images: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        raise NotImplementedError


class ClipLogRegDiscriminator(Discriminator):
    kind = "clip-logreg"

    def __init__(self, clip: ClipConfig, classifier: Any, positive: str, probe: list[float] | None = None) -> None:
        self.clip = clip
        self.classifier = classifier
        self.positive = positive
        self.probe = probe
        self.random_weights = clip.random_weights
        self.feature_model = clip.describe()

    def confidence_from_features(self, features: np.ndarray) -> np.ndarray:
        return _clamp(self.classifier.predict_proba(features)[:, 1])

    def confidence(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros(0)
        return self.confidence_from_features(get_encoder(self.clip, self.device).encode_images(images))

    def _probe_features(self) -> list[float]:
        return [float(v) for v in get_encoder(self.clip, self.device).encode_images(_probe_images())[:, :8].ravel()]

    def verify(self) -> None:
        """Fail loudly when the feature network differs from the one the classifier was fit on."""
        if self.probe is None:
            return
        now = np.asarray(self._probe_features())
        if not np.allclose(now, np.asarray(self.probe), atol=5e-3):  # CPU vs GPU kernels differ slightly
            raise UserError(
                f"the discriminator's feature network ({self.feature_model}) gives different features than when it "
                "was trained (another open_clip version or weights file?); rebuild the cascade"
            )

    def save(self, path: str | Path) -> Path:
        import io

        import joblib

        if self.probe is None:  # recorded at save time so that fitting alone needs no CLIP model
            self.probe = self._probe_features()
        buffer = io.BytesIO()
        joblib.dump(
            {
                "format": ARTIFACT_FORMAT,
                "version": ARTIFACT_VERSION,
                "kind": self.kind,
                "clip": self.clip.to_dict(),
                "positive": self.positive,
                "probe": self.probe,
                "classifier": self.classifier,
            },
            buffer,
        )
        return atomic_write_bytes(path, buffer.getvalue())


class EfficientNetDiscriminator(Discriminator):
    kind = "efficientnet"
    feature_model = "torchvision EfficientNet-V2-S"

    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        self.model = model.eval()
        self.config = config
        self.random_weights = bool(config.get("random_weights", True))
        self.positive = str(config.get("positive", "real"))

    @staticmethod
    def build(backbone_weights: str | None = None):
        """EfficientNet-V2-S with a one-logit head; ImageNet (or other) weights from a local file."""
        import torch
        from torchvision.models import efficientnet_v2_s

        model = efficientnet_v2_s(weights=None)
        if backbone_weights is not None:
            path = Path(backbone_weights)
            if not path.is_file():
                raise UserError(f"backbone weights file not found: {path}")
            state = _load_state_dict(path)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if len(missing) > 2 or unexpected:  # the head may differ; the body must match
                raise UserError(f"{path} does not hold EfficientNet-V2-S weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
        in_features = model.classifier[-1].in_features
        model.classifier[-1] = torch.nn.Linear(in_features, 1)
        return model

    def _tensor(self, images: list[Image.Image]):
        import torch

        size = int(self.config["image_size"])
        mean = torch.tensor(self.config["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(self.config["std"]).view(1, 3, 1, 1)
        arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0 for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (x - mean) / std

    def confidence(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                logits = self.model(self._tensor(images[i : i + batch_size]).to(self.device)).squeeze(1)
                out.append(torch.sigmoid(logits).double().cpu().numpy())
        return _clamp(np.concatenate(out)) if out else np.zeros(0)

    def save(self, path: str | Path) -> Path:
        """``path`` (.safetensors) plus ``path.with_suffix('.json')`` with the preprocessing config."""
        from safetensors.torch import save

        path = Path(path)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        config = dict(self.config, format=ARTIFACT_FORMAT, version=ARTIFACT_VERSION, kind=self.kind)
        atomic_write_text(path.with_suffix(".json"), json.dumps(config, indent=2))
        return atomic_write_bytes(path, save(state))


def _load_state_dict(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_discriminator(path: str | Path, *, base: str | Path | None = None, device: str = "cpu") -> Discriminator:
    """Load a saved discriminator; a relative ``path`` is taken relative to ``base`` (the cascade file or its folder).

    A joblib artifact is unpickled: load only files you (or diffserve) wrote.
    """
    p = Path(path)
    if not p.is_absolute() and base is not None:
        base_path = Path(base)
        p = (base_path.parent if base_path.suffix in (".yaml", ".yml") else base_path) / p
    if not p.is_file():
        raise UserError(f"discriminator artifact not found: {p}")
    if p.suffix == ".joblib":
        import joblib

        try:
            data = joblib.load(p)
        except Exception as exc:
            raise UserError(f"{p} is not a diffserve discriminator: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT or data.get("kind") != "clip-logreg":
            raise UserError(f"{p} is not a diffserve clip-logreg discriminator")
        disc = ClipLogRegDiscriminator(ClipConfig.from_dict(data["clip"]), data["classifier"], data["positive"], data.get("probe"))
        disc.device = device
        disc.verify()
        return disc
    if p.suffix == ".safetensors":
        config_path = p.with_suffix(".json")
        if not config_path.is_file():
            raise UserError(f"{p} has no preprocessing config next to it ({config_path.name})")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model = EfficientNetDiscriminator.build(None)
        model.load_state_dict(_load_state_dict(p))
        disc = EfficientNetDiscriminator(model.to(device), config)
        disc.device = device
        return disc
    raise UserError(f"unknown discriminator artifact {p}: expected .joblib (clip-logreg) or .safetensors (efficientnet)")
