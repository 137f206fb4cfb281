"""Readers of the prompt datasets the paper and its successors use, into one :class:`PromptSet`.

Formats: plain text (one prompt per line), DiffusionDB (its plain prompt lists, its per-part JSON
metadata, or its parquet metadata when pyarrow is installed), MS-COCO caption JSON (with the real
image of each caption when the image folder is present) and PartiPrompts TSV (Category and
Challenge kept as metadata). Every failure a user can cause (missing or empty file, unknown format,
undecodable text, a JSON of the wrong shape) raises :class:`UserError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path
from typing import Callable

from diffserve.datasets.prompts import Prompt, PromptSet, safe_id
from diffserve.errors import UserError

BUILTIN = "builtin"
#: DiffusionDB's first 5,000 prompts (CC0), the list the paper's traces index: shipped with diffserve
#: (or the artifact's own file, with --reference-dir)
DIFFUSIONDB_5K = "diffusiondb-5k"
FORMATS = ("auto", "text", "diffusiondb", "coco", "parti", "builtin")


def read_text(path: Path, *, what: str = "prompt file") -> str:
    """UTF-8 text of ``path`` (a BOM is dropped), with user errors for the usual mistakes."""
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if path.is_dir():
        raise UserError(f"{what} must be a file, got the directory {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what} {path} is not UTF-8 text (undecodable byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    if not text.strip():
        raise UserError(f"{what} {path} is empty")
    return text


def _nonempty(name: str, prompts: list[Prompt], path: Path) -> PromptSet:
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts")
    return PromptSet(name=name, prompts=prompts)


def load_text(path: Path) -> PromptSet:
    """One prompt per line; blank lines are skipped; ids are the 0-based line numbers of prompts."""
    return _nonempty(path.name, _from_lines(read_text(path).splitlines()), path)


def _from_lines(raw: list[str]) -> list[Prompt]:
    lines = [line.strip() for line in raw]
    return [Prompt(id=f"{i:06d}", text=line) for i, line in enumerate(line for line in lines if line)]


def load_diffusiondb_5k() -> PromptSet:
    """DiffusionDB's first 5,000 prompts, read as a text file is (blank lines skipped)."""
    from diffserve.reference import diffusiondb_prompt_lines

    return PromptSet(name=DIFFUSIONDB_5K, prompts=_from_lines(diffusiondb_prompt_lines()))


def load_diffusiondb(path: Path) -> PromptSet:
    """DiffusionDB: a plain prompt list (.txt), a part's JSON metadata or the parquet metadata table.

    The JSON of a part maps image file names to ``{"p": prompt, "se": seed, "c": cfg, ...}``; the
    image name becomes the id and seed/cfg/steps are kept as metadata.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _load_diffusiondb_parquet(path)
    if suffix != ".json":
        return load_text(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "p" in v for v in data.values()):
        raise UserError(f"{path} is not DiffusionDB part metadata (expected {{image name: {{'p': prompt, ...}}}})")
    prompts = []
    for image_name, meta in data.items():
        text = str(meta["p"]).strip()
        if not text:
            continue
        extra = {k: str(meta[k]) for k in ("se", "c", "st", "sa") if k in meta}
        prompts.append(Prompt(id=safe_id(Path(image_name).stem), text=text, metadata=extra))
    return _nonempty(path.name, prompts, path)


def _load_diffusiondb_parquet(path: Path) -> PromptSet:
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading DiffusionDB parquet metadata needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    if "prompt" not in table.column_names:
        raise UserError(f"{path} has no 'prompt' column (columns: {', '.join(table.column_names)})")
    names = table.column("image_name").to_pylist() if "image_name" in table.column_names else None
    prompts = []
    for i, text in enumerate(table.column("prompt").to_pylist()):
        if text and str(text).strip():
            pid = safe_id(Path(names[i]).stem) if names else f"{i:06d}"
            prompts.append(Prompt(id=pid, text=str(text).strip()))
    return _nonempty(path.name, prompts, path)


def load_coco(path: Path, images_dir: Path | None = None) -> PromptSet:
    """MS-COCO captions (``captions_val2017.json``): the first caption of each image.

    One caption per image keeps prompts and real images one to one, as the paper's FID does. The
    image folder is ``images_dir`` or, when not given, ``val2017`` next to the JSON or next to its
    ``annotations`` folder; image paths are set only for files that exist.
    """
    data = _read_json(path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise UserError(f"{path} is not an MS-COCO caption file (expected 'images' and 'annotations' keys)")
    files = {img["id"]: img.get("file_name") for img in data["images"] if isinstance(img, dict) and "id" in img}
    folder = images_dir or _find_coco_images(path)
    if images_dir is not None and not images_dir.is_dir():
        raise UserError(f"COCO image folder not found: {images_dir}")
    first: dict[int, dict] = {}
    for ann in sorted(data["annotations"], key=lambda a: a.get("id", 0)):
        if isinstance(ann, dict) and "image_id" in ann and str(ann.get("caption", "")).strip():
            first.setdefault(ann["image_id"], ann)
    prompts = []
    for image_id in sorted(first):
        ann = first[image_id]
        file_name = files.get(image_id)
        image_path = folder / file_name if folder is not None and file_name else None
        prompts.append(
            Prompt(
                id=f"coco{image_id}",
                text=" ".join(str(ann["caption"]).split()),
                metadata={"image_id": str(image_id), "file_name": str(file_name or "")},
                image_path=image_path if image_path is not None and image_path.is_file() else None,
            )
        )
    return _nonempty(path.name, prompts, path)


def _find_coco_images(path: Path) -> Path | None:
    for candidate in (path.parent / "val2017", path.parent.parent / "val2017"):
        if candidate.is_dir():
            return candidate
    return None


def load_parti(path: Path) -> PromptSet:
    """PartiPrompts TSV with a header row: Prompt, Category, Challenge (and Note)."""
    reader = csv.DictReader(io.StringIO(read_text(path)), delimiter="\t")
    fields = reader.fieldnames or []
    if "Prompt" not in fields:
        raise UserError(f"{path} is not a PartiPrompts TSV: no 'Prompt' column in the header {fields}")
    prompts = []
    for i, row in enumerate(reader):
        text = (row.get("Prompt") or "").strip()
        if not text:
            continue
        meta = {k: (row.get(k) or "").strip() for k in ("Category", "Challenge", "Note") if row.get(k)}
        prompts.append(Prompt(id=f"parti{i:04d}", text=text, difficulty=meta.get("Challenge"), metadata=meta))
    return _nonempty(path.name, prompts, path)


def load_builtin() -> PromptSet:
    """diffserve's own ~200 prompts, each tagged easy/medium/hard with a category.

    File format: ``difficulty<TAB>category<TAB>prompt`` per line, ``#`` comments.
    """
    text = resources.files("diffserve").joinpath("data", "prompts_builtin.txt").read_text(encoding="utf-8")
    prompts = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        difficulty, category, prompt = line.split("\t")
        prompts.append(
            Prompt(id=f"b{len(prompts):03d}", text=prompt.strip(), difficulty=difficulty, metadata={"category": category})
        )
    return PromptSet(name=BUILTIN, prompts=prompts)


def _read_json(path: Path) -> object:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


def detect_format(path: Path) -> str:
    """The format of ``path`` from its extension and, for JSON, its shape."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".prompts"):
        return "text"
    if suffix == ".tsv":
        return "parti"
    if suffix == ".parquet":
        return "diffusiondb"
    if suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        if isinstance(data, dict):
            return "diffusiondb"
    raise UserError(
        f"cannot tell the format of {path}: use .txt (one prompt per line), .tsv (PartiPrompts), "
        ".json (MS-COCO captions or DiffusionDB metadata) or .parquet, or pass --prompt-format "
        f"({', '.join(f for f in FORMATS if f != 'auto')})"
    )


_LOADERS: dict[str, Callable[[Path], PromptSet]] = {
    "text": load_text,
    "diffusiondb": load_diffusiondb,
    "parti": load_parti,
}


def load_prompts(
    spec: str | Path,
    fmt: str = "auto",
    *,
    limit: int | None = None,
    seed: int = 0,
    images_dir: Path | None = None,
) -> PromptSet:
    """Load ``spec`` (a path, ``builtin`` or ``diffusiondb-5k``) and sample ``limit`` prompts with ``seed``.

    ``images_dir`` is the COCO image folder (only meaningful for the ``coco`` format).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown prompt format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if str(spec) == BUILTIN or fmt == BUILTIN:
        prompts = load_builtin()
    elif str(spec) == DIFFUSIONDB_5K and not Path(spec).exists():
        prompts = load_diffusiondb_5k()
    else:
        path = Path(spec)
        if not path.exists():
            raise UserError(f"prompt file not found: {path}")
        kind = detect_format(path) if fmt == "auto" else fmt
        prompts = load_coco(path, images_dir) if kind == "coco" else _LOADERS[kind](path)
    return prompts.sample(limit, seed)
