"""Discriminator score files, quality tables, and the deferral curve f(t) they give.

Formats (the paper's artifact, qizhengyang98/DiffServe, and ``build-cascade --from-scores``):

* per-query discriminator scores: either the artifact's text format (one P(fake) per line, each
  query's images on consecutive lines; the query's confidence is ``1 - mean P(fake)``, as the
  artifact computes it), or a CSV with ``prompt,confidence`` columns;
* the cascade's quality (FID or CLIP score) against the fraction of queries answered by the light
  model, measured at a few fractions (the artifact's ``fid_vs_light_fraction.csv``).

f(t) is the empirical CDF of the confidences, evaluated exactly at every threshold of the grid.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffserve.errors import UserError
from diffserve.schemas import QualityMetric


def threshold_grid(points: int = 101) -> np.ndarray:
    if points < 2:
        raise ValueError(f"the threshold grid needs at least 2 points, got {points}")
    return np.round(np.linspace(0.0, 1.0, points), 6)


def deferral_curve(confidence: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """f(t): the fraction of queries with ``confidence < t``, for every t of the grid."""
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.size == 0:
        raise ValueError("no confidences to build f(t) from")
    return (conf[None, :] < np.asarray(grid)[:, None]).mean(axis=1)



#: Images per query in the artifact's score files (5,000 prompts x 4 images).
ARTIFACT_IMAGES_PER_QUERY = 4
#: The artifact's threshold grid: 201 points from 0 to 1.
DEFAULT_GRID_POINTS = 201
FRACTION_COLUMN = "light_fraction"


@dataclass(frozen=True)
class QualityTable:
    """Quality of the mixed output at increasing light fractions; the ends are the models alone."""

    metric: QualityMetric
    column: str
    light_fraction: tuple[float, ...]
    quality: tuple[float, ...]

    @property
    def q_heavy(self) -> float:
        return self.quality[0]

    @property
    def q_light(self) -> float:
        return self.quality[-1]

    def at_light_fraction(self, fractions: np.ndarray) -> np.ndarray:
        return np.interp(fractions, self.light_fraction, self.quality)


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: {text.strip()!r} is not a finite number")
    return value


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{what} {path} is empty")
    return text


def read_confidences(path: str | Path, *, images_per_query: int = ARTIFACT_IMAGES_PER_QUERY) -> np.ndarray:
    """One confidence per query, in file order, from either supported score format.

    A ``.csv`` needs a ``confidence`` column, one row per query (its ``prompt`` column is for
    people; f(t) needs only the confidences). Any other file is the artifact's format: P(fake) per
    image, ``images_per_query`` consecutive lines per query.
    """
    path = Path(path)
    if images_per_query < 1:
        raise UserError(f"images per query must be at least 1, got {images_per_query}")
    text = _read_text(path, "scores file")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "confidence" not in rows[0]:
            raise UserError(f"scores file {path} must have a header with a 'confidence' column (and 'prompt'), one row per query")
        conf = np.array([_number(r["confidence"] or "", f"{path} line {i + 2}") for i, r in enumerate(rows)])
    else:
        lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
        p_fake = np.array([_number(line, f"{path} line {n}") for n, line in lines])
        if len(p_fake) % images_per_query:
            raise UserError(
                f"scores file {path} has {len(p_fake)} scores, not a multiple of {images_per_query} images per query"
            )
        bad = np.flatnonzero((p_fake < 0) | (p_fake > 1))
        if bad.size:
            raise UserError(f"{path} line {lines[bad[0]][0]}: P(fake) {p_fake[bad[0]]:g} is outside [0, 1]")
        conf = 1.0 - p_fake.reshape(-1, images_per_query).mean(axis=1)
    bad = np.flatnonzero((conf < 0) | (conf > 1))
    if bad.size:
        raise UserError(f"{path}: confidence {conf[bad[0]]:g} of query {bad[0] + 1} is outside [0, 1]")
    return conf


def read_quality_table(path: str | Path, *, column: str | None = None, metric: str = "auto") -> QualityTable:
    """The quality-vs-light-fraction table: ``light_fraction`` plus one or more quality columns."""
    path = Path(path)
    text = _read_text(path, "quality table")
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or ()]
    if FRACTION_COLUMN not in header:
        raise UserError(f"quality table {path} needs a '{FRACTION_COLUMN}' column (has: {', '.join(header) or 'none'})")
    values = [h for h in header if h and h != FRACTION_COLUMN]
    if column is None:
        if len(values) != 1:
            raise UserError(f"quality table {path} has several quality columns ({', '.join(values)}); pick one with --quality-column")
        column = values[0]
    elif column not in values:
        raise UserError(f"quality table {path} has no column {column!r} (has: {', '.join(values) or 'none'})")
    rows = list(reader)
    fractions = [_number(r[FRACTION_COLUMN] or "", f"{path} line {i + 2}") for i, r in enumerate(rows)]
    quality = [_number(r[column] or "", f"{path} line {i + 2}") for i, r in enumerate(rows)]
    return quality_table(fractions, quality, column=column, metric=metric, where=f"quality table {path}")


def quality_table(
    fractions: list[float], quality: list[float], *, column: str, metric: str = "auto", where: str = "quality table"
) -> QualityTable:
    """A checked :class:`QualityTable`: fractions rise strictly from 0 (heavy alone) to 1 (light alone).

    ``where`` names the source in errors (a file and its rows, or the shipped data).
    """
    if len(fractions) != len(quality):
        raise UserError(f"{where}: {len(fractions)} light fractions but {len(quality)} quality values ({column})")
    if len(fractions) < 2:
        raise UserError(f"{where} needs at least two rows (light fractions 0 and 1)")
    for i, f in enumerate(fractions):
        if not 0.0 <= f <= 1.0:
            raise UserError(f"{where} row {i + 1}: light fraction {f:g} is outside [0, 1]")
    for i in range(1, len(fractions)):
        if fractions[i] <= fractions[i - 1]:
            raise UserError(f"{where} row {i + 1}: light fractions must increase strictly ({fractions[i - 1]:g} then {fractions[i]:g})")
    if fractions[0] != 0.0 or fractions[-1] != 1.0:
        raise UserError(
            f"{where} must start at light fraction 0 (heavy model alone) and end at 1 (light model alone), "
            f"got {fractions[0]:g} .. {fractions[-1]:g}"
        )
    if metric == "auto":
        metric = "clip" if "clip" in column.lower() else "fid"
    if metric not in ("fid", "clip"):
        raise UserError(f"the quality metric must be fid or clip, got {metric!r}")
    if metric == "fid" and min(quality) < 0:
        raise UserError(f"{where}: FID cannot be negative (column {column})")
    return QualityTable(metric=metric, column=column, light_fraction=tuple(fractions), quality=tuple(quality))  # type: ignore[arg-type]
