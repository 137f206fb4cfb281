"""The model layer: variant specs, the built-in random-weight zoo, the loader and its errors."""

from __future__ import annotations

import re
import shutil
import time

import numpy as np
import pytest

from diffserve.errors import UserError
from diffserve.models import (
    RANDOM_WEIGHTS_MARKER,
    GenerationTimeout,
    VariantSpec,
    builtin_variants,
    ensure_builtin,
    load_variant,
    resolve_variants,
    set_torch_threads,
)
from diffserve.models.zoo import build_pipeline, builtin_dir


@pytest.fixture(scope="session")
def turbo(zoo_cache):
    return load_variant(resolve_variants("tiny-turbo")[0], device="cpu")


def _arrays(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_builtin_zoo_is_ordered_light_to_heavy():
    specs = builtin_variants()
    assert [s.name for s in specs][:3] == ["tiny-turbo", "tiny-small", "tiny-base"]
    assert [s.steps for s in specs][:3] == [1, 4, 25]
    assert all(s.source == f"builtin:{s.name}" for s in specs)
    assert specs[2].uses_cfg and not specs[0].uses_cfg


#: Token ids of OpenAI CLIP (openai/clip-vit-large-patch14, also open_clip's SimpleTokenizer) for these prompts.
CLIP_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "An astronaut riding a horse, 4k, trending on ArtStation!!": [
        49406, 550, 18376, 6765, 320, 4558, 267, 275, 330, 267, 6087, 525, 1486, 2631, 748, 49407,
    ],
    "hello world's café": [49406, 3306, 1002, 568, 15304, 49407],
}


def test_clip_tokenizer_gives_clip_ids(tmp_path):
    from diffserve.models.tokenizer import VOCAB_SIZE, build_clip_tokenizer

    ours = build_clip_tokenizer(tmp_path)
    assert len(ours) == VOCAB_SIZE
    for prompt, ids in CLIP_IDS.items():
        assert ours(prompt).input_ids == ids
    batch = ours(["x " * 200, "a cat"], padding="max_length", truncation=True, max_length=77).input_ids
    assert [len(row) for row in batch] == [77, 77]
    assert batch[0][-1] == 49407 and batch[1][:4] == [49406, 320, 2368, 49407]


def test_tiny_turbo_generates_seeded_images(turbo):
    assert turbo.random_weights is True
    assert turbo.device == "cpu" and turbo.load_time_s > 0
    a = turbo.generate(["a red cube", "a blue sphere"], seeds=[1, 2])
    b = turbo.generate(["a red cube", "a blue sphere"], seeds=[1, 2])
    c = turbo.generate(["a red cube", "a blue sphere"], seeds=[3, 2])
    assert [im.size for im in a] == [(64, 64), (64, 64)]
    assert all((x == y).all() for x, y in zip(_arrays(a), _arrays(b)))
    assert not (_arrays(a)[0] == _arrays(c)[0]).all()
    assert (_arrays(a)[1] == _arrays(c)[1]).all()
    with pytest.raises(UserError, match="one seed per prompt"):
        turbo.generate(["a", "b"], seeds=[1])


def test_deadline_stops_the_run(turbo):
    with pytest.raises(GenerationTimeout):
        turbo.generate(["a"], seeds=[0], deadline=time.monotonic() - 1)


def test_builtin_is_cached_and_deterministic(zoo_cache, tmp_path):
    import torch

    folder = ensure_builtin("tiny-turbo")
    assert folder == builtin_dir("tiny-turbo") and folder.is_relative_to(zoo_cache)
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_builtin("tiny-turbo") == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert "RANDOM WEIGHTS" in (folder / RANDOM_WEIGHTS_MARKER).read_text()
    fresh = build_pipeline("tiny-turbo", tokenizer_dir=tmp_path / "tok")
    from safetensors.torch import load_file

    saved = load_file(next((folder / "unet").glob("*.safetensors")))
    for key, value in fresh.unet.state_dict().items():
        assert torch.equal(saved[key], value), key


def test_tiny_base_has_the_bigger_unet(zoo_cache):
    import diffusers

    sizes = {}
    for name in ("tiny-turbo", "tiny-base"):
        unet = diffusers.UNet2DConditionModel.from_pretrained(ensure_builtin(name) / "unet")
        sizes[name] = sum(p.numel() for p in unet.parameters())
    assert sizes["tiny-base"] > 3 * sizes["tiny-turbo"]


def test_load_from_saved_local_directory(turbo, tmp_path):
    folder = tmp_path / "my-model"
    turbo.pipeline.save_pretrained(folder)
    spec = VariantSpec(name="mine", source=str(folder), steps=1, guidance_scale=0.0, resolution=64)
    mine = load_variant(spec, device="cpu")
    assert type(mine.pipeline).__name__ == "StableDiffusionPipeline"  # auto: read from model_index.json
    assert mine.random_weights is False  # no marker: diffserve cannot know, and does not claim
    ours = mine.generate(["a boat"], seeds=[7])
    theirs = turbo.generate(["a boat"], seeds=[7])
    assert (_arrays(ours)[0] == _arrays(theirs)[0]).all()

    copied = tmp_path / "copied"
    shutil.copytree(ensure_builtin("tiny-turbo"), copied)
    assert load_variant(spec.model_copy(update={"source": str(copied)}), device="cpu").random_weights is True


def test_scheduler_override(zoo_cache):
    spec = resolve_variants("tiny-small")[0].model_copy(update={"scheduler": "euler-a"})
    model = load_variant(spec, device="cpu")
    assert type(model.pipeline.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert len(model.generate(["a"], seeds=[0])) == 1


def _spec(**update) -> VariantSpec:
    base = {"name": "x", "source": "builtin:tiny-turbo", "steps": 1, "guidance_scale": 0.0, "resolution": 64}
    return VariantSpec(**{**base, **update})


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"source": "ftp://example.org/model"}, "unknown model source 'ftp://example.org/model'"),
        ({"source": "builtin:tiny-nope"}, "unknown built-in model 'tiny-nope'"),
        ({"source": "./no/such/dir"}, "local model not found: ./no/such/dir"),
        ({"source": "diffserve-test/not-a-cached-model"}, "not in the local Hugging Face cache and the machine is offline"),
        ({"pipeline_class": "NoSuchPipeline"}, "unknown pipeline class 'NoSuchPipeline'"),
        ({"dtype": "float16", "device": "cpu"}, "dtype float16 is not supported on device cpu"),
        ({"scheduler": "warp-drive"}, "unknown scheduler 'warp-drive'"),
    ],
)
def test_bad_sources_fail_with_one_line(update, message, zoo_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_variant(_spec(**update))
    assert "\n" not in str(info.value)


def test_directory_without_model_index(tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        load_variant(_spec(source=str(tmp_path)))


def test_broken_local_models_fail_with_one_line(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not load 'x' from .*model.safetensors with StableDiffusionPipeline"):
        load_variant(_spec(source=str(weights)), device="cpu")
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(UserError, match="could not load 'x' from .*half with DiffusionPipeline") as info:
        load_variant(_spec(source=str(folder)), device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="is a file but not a weight file"):
        load_variant(_spec(source=str(folder / "model_index.json")))


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="divisible by 8 but is 65"):
        _spec(resolution=65)
    with pytest.raises(ValueError, match="dtype must be one of"):
        _spec(dtype="int8")
    assert _spec(dtype="fp16").dtype == "float16"
    with pytest.raises(ValueError, match="Extra inputs"):
        VariantSpec.model_validate({**_spec().model_dump(), "stpes": 3})


def test_resolve_variants_words_and_files(tmp_path):
    assert [s.name for s in resolve_variants("builtin")] == [s.name for s in builtin_variants()]
    assert [s.name for s in resolve_variants("tiny-base, builtin:tiny-turbo,tiny-base")] == ["tiny-base", "tiny-turbo"]
    assert resolve_variants(["sd-turbo"])[0].source == "stabilityai/sd-turbo"
    one = tmp_path / "one.yaml"
    one.write_text("name: mine\nsource: ./models/mine\nsteps: 4\nguidance_scale: 1.0\nresolution: 512\n")
    many = tmp_path / "many.yaml"
    many.write_text(
        "variants:\n"
        "  - {name: a, source: org/a, steps: 1, guidance_scale: 0, resolution: 512, dtype: fp16, device: cuda}\n"
        "  - {name: b, source: builtin:tiny-base, steps: 10, guidance_scale: 7.5, resolution: 64}\n"
    )
    specs = resolve_variants(f"{one},{many}")
    assert [(s.name, s.steps, s.dtype) for s in specs] == [("mine", 4, "float32"), ("a", 1, "float16"), ("b", 10, "float32")]
    with pytest.raises(UserError, match="unknown model 'nope'"):
        resolve_variants("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: builtin:tiny-turbo\nsteps: 0\nguidance_scale: 0\nresolution: 64\n")
    with pytest.raises(UserError, match="steps"):
        resolve_variants(str(bad))
    with pytest.raises(UserError, match="not found"):
        resolve_variants(str(tmp_path / "missing.yaml"))


def test_set_torch_threads():
    import torch

    before = torch.get_num_threads()
    set_torch_threads(1)
    assert torch.get_num_threads() == 1
    with pytest.raises(UserError, match="at least 1"):
        set_torch_threads(0)
    torch.set_num_threads(before)
