"""``diffserve score`` and ``diffserve build-cascade`` end to end on the tiny zoo, and their user errors."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from diffserve.artifacts import load_cascade
from diffserve.models.discriminator import load_discriminator
from diffserve.cascade_builder.generation import open_images
from diffserve.cascade_builder.scoring import QualityFile
from diffserve.cli.main import app
from diffserve.fileio import read_model

runner = CliRunner()
FAST = ["--models", "tiny-turbo,tiny-small", "--prompts", "builtin", "-n", "9", "--clip-model", "ViT-S-32",
        "--clip-image-size", "32", "--batch-size", "9"]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.e2e
def test_build_cascade_end_to_end_and_resume(tmp_path) -> None:
    out = tmp_path / "run" / "cascade.yaml"
    cache = tmp_path / "cache"
    args = ["build-cascade", *FAST, "--cache-dir", str(cache), "--grid-points", "51"]
    result = runner.invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" in result.output

    cascade = load_cascade(out)
    assert cascade.random_weights
    pair = cascade.recommended()
    assert (pair.light, pair.heavy) == ("tiny-turbo", "tiny-small") and pair.recommended
    assert len(pair.grid) == len(pair.f_t) == len(pair.q_t) == 51
    assert pair.f_t[0] == 0.0 and pair.f_t[-1] == 1.0
    assert all(b >= a for a, b in zip(pair.f_t, pair.f_t[1:]))
    assert pair.q_t[0] == pytest.approx(pair.q_light, abs=1e-3)
    assert pair.q_t[-1] == pytest.approx(pair.q_heavy, abs=1e-3)
    assert pair.discriminator.random_weights and pair.discriminator.val_auc is not None
    assert pair.latency_ms["tiny-turbo"] > 0 and pair.latency_ms["tiny-small"] > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    details = json.loads(out.with_name("cascade.details.json").read_text())
    test_ids = details["splits"]["test"]
    assert len(details["pairs"][0]["confidence"]) == len(test_ids) == pair.n_eval_prompts

    # the server's entry point: the artifact path in cascade.yaml, resolved against the file's folder
    disc = load_discriminator(pair.discriminator.path, base=out)
    images = open_images(sorted(cache.glob("tiny-turbo-*/*.png"))[:3])
    conf = disc.confidence(images)
    assert conf.shape == (3,) and ((conf >= 0) & (conf < 1)).all()

    # a rerun finds every image in the cache and generates none
    generated = {p.name: json.loads(p.read_text())["generated_images"] for p in cache.glob("*/meta.json")}
    again = runner.invoke(app, [*args, "--output", str(tmp_path / "again.yaml")])
    assert again.exit_code == 0, again.output
    assert {p.name: json.loads(p.read_text())["generated_images"] for p in cache.glob("*/meta.json")} == generated
    assert load_cascade(tmp_path / "again.yaml").pairs[0].f_t == pair.f_t


@pytest.mark.slow
@pytest.mark.e2e
def test_score_writes_quality_and_per_image_scores(tmp_path) -> None:
    out = tmp_path / "quality.yaml"
    real = tmp_path / "real"
    real.mkdir()
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(real / f"{i}.png")
    result = runner.invoke(
        app, ["score", *FAST, "-n", "6", "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
              "--reference-images", str(real)]
    )
    assert result.exit_code == 0, result.output
    quality = read_model(out, QualityFile)
    assert quality.random_weights and quality.clip_random_weights and quality.fid_random_weights
    assert set(quality.variants) == {"tiny-turbo", "tiny-small"}
    for v in quality.variants.values():
        assert v.n_images == 6 and v.clip_ci95[0] <= v.clip_score <= v.clip_ci95[1]
        assert v.fid is None and v.kid is not None  # 6 images: too few for FID, KID instead
    rows = list(csv.DictReader(out.with_name("quality.per_image.csv").open()))
    assert len(rows) == 12 and {r["variant"] for r in rows} == {"tiny-turbo", "tiny-small"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts", "missing.txt"], "prompt file not found"),
        (["--prompts", "builtin", "--prompt-format", "csv"], "unknown prompt format"),
        (["--backbone", "resnet"], "--backbone must be clip or efficientnet"),
        (["--metric", "psnr"], "--metric must be"),
        (["--split", "0.5,0.5"], "three positive fractions"),
        (["--real-images", "no/such/dir"], "not found"),
        (["--clip-weights", "no/such/file.pt"], "--clip-weights file not found"),
        (["--inception-weights", "no/such/file.pth"], "--inception-weights file not found"),
        (["--backbone-weights", "w.pth"], "--backbone-weights needs --backbone efficientnet"),
        (["--models", "no-such-model"], "no-such-model"),
        (["--profile", "no/such/profile.yaml"], "not found"),
    ],
)
def test_build_cascade_user_errors(tmp_path, monkeypatch, extra: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["build-cascade", "--models", "tiny-turbo,tiny-small", "--cache-dir", "c", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_empty_and_undecodable_prompt_files(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 prompt")
    for path, message in ((empty, "is empty"), (bad, "not UTF-8")):
        result = runner.invoke(app, ["score", "--models", "tiny-turbo", "--prompts", str(path)])
        assert result.exit_code == 2 and message in result.output
