"""The open_clip model behind both the CLIP score and the default discriminator's features.

Three ways to get weights, chosen by :class:`ClipConfig`: a local checkpoint file (``weights``,
works offline), an open_clip pretrained tag (``pretrained``, e.g. ``openai``: downloads, so
online only), or neither, in which case the network is randomly initialised from ``seed``. A
random network is deterministic for a given seed and open_clip version, which lets a saved
discriminator rebuild exactly the features it was trained on, but its scores mean nothing:
:attr:`ClipConfig.random_weights` carries that fact to every output.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffserve.errors import UserError

#: Image size used when the network is random and no size is asked for: its scores are flagged
#: as meaningless anyway, and ViT-B-32 at 96 px is about 5x faster than at 224 px on a CPU.
RANDOM_DEFAULT_IMAGE_SIZE = 96


@dataclass(frozen=True)
class ClipConfig:
    model: str = "ViT-B-32"
    pretrained: str | None = None
    weights: str | None = None
    image_size: int | None = None
    seed: int = 0

    @property
    def random_weights(self) -> bool:
        return self.pretrained is None and self.weights is None

    @property
    def effective_image_size(self) -> int | None:
        """The forced input size: as asked, else low for random weights, else the model's own."""
        if self.image_size is not None:
            return self.image_size
        return RANDOM_DEFAULT_IMAGE_SIZE if self.random_weights else None

    def describe(self) -> str:
        source = self.weights or (f"pretrained={self.pretrained}" if self.pretrained else f"RANDOM weights, seed {self.seed}")
        size = self.effective_image_size
        return f"open_clip {self.model} ({source}{f', {size}px' if size else ''})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClipConfig":
        return cls(**data)


class ClipEncoder:
    """Image and text embeddings (L2-normalised) and the CLIP score of image/text pairs."""

    def __init__(self, config: ClipConfig, device: str = "cpu") -> None:
        import open_clip
        import torch

        if config.model not in open_clip.list_models():
            raise UserError(f"unknown open_clip model {config.model!r}; for example ViT-B-32, ViT-S-32, RN50")
        if config.weights is not None and not Path(config.weights).is_file():
            raise UserError(f"CLIP weights file not found: {config.weights}")
        kwargs = {}
        if config.effective_image_size is not None:
            kwargs["force_image_size"] = config.effective_image_size
        pretrained = config.weights or config.pretrained
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.ERROR))  # silence open_clip's "initialized randomly": we flag it ourselves
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    config.model, pretrained=pretrained, device=device, **kwargs
                )
        except (RuntimeError, OSError, ValueError) as exc:
            raise UserError(
                f"could not load CLIP {config.model} with {pretrained!r}: {exc}. Offline, pass a local "
                "checkpoint with --clip-weights FILE instead of a pretrained tag"
            ) from None
        finally:
            root.setLevel(level)
        self.config = config
        self.device = device
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(config.model)

    def encode_images(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + batch_size]])
                feats = self.model.encode_image(batch.to(self.device)).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def encode_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
                feats = self.model.encode_text(tokens).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """CLIP score per image/text pair: ``100 * cos(image, text)``.

    torchmetrics' CLIPScore also clamps at 0; we do not, because with real CLIP weights the cosine
    of a generated image and its prompt is positive anyway, while with random weights the clamp
    would flatten most scores to 0 and hide the pipeline's behaviour in tests.
    """
    return 100.0 * np.sum(image_features * text_features, axis=1)


@functools.lru_cache(maxsize=4)
def get_encoder(config: ClipConfig, device: str = "cpu") -> ClipEncoder:
    """A shared encoder per config: loading ViT-B-32 takes seconds, and several stages need it."""
    return ClipEncoder(config, device)
