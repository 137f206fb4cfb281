"""CLIP score, FID/KID and their confidence intervals; real-vs-random weight handling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffserve.models.clip import ClipConfig, ClipEncoder, clip_score
from diffserve.cascade_builder.fid import FidConfig, FidFeatures, fid, kid, set_distances
from diffserve.cascade_builder.scoring import mean_ci95
from diffserve.errors import UserError


def test_mean_ci95_covers_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small = mean_ci95(rng.normal(5, 1, size=10))
    large = mean_ci95(rng.normal(5, 1, size=1000))
    assert small[1] < small[0] < small[2]
    assert (large[2] - large[1]) < (small[2] - small[1])
    assert large[1] < 5 < large[2]
    assert mean_ci95(np.array([3.0])) == (3.0, 3.0, 3.0)


def test_clip_score_is_100_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert clip_score(a, b).tolist() == [100.0, 0.0]


def test_fid_and_kid_separate_shifted_sets() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    same = rng.normal(size=(300, 8))
    shifted = rng.normal(size=(300, 8)) + 1.0
    assert fid(real, same) < 0.5 < 4.0 < fid(real, shifted)
    assert kid(real, same)[0] < 0.05 < kid(real, shifted)[0]
    assert kid(real, shifted) == kid(real, shifted)  # seeded subsets: deterministic
    small = set_distances(real[:20], shifted[:20], min_fid_samples=50)
    assert small["fid"] is None and small["kid"] > 0  # too few images for FID: KID only


def test_random_fid_features_are_flagged_and_deterministic() -> None:
    config = FidConfig()
    assert config.random_weights and "RANDOM" in config.describe()
    images = [Image.new("RGB", (40, 40), (i * 20, 50, 90)) for i in range(4)]
    a, b = FidFeatures(config)(images), FidFeatures(config)(images)
    assert a.shape == (4, 64) and np.array_equal(a, b)


def test_bad_weight_files_are_user_errors(tmp_path) -> None:
    garbage = tmp_path / "inception.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not load Inception weights"):
        FidFeatures(FidConfig(inception_weights=str(garbage)))
    with pytest.raises(UserError, match="Inception weights file not found"):
        FidFeatures(FidConfig(inception_weights=str(tmp_path / "missing.pth")))
    with pytest.raises(UserError, match="CLIP weights file not found"):
        ClipEncoder(ClipConfig(model="ViT-S-32", weights=str(tmp_path / "missing.pt")))
    with pytest.raises(UserError, match="unknown open_clip model"):
        ClipEncoder(ClipConfig(model="ViT-Nope"))


def test_clip_config_says_when_weights_are_random() -> None:
    assert ClipConfig().random_weights and ClipConfig().effective_image_size == 96
    real = ClipConfig(model="ViT-B-32", weights="/models/clip.pt")
    assert not real.random_weights and real.effective_image_size is None
    assert "RANDOM" in ClipConfig().describe() and "RANDOM" not in real.describe()
    assert ClipConfig.from_dict(real.to_dict()) == real
