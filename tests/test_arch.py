"""The paper's five architectures: transcribed configs, published parameter counts, one real step on CPU."""

from __future__ import annotations

import gc
import json
from importlib import resources

import numpy as np
import pytest

from diffserve.errors import UserError
from diffserve.models import load_variant, resolve_variants
from diffserve.models.arch import ARCH_LABEL, ARCH_NAMES, arch_config, arch_variant, component_params, param_counts

#: Published counts quoted by issue #23 (model cards and papers), kept here independently of the
#: package data so that a wrong transcription cannot also move the figure it is checked against.
PUBLISHED = {
    ("sd-v1.5", "unet"): 859.5e6,
    ("sd-turbo", "unet"): 865.9e6,
    ("sdxl", "unet"): 2.567e9,
    ("sdxl-lightning", "unet"): 2.567e9,
    ("sd-v1.5", "text_encoder"): 123e6,  # CLIP ViT-L/14 text encoder
    ("sdxl", "text_encoder"): 123e6,
}


def test_every_config_cites_its_repository_and_files():
    for name in ARCH_NAMES:
        cfg = arch_config(name)
        assert cfg["name"] == name and "/" in cfg["repo"]
        assert cfg["scheduler"]["config_file"] == "scheduler/scheduler_config.json"
        for comp, spec in cfg["components"].items():
            assert spec["config_file"] == f"{comp}/config.json"
            assert spec["published_source"] and spec["published_params"] > 0
    # the files ship with the package (package-data), not only in the source tree
    names = {p.name for p in resources.files("diffserve").joinpath("data", "arch").iterdir()}
    assert {f"{n}.json" for n in ARCH_NAMES} <= names


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_parameter_counts_match_the_published_ones(name):
    counts = param_counts(name)  # built on the meta device: no memory, no compute
    assert {c.component for c in counts} >= {"unet", "text_encoder", "vae"}
    for c in counts:
        assert c.matches, f"{name} {c.component}: {c.params:,} vs published {c.published:,} ({c.rel_error:+.2%}; {c.source})"
        quoted = PUBLISHED.get((name, c.component))
        if quoted is not None:
            assert abs(c.params / quoted - 1) <= 0.005, (name, c.component, c.params, quoted)


def test_sdxl_has_two_text_encoders_and_sdxs_a_tiny_vae():
    sdxl = component_params("sdxl")
    assert sdxl["text_encoder_params"] == pytest.approx(123e6 + 694.7e6, rel=0.005)
    assert component_params("sdxs")["vae_params"] < 3e6 < component_params("sd-turbo")["vae_params"]
    assert arch_config("sdxl-lightning")["components"] == arch_config("sdxl")["components"]


def test_variants_take_the_real_models_settings():
    specs = {s.name: s for s in resolve_variants("arch")}
    assert list(specs) == list(ARCH_NAMES)
    turbo, sd15, sdxl, lightning = specs["sd-turbo"], specs["sd-v1.5"], specs["sdxl"], specs["sdxl-lightning"]
    assert (turbo.steps, turbo.guidance_scale, turbo.resolution, turbo.uses_cfg) == (1, 0.0, 512, False)
    assert (sd15.steps, sd15.guidance_scale, sd15.resolution) == (50, 7.5, 512)
    assert (sdxl.resolution, sdxl.pipeline_class) == (1024, "StableDiffusionXLPipeline")
    assert (lightning.steps, lightning.guidance_scale) == (4, 0.0)
    assert arch_config("sdxl-lightning")["scheduler"]["config"]["timestep_spacing"] == "trailing"
    assert resolve_variants("arch:sdxs")[0].source == "arch:sdxs"


def test_unknown_architecture_is_one_line():
    with pytest.raises(UserError, match="unknown architecture 'sd3'.*arch:sd-turbo"):
        resolve_variants("arch:sd3")
    with pytest.raises(UserError, match="StableDiffusionXLPipeline"):
        load_variant(arch_variant("sdxl", pipeline_class="StableDiffusionPipeline"), device="cpu")


def test_gpu_options_are_flags_of_the_spec():
    spec = arch_variant("sd-turbo", gpu={"channels_last": True, "compile": "max-autotune", "cuda_graphs": True})
    assert spec.gpu.channels_last and spec.gpu.compile == "max-autotune"
    with pytest.raises(ValueError, match="compile"):
        arch_variant("sd-turbo", gpu={"compile": "fast"})


def _one_step(name: str, dtype: str = "float32", **gpu):
    spec = arch_variant(name, resolution=64, steps=1, dtype=dtype, gpu=gpu)
    model = load_variant(spec, device="cpu")
    try:
        images = model.generate(["a red cube on a blue table"], seeds=[0])
        return model.label, model.random_weights, model.gpu, images
    finally:
        del model
        gc.collect()


def _check_image(images) -> None:
    assert len(images) == 1 and images[0].size == (64, 64)
    pixels = np.asarray(images[0])
    assert pixels.dtype == np.uint8 and pixels.std() > 0  # a decoded image, not a blank


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd-turbo", "sdxs", "sd-v1.5"])
def test_architecture_runs_one_step_on_cpu_at_64px(name):
    """The full-size network (float32, up to 5 GB RSS), one denoising step at 64 px."""
    label, random_weights, gpu, images = _one_step(name, channels_last=True)
    assert label == ARCH_LABEL and random_weights
    assert gpu["sdpa"] and gpu["channels_last"] and gpu["dtype"] == "float32"
    assert not gpu["cuda_graphs"] and not gpu["pinned_outputs"]  # CPU: recorded off
    _check_image(images)


def test_shared_modules_reuse_a_component_that_a_fresh_build_would_equal():
    """SDXL and SDXL-Lightning share their modules in tests/test_arch_sdxl.py (one real 64 px step
    each on the CPU); that is honest only because a second build gives the very same weights."""
    import torch

    from diffserve.models.arch import POOL_SIZE, _materialise, shared_modules

    kind = "CLIPTextModel"
    config = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
    pool = torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(0))

    def build(**overrides):
        return _materialise(kind, {**config, **overrides}, "cpu", torch.float32, pool)

    fresh_a, fresh_b = build(), build()
    assert fresh_a is not fresh_b  # outside the block: two builds
    a, b = fresh_a.state_dict(), fresh_b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # ... of equal weights
    with shared_modules():
        first = build()
        assert build() is first
        assert build(num_hidden_layers=3) is not first  # another configuration is another module
        with shared_modules():  # nested: the same cache
            assert build() is first
        assert build(num_hidden_layers=3) is build(num_hidden_layers=3)
    assert build() is not first  # the block's end drops the cache


@pytest.mark.slow
def test_tensor_output_path_gives_the_same_pixels_as_pil():
    """same_stream_decode takes the tensor path (uint8 on the device, one copy); pixels must not change."""
    _, _, _, pil = _one_step("sdxs")
    _, _, gpu, tensor = _one_step("sdxs", same_stream_decode=True)
    assert gpu["same_stream_decode"]
    assert np.array_equal(np.asarray(pil[0]), np.asarray(tensor[0]))


def test_profile_records_gpu_options_and_label(tmp_path):
    """`profile` writes what was on; checked with a fake loader so no model is built."""
    from diffserve.fileio import read_model
    from diffserve.models.registry import LoadedModel
    from diffserve.profiler import ProfileSettings, profile_variants
    from diffserve.schemas import ProfileFile

    spec = arch_variant("sdxs", resolution=64, steps=1, dtype="float32", device="cpu")

    class _Pipe:
        def __call__(self, **kwargs):
            from PIL import Image

            return type("Out", (), {"images": [Image.new("RGB", (64, 64)) for _ in kwargs["prompt"]]})()

    record = {"device": "cpu", "dtype": "float32", "sdpa": True, "channels_last": True, "compile": "off", "notes": []}

    def loader(s, device):
        return LoadedModel(spec=s, pipeline=_Pipe(), device="cpu", load_time_s=0.1, random_weights=True,
                           gpu=record, label=ARCH_LABEL)

    out = tmp_path / "p.yaml"
    profile_variants([spec], out, ProfileSettings(batch_sizes=(1,), repeats=1, warmup=0, loader=loader))
    model = read_model(out, ProfileFile, what="profile").models["sdxs"]
    assert model.gpu_options == record and model.label == ARCH_LABEL and model.source == "arch:sdxs"
    assert json.dumps(model.gpu_options)  # plain data in the file


def test_docs_arch_example_parses(tmp_path):
    """The arch variant file in docs/profile.md (the ```yml block) is a valid spec with its GPU flags."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "profile.md").read_text(encoding="utf-8")
    [block] = re.findall(r"```yml\n(.*?)```", text, flags=re.S)
    path = tmp_path / "arch.yaml"
    path.write_text(block)
    [spec] = resolve_variants(str(path))
    assert spec.source == "arch:sd-turbo" and spec.gpu.compile == "default" and spec.gpu.pinned_outputs
