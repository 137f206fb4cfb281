"""Prompt loaders: every format, deterministic sampling, the built-in set and the user errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from diffserve.datasets import load_builtin, load_prompts
from diffserve.errors import UserError


def test_text_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    prompts = load_prompts(path)
    assert prompts.texts == ["a cat", "a dog"]
    assert [p.id for p in prompts] == ["000000", "000001"]


def test_diffusiondb_json_keeps_seed(tmp_path: Path) -> None:
    path = tmp_path / "part-000001.json"
    path.write_text(json.dumps({"img1.png": {"p": "a castle", "se": 42, "c": 7.0}, "img2.png": {"p": "a boat"}}))
    prompts = load_prompts(path)
    assert prompts.texts == ["a castle", "a boat"]
    assert prompts.prompts[0].id == "img1" and prompts.prompts[0].metadata["se"] == "42"


def test_diffusiondb_reference_list(reference_dir: Path) -> None:
    prompts = load_prompts(reference_dir / "prompts" / "diffusiondb_first_5k.txt", "diffusiondb", limit=10, seed=3)
    assert len(prompts) == 10


def test_coco_with_images(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val2017" / "000000000001.jpg")
    data = {
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A dog  on a couch."},
            {"id": 11, "image_id": 1, "caption": "second caption of image 1"},
            {"id": 12, "image_id": 2, "caption": "A kite."},
        ],
    }
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps(data))
    prompts = load_prompts(path)
    assert prompts.texts == ["A dog on a couch.", "A kite."]
    assert prompts.prompts[0].image_path == tmp_path / "val2017" / "000000000001.jpg"
    assert prompts.prompts[1].image_path is None  # missing on disk
    assert not prompts.has_images


def test_parti_keeps_category_and_challenge(tmp_path: Path) -> None:
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\nthree cats\tAnimals\tQuantity\tn\n")
    prompts = load_prompts(path)
    assert prompts.texts == ["bond", "three cats"]
    assert prompts.prompts[1].metadata == {"Category": "Animals", "Challenge": "Quantity", "Note": "n"}
    assert prompts.prompts[1].difficulty == "Quantity"


def test_sampling_is_deterministic_and_ordered() -> None:
    a = load_prompts("builtin", limit=20, seed=7)
    b = load_prompts("builtin", limit=20, seed=7)
    c = load_prompts("builtin", limit=20, seed=8)
    assert a.texts == b.texts and a.texts != c.texts
    ids = [p.id for p in a]
    assert ids == sorted(ids) and len(set(ids)) == 20


def test_builtin_set_spans_difficulties() -> None:
    prompts = load_builtin()
    assert 180 <= len(prompts) <= 240
    counts = Counter(p.difficulty for p in prompts)
    assert set(counts) == {"easy", "medium", "hard"} and min(counts.values()) >= 40
    hard_categories = {p.metadata["category"] for p in prompts if p.difficulty == "hard"}
    assert {"counting", "spatial", "text", "attributes", "style"} <= hard_categories
    assert len(set(prompts.texts)) == len(prompts)


@pytest.mark.parametrize(
    ("name", "content", "fmt", "message"),
    [
        ("missing.txt", None, "auto", "not found"),
        ("empty.txt", b"  \n\n", "auto", "empty"),
        ("bad.txt", b"a cat\n\xff\xfe broken", "auto", "not UTF-8"),
        ("prompts.xyz", b"a cat\n", "auto", "cannot tell the format"),
        ("p.txt", b"a cat\n", "yaml", "unknown prompt format"),
        ("c.json", b"{not json", "auto", "not valid JSON"),
        ("c.json", b'{"annotations": []}', "coco", "not an MS-COCO caption file"),
        ("p.tsv", b"text\tother\nx\ty\n", "auto", "no 'Prompt' column"),
    ],
)
def test_bad_inputs(tmp_path: Path, name: str, content: bytes | None, fmt: str, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_prompts(path, fmt)


def test_sample_size_must_be_positive() -> None:
    with pytest.raises(UserError, match="at least 1"):
        load_prompts("builtin", limit=0)
