"""``build-cascade --from-scores``: a cascade from offline discriminator scores and a quality table.

No image is generated. The two inputs are what an offline evaluation (or the paper's artifact)
already has:

* per-query discriminator scores: either the artifact's text format (one P(fake) per line, each
  query's images on consecutive lines; the query's confidence is ``1 - mean P(fake)``, as the
  artifact computes it), or a CSV with ``prompt,confidence`` columns;
* the cascade's quality (FID or CLIP score) against the fraction of queries answered by the light
  model, measured at a few fractions (the artifact's ``fid_vs_light_fraction.csv``).

f(t) is the empirical CDF of the confidences, evaluated exactly at every threshold of the grid
(:func:`~diffserve.formats.scores.deferral_curve`, the same function the image path uses), and
Q(t) is the quality table at light fraction ``1 - f(t)``, interpolated linearly between its rows
(the artifact interpolates the same table). The readers and the pair builder are core parsers
(:mod:`diffserve.formats`), shared with the reference scenario; this module adds the file output.
"""

from __future__ import annotations

from pathlib import Path

from diffserve.fileio import write_model
from diffserve.formats.pair import pair_from_scores
from diffserve.formats.scores import (
    ARTIFACT_IMAGES_PER_QUERY,
    DEFAULT_GRID_POINTS,
    QualityTable,
    read_confidences,
    read_quality_table,
)
from diffserve.schemas import CascadeFile, ProfileFile

__all__ = [
    "ARTIFACT_IMAGES_PER_QUERY", "DEFAULT_GRID_POINTS", "QualityTable", "build_cascade_from_scores",
    "pair_from_scores", "read_confidences", "read_quality_table",
]


def build_cascade_from_scores(
    scores: str | Path,
    quality_table: str | Path,
    *,
    light: str,
    heavy: str,
    profile: ProfileFile,
    output: str | Path,
    column: str | None = None,
    metric: str = "auto",
    images_per_query: int = ARTIFACT_IMAGES_PER_QUERY,
    grid_points: int = DEFAULT_GRID_POINTS,
) -> CascadeFile:
    """Read, validate, build one recommended pair and write ``cascade.yaml`` atomically."""
    confidence = read_confidences(scores, images_per_query=images_per_query)
    table = read_quality_table(quality_table, column=column, metric=metric)
    source = f"from scores {Path(scores).name} and quality table {Path(quality_table).name} ({table.column})"
    pair = pair_from_scores(
        confidence, table, light=light, heavy=heavy, profile=profile, grid_points=grid_points, source=source, recommended=True
    )
    cascade = CascadeFile(source=f"diffserve build-cascade --from-scores: {source}", pairs=[pair])
    write_model(output, cascade)
    return cascade
