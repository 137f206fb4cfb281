"""Training the discriminator (build-cascade); loading and scoring live in :mod:`diffserve.models.discriminator`.

Both trainers return the inference classes the server loads, so a trained discriminator and a
loaded one behave the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from diffserve.errors import UserError
from diffserve.models.clip import ClipConfig
from diffserve.models.discriminator import IMAGENET_MEAN, IMAGENET_STD, ClipLogRegDiscriminator, EfficientNetDiscriminator


def fit_clip_logreg(
    positive: np.ndarray, negative: np.ndarray, clip: ClipConfig, *, positive_name: str, seed: int = 0
) -> ClipLogRegDiscriminator:
    """Fit on precomputed, L2-normalised CLIP image features of the two classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(positive) < 2 or len(negative) < 2:
        raise UserError(f"the discriminator needs at least 2 images per class, got {len(positive)} and {len(negative)}")
    x = np.concatenate([positive, negative])
    y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced", random_state=seed)
    )
    model.fit(x, y)
    return ClipLogRegDiscriminator(clip, model, positive_name)


def fit_efficientnet(
    positive: list[Image.Image],
    negative: list[Image.Image],
    *,
    positive_name: str,
    backbone_weights: str | None = None,
    image_size: int = 128,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    progress: Any = None,
    device: str = "cpu",
) -> EfficientNetDiscriminator:
    """Fine-tune the whole network with binary cross-entropy (positive = real / heavy)."""
    import torch

    if len(positive) < 2 or len(negative) < 2:
        raise UserError(f"the discriminator needs at least 2 images per class, got {len(positive)} and {len(negative)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EfficientNetDiscriminator.build(backbone_weights).to(device)
    config = {
        "image_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "positive": positive_name,
        "random_weights": backbone_weights is None,
        "backbone_weights": backbone_weights,
    }
    disc = EfficientNetDiscriminator(model, config)
    disc.device = device
    images = list(positive) + list(negative)
    labels = torch.tensor([1.0] * len(positive) + [0.0] * len(negative), device=device)
    pos_weight = torch.tensor([len(negative) / len(positive)], device=device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            x = disc._tensor([images[j] for j in idx]).to(device)
            loss = loss_fn(model(x).squeeze(1), labels[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if progress is not None:
                progress(len(idx))
    model.eval()
    return disc


def classification_metrics(confidence: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Accuracy at 0.5 and ROC AUC (None when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    accuracy = float(np.mean((np.asarray(confidence) >= 0.5).astype(int) == labels)) if len(labels) else None
    auc = float(roc_auc_score(labels, confidence)) if len(set(labels.tolist())) == 2 else None
    return {"accuracy": accuracy, "auc": auc}
