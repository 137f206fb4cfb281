"""FID and KID of image sets, from features computed once per image.

With ``--inception-weights FILE`` the features are torchmetrics' Inception-v3 (the FID standard)
loaded from that local file. Without it, a small randomly initialised conv net stands in so that
the pipeline runs end to end offline; such numbers are flagged ``random_weights`` and are not
FIDs anyone can compare with published ones.

The curves need the FID of many mixtures of the same images (one per threshold), so features are
extracted once and the distances are computed by torchmetrics' own metrics fed with those
features through an identity "feature extractor".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffserve.errors import UserError

#: FID is reported only when both sets have at least this many images; below, its covariance
#: estimate is too poor, and KID (unbiased at any size) is the number to read.
MIN_FID_SAMPLES = 200
RANDOM_FEATURE_DIM = 64


def _random_feature_net(seed: int):
    import torch
    from torch import nn

    class RandomFeatureNet(nn.Module):
        """Random conv features of 64x64 images (uint8 NCHW in), for offline runs only."""

        num_features = RANDOM_FEATURE_DIM

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, RANDOM_FEATURE_DIM, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float() / 255.0
            x = nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
            return self.body(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RandomFeatureNet().eval()


@dataclass(frozen=True)
class FidConfig:
    inception_weights: str | None = None
    seed: int = 0

    @property
    def random_weights(self) -> bool:
        return self.inception_weights is None

    def describe(self) -> str:
        if self.inception_weights:
            return f"Inception-v3 ({self.inception_weights})"
        return f"RANDOM conv features (seed {self.seed}), not Inception"


class FidFeatures:
    """Extracts the FID/KID feature vector of each image."""

    def __init__(self, config: FidConfig, device: str = "cpu") -> None:
        self.config = config
        self.device = device
        if config.inception_weights is None:
            self.net = _random_feature_net(config.seed)
        else:
            path = Path(config.inception_weights)
            if not path.is_file():
                raise UserError(f"Inception weights file not found: {path}")
            try:
                from torchmetrics.image.fid import NoTrainInceptionV3
            except ImportError:  # pragma: no cover - torch-fidelity is a dependency
                raise UserError("real Inception features need torch-fidelity: pip install torch-fidelity") from None
            try:
                self.net = NoTrainInceptionV3(
                    name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
                )
            except Exception as exc:  # a wrong file: pickle, key or shape errors
                raise UserError(f"could not load Inception weights from {path}: {exc}") from None
        self.net = self.net.to(device)

    def __call__(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                arrays = [np.asarray(im.convert("RGB").resize(images[i].size)) for im in images[i : i + batch_size]]
                batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
                out.append(self.net(batch.to(self.device)).reshape(batch.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out)


def _identity(dim: int):
    from torch import nn

    class Precomputed(nn.Identity):
        num_features = dim

    return Precomputed()


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between two feature sets (torchmetrics' FrechetInceptionDistance)."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_identity(real.shape[1]))
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    return float(metric.compute())


def kid(real: np.ndarray, fake: np.ndarray, *, subsets: int = 20, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets), deterministic for ``seed``."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(len(real), len(fake), 1000)
    if size < 2:
        raise UserError(f"KID needs at least 2 images in each set, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():  # "saves all features in a buffer": we pass features, not images
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_identity(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def set_distances(real: np.ndarray, fake: np.ndarray, *, min_fid_samples: int = MIN_FID_SAMPLES) -> dict[str, float | None]:
    """``{"fid": ..., "kid": ..., "kid_std": ...}``; FID is None when a set is too small for it."""
    kid_mean, kid_std = kid(real, fake)
    large = min(len(real), len(fake)) >= min_fid_samples
    return {"fid": fid(real, fake) if large else None, "kid": kid_mean, "kid_std": kid_std}
