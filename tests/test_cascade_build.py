"""The image cache's resume guarantee and build_cascade with fake generators (no diffusion models).

The fake models paint images whose statistics differ by model, so every stage (CLIP features,
discriminator, curves, FID/KID, Pareto selection, artifacts, plot) runs for real in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffserve.artifacts import load_cascade
from diffserve.cascade_builder.build import BuildOptions, build_cascade, split_prompts
from diffserve.models.clip import ClipConfig
from diffserve.models.discriminator import load_discriminator
from diffserve.cascade_builder.imagecache import VariantCache, ensure_images
from diffserve.datasets import Prompt, PromptSet, load_prompts
from diffserve.errors import UserError
from diffserve.models import VariantSpec
from diffserve.schemas import BatchProfile, ModelProfile, ProfileFile

TINY_CLIP = ClipConfig(model="ViT-S-32", image_size=32)


def spec(name: str, steps: int = 1) -> VariantSpec:
    return VariantSpec(name=name, source=f"fake:{name}", steps=steps, guidance_scale=0.0, resolution=16)


class FakeModel:
    """Paints a 16x16 image per prompt; brightness depends on the model, texture on the seed."""

    random_weights = True

    def __init__(self, level: int, fail_after_batches: int | None = None) -> None:
        self.level = level
        self.fail_after = fail_after_batches
        self.generated: list[tuple[str, int]] = []
        self.batches = 0

    def generate(self, prompts: list[str], seeds: list[int] | None = None) -> list[Image.Image]:
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        self.batches += 1
        out = []
        for prompt, seed in zip(prompts, seeds or [0] * len(prompts)):
            self.generated.append((prompt, seed))
            rng = np.random.default_rng(seed)
            noise = rng.integers(0, 60, size=(16, 16, 3))
            out.append(Image.fromarray(np.clip(self.level + noise, 0, 255).astype(np.uint8)))
        return out


def prompts(n: int) -> PromptSet:
    return PromptSet("test", [Prompt(id=f"p{i}", text=f"prompt number {i}") for i in range(n)])


def test_resume_loses_nothing_and_regenerates_nothing(tmp_path) -> None:
    cache = VariantCache(tmp_path, spec("light"))
    ps = prompts(10).prompts
    first = FakeModel(20, fail_after_batches=3)
    with pytest.raises(KeyboardInterrupt):
        ensure_images(cache, ps, 2, lambda: first, batch_size=3)
    done = sorted(cache.folder.glob("*.png"))
    assert len(done) == 9 and len(first.generated) == 9
    before = {p.name: p.read_bytes() for p in done}
    assert not list(cache.folder.glob("*.tmp"))

    second = FakeModel(20)
    queries = ensure_images(cache, ps, 2, lambda: second, batch_size=3)
    assert len(second.generated) == 11  # exactly the missing ones
    assert not set(second.generated) & set(first.generated)
    assert len(queries) == 20 and all(cache.has(key) for _, key in queries)
    assert {p.name: p.read_bytes() for p in done} == before  # finished images untouched
    assert cache.meta()["generated_images"] == 20

    loads = []
    ensure_images(cache, ps, 2, lambda: loads.append(1) or FakeModel(20), batch_size=3)
    assert loads == []  # a complete cache never loads the model


def test_a_changed_recipe_gets_its_own_cache(tmp_path) -> None:
    assert VariantCache(tmp_path, spec("m", 1)).folder != VariantCache(tmp_path, spec("m", 4)).folder


def test_split_is_by_prompt_and_covers_everything() -> None:
    train, val, test = split_prompts(20, (0.5, 0.2, 0.3), seed=1)
    assert len(train) == 10 and len(val) == 4 and len(test) == 6
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(20))
    with pytest.raises(UserError, match="at least 3 prompts"):
        split_prompts(2, (0.5, 0.2, 0.3), seed=1)


def profile(latency: dict[str, float]) -> ProfileFile:
    models = {
        n: ModelProfile(name=n, source=f"fake:{n}", batches=[BatchProfile(batch_size=1, median_ms=ms)])
        for n, ms in latency.items()
    }
    return ProfileFile(device="test", models=models)


def _loader(levels: dict[str, int]):
    made: dict[str, FakeModel] = {}

    def load(s: VariantSpec) -> FakeModel:
        made[s.name] = FakeModel(levels[s.name])
        return made[s.name]

    return load, made


@pytest.mark.slow
def test_build_cascade_with_heavy_images_as_positives(tmp_path) -> None:
    specs = [spec("light"), spec("mid", 2), spec("heavy", 8)]
    levels = {"light": 0, "mid": 90, "heavy": 180}
    load, made = _loader(levels)
    output = tmp_path / "out" / "cascade.yaml"
    options = BuildOptions(cache_dir=tmp_path / "cache", clip=TINY_CLIP, grid_points=21, keep_all_pairs=True,
                           images_per_prompt=2)
    options.profile = profile({"light": 10.0, "mid": 50.0, "heavy": 200.0})
    build_cascade(specs, prompts(15), output, options, load)
    cascade = load_cascade(output)
    assert cascade.random_weights is True
    assert {p.name for p in cascade.pairs} == {"light->mid", "light->heavy", "mid->heavy"}
    assert sum(p.recommended for p in cascade.pairs) == 1
    for pair in cascade.pairs:
        assert pair.metric == "clip" and pair.f_t[0] == 0.0 and pair.f_t[-1] == 1.0
        assert all(b >= a for a, b in zip(pair.f_t, pair.f_t[1:]))
        assert pair.q_t[0] == pytest.approx(pair.q_light, abs=1e-3)
        assert pair.q_t[-1] == pytest.approx(pair.q_heavy, abs=1e-3)
        assert pair.f_rand[0] == 0.0 and pair.f_rand[-1] == 1.0  # the measured random-split curve
        assert (pair.q_rand[0], pair.q_rand[-1]) == pytest.approx((pair.q_light, pair.q_heavy), abs=1e-3)
        assert pair.n_eval_prompts == 4 and pair.discriminator.kind == "clip-logreg"
        assert pair.latency_ms == {pair.light: options.profile.models[pair.light].latency_ms(1),
                                   pair.heavy: options.profile.models[pair.heavy].latency_ms(1)}
        # no real images: the positive class is the heavy model's images, the negative the light's
        assert pair.discriminator.path.endswith(f"{pair.light}__vs__{pair.heavy}.joblib")
        disc = load_discriminator(pair.discriminator.path, base=output)
        assert disc.positive == pair.heavy
        seeds = list(range(1000, 1006))
        light_like = disc.confidence(FakeModel(levels[pair.light]).generate(["x"] * 6, seeds))
        heavy_like = disc.confidence(FakeModel(levels[pair.heavy]).generate(["x"] * 6, seeds))
        assert all(0.0 <= c < 1.0 for c in [*light_like, *heavy_like])
        assert heavy_like.mean() > light_like.mean()  # it scores the heavy model's images as the positives
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output.with_name("cascade.details.json").is_file()

    # a second build reuses every image: no model is loaded
    made.clear()
    build_cascade(specs, prompts(15), tmp_path / "again.yaml", options, load)
    assert made == {}


@pytest.mark.slow
def test_build_cascade_with_real_images_and_fid_metric(tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray((150 + rng.integers(0, 60, size=(16, 16, 3))).astype(np.uint8)).save(real / f"r{i}.png")
    load, _ = _loader({"light": 0, "heavy": 150})
    output = tmp_path / "cascade.yaml"
    options = BuildOptions(cache_dir=tmp_path / "cache", clip=TINY_CLIP, grid_points=11, real_images=real,
                           metric="fid", min_fid_samples=4, split=(0.4, 0.2, 0.4),
                           profile=profile({"light": 10.0, "heavy": 200.0}))
    build_cascade([spec("light"), spec("heavy", 8)], prompts(20), output, options, load)
    pair = load_cascade(output).recommended()
    assert pair.metric == "fid" and pair.discriminator.path.endswith("light__vs__real.joblib")
    assert pair.q_t[0] == pytest.approx(pair.q_light, abs=1e-3) and pair.q_t[-1] == pytest.approx(pair.q_heavy, abs=1e-3)
    assert pair.q_heavy < pair.q_light  # heavy images look like the real ones, light ones do not
    assert (pair.q_rand[0], pair.q_rand[-1]) == pytest.approx((pair.q_light, pair.q_heavy), abs=1e-3)


def test_build_cascade_input_errors(tmp_path) -> None:
    load, _ = _loader({"a": 0, "b": 100})
    base = dict(cache_dir=tmp_path / "cache", clip=TINY_CLIP)
    with pytest.raises(UserError, match="at least two models"):
        build_cascade([spec("a")], prompts(6), tmp_path / "c.yaml", BuildOptions(**base), load)
    with pytest.raises(UserError, match="needs real images"):
        build_cascade([spec("a"), spec("b")], prompts(6), tmp_path / "c.yaml", BuildOptions(metric="fid", **base), load)
    with pytest.raises(UserError, match="not found"):
        build_cascade([spec("a"), spec("b")], prompts(6), tmp_path / "c.yaml",
                      BuildOptions(real_images=tmp_path / "nope", **base), load)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no images"):
        build_cascade([spec("a"), spec("b")], prompts(6), tmp_path / "c.yaml", BuildOptions(real_images=empty, **base), load)


def test_builtin_prompts_flow_into_the_split() -> None:
    ps = load_prompts("builtin")
    train, val, test = split_prompts(len(ps), (0.5, 0.2, 0.3), seed=0)
    assert len(test) >= 60  # enough held-out prompts for a meaningful f(t)


@pytest.mark.slow
def test_efficientnet_backbone_trains_saves_and_reloads(tmp_path) -> None:
    """The paper's backbone: random-init EfficientNet-V2-S (no weights offline), fine-tuned one epoch."""
    import torch

    torch.set_num_threads(1)
    load, _ = _loader({"light": 0, "heavy": 200})
    output = tmp_path / "cascade.yaml"
    options = BuildOptions(cache_dir=tmp_path / "cache", clip=TINY_CLIP, grid_points=11, backbone="efficientnet",
                           epochs=1, backbone_image_size=32, profile=profile({"light": 10.0, "heavy": 200.0}))
    build_cascade([spec("light"), spec("heavy", 8)], prompts(8), output, options, load)
    pair = load_cascade(output).recommended()
    assert pair.discriminator.kind == "efficientnet" and pair.discriminator.random_weights
    artifact = output.parent / pair.discriminator.path
    assert artifact.suffix == ".safetensors" and artifact.with_suffix(".json").is_file()
    disc = load_discriminator(pair.discriminator.path, base=output)
    images = [Image.new("RGB", (16, 16), (v, v, v)) for v in (0, 120, 250)]
    conf = disc.confidence(images)
    assert ((conf >= 0) & (conf < 1)).all()
    assert np.allclose(conf, load_discriminator(artifact).confidence(images))


def test_backbone_weights_must_be_efficientnet(tmp_path) -> None:
    import torch

    bogus = tmp_path / "w.pth"
    torch.save({"foo.weight": torch.zeros(2)}, bogus)
    from diffserve.models.discriminator import EfficientNetDiscriminator

    with pytest.raises(UserError, match="does not hold EfficientNet-V2-S weights"):
        EfficientNetDiscriminator.build(str(bogus))
