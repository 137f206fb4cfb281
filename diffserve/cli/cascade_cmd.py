"""``diffserve score`` and ``diffserve build-cascade``: quality of each model, and the measured cascade.

Heavy libraries (torch, open_clip, diffusers) are imported inside the commands so that
``diffserve --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffserve.cli._common import cli_errors, console, err_console, option_group, warn_random_weights

DEFAULT_CACHE = Path(".diffserve-cache/images")


def register(app: typer.Typer) -> None:
    app.command("score")(score)
    app.command("build-cascade")(build_cascade)


@dataclass
class ImageRun:
    """The options of ``score`` and ``build-cascade``: which models generate which prompts, how the
    images are made and cached, and how CLIP and FID read them. Its methods turn them into what the
    cascade builder takes, checked once for both commands."""

    models: Annotated[str, typer.Option("--models", "-m", help="builtin, built-in/preset names (sd-turbo,sd-v1.5) or variant YAML files, comma-separated.")] = "builtin"
    prompts: Annotated[str, typer.Option("--prompts", help="builtin, or a prompt file: .txt, DiffusionDB .txt/.json/.parquet, COCO captions .json, PartiPrompts .tsv.")] = "builtin"
    prompt_format: Annotated[str, typer.Option("--prompt-format", help="auto | text | diffusiondb | coco | parti | builtin")] = "auto"
    num_prompts: Annotated[Optional[int], typer.Option("--num-prompts", "-n", min=1, help="Sample this many prompts (seeded); default all.")] = None
    coco_images: Annotated[Optional[Path], typer.Option("--coco-images", help="MS-COCO image folder (default: val2017 next to the captions file).")] = None
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", min=1, help="Images generated per prompt and model.")] = 1
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="Image cache (resumable: rerunning generates only what is missing).")] = DEFAULT_CACHE
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Generation batch size.")] = 8
    seed: Annotated[int, typer.Option("--seed", help="Seed of prompt sampling, splits and image seeds.")] = 0
    clip_model: Annotated[str, typer.Option("--clip-model", help="open_clip model name (ViT-B-32, ViT-L-14, ViT-S-32 ...).")] = "ViT-B-32"
    clip_pretrained: Annotated[Optional[str], typer.Option("--clip-pretrained", help="open_clip pretrained tag, e.g. openai (downloads: online only).")] = None
    clip_weights: Annotated[Optional[Path], typer.Option("--clip-weights", help="Local open_clip checkpoint file (offline real weights).")] = None
    clip_image_size: Annotated[Optional[int], typer.Option("--clip-image-size", min=16, help="Force CLIP's input size (default: the model's own; 96 px with random weights).")] = None
    inception_weights: Annotated[Optional[Path], typer.Option("--inception-weights", help="Local FID Inception-v3 weights (pt_inception-2015-12-05). Without it FID/KID use a RANDOM feature net.")] = None
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N, mps (default: the variant's own).")] = None
    feature_device: Annotated[str, typer.Option("--feature-device", help="Where CLIP, the FID net and the discriminator run: cpu, cuda, cuda:N.")] = "cpu"
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads.")] = 1

    def variants(self):
        from diffserve.models import resolve_variants

        return resolve_variants(self.models)

    def prompt_set(self):
        from diffserve.datasets import load_prompts

        return load_prompts(self.prompts, self.prompt_format, limit=self.num_prompts, seed=self.seed, images_dir=self.coco_images)

    def run_options(self) -> dict:
        """The fields of :class:`~diffserve.cascade_builder.scoring.ImageRunOptions`, checked."""
        return dict(images_per_prompt=self.images_per_prompt, cache_dir=self.cache_dir, batch_size=self.batch_size, seed=self.seed,
                    clip=self._clip(), fid=self._fid(), feature_device=self.feature_device)

    def _clip(self):
        from diffserve.models.clip import ClipConfig
        from diffserve.errors import UserError

        if self.clip_pretrained and self.clip_weights:
            raise UserError("give either --clip-pretrained or --clip-weights, not both")
        if self.clip_weights is not None and not self.clip_weights.is_file():
            raise UserError(f"--clip-weights file not found: {self.clip_weights}")
        weights = str(self.clip_weights) if self.clip_weights else None
        return ClipConfig(model=self.clip_model, pretrained=self.clip_pretrained, weights=weights, image_size=self.clip_image_size, seed=self.seed)

    def _fid(self):
        from diffserve.cascade_builder.fid import FidConfig
        from diffserve.errors import UserError

        if self.inception_weights is not None and not self.inception_weights.is_file():
            raise UserError(f"--inception-weights file not found: {self.inception_weights}")
        return FidConfig(inception_weights=str(self.inception_weights) if self.inception_weights else None, seed=self.seed)

    def loader(self):
        """The model loader, after setting torch's CPU threads (--threads)."""
        from diffserve.cascade_builder.generation import default_loader
        from diffserve.models import set_torch_threads

        set_torch_threads(self.threads)
        return default_loader(self.device)


@cli_errors
@option_group("run", ImageRun)
def score(
    run: ImageRun = ImageRun(),
    reference_images: Annotated[Optional[Path], typer.Option("--reference-images", help="Folder of real images for FID/KID (COCO captions bring their own).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="quality.yaml to write (per-image scores go next to it).")] = Path("quality.yaml"),
) -> None:
    """Generate images for a prompt set with each model and score them: CLIP score, FID/KID."""
    from diffserve.cascade_builder.scoring import ScoreOptions, score_variants

    specs = run.variants()
    prompt_set = run.prompt_set()
    options = ScoreOptions(**run.run_options(), reference_images=reference_images)
    quality = score_variants(specs, prompt_set, output, options, run.loader(), console=err_console)
    from rich.table import Table

    table = Table(title=f"quality on {prompt_set.name} ({len(prompt_set)} prompts)")
    for col in ("model", "images", "CLIP score", "95% CI", "FID", "KID", "ms/image"):
        table.add_column(col)
    for v in quality.variants.values():
        table.add_row(
            v.name, str(v.n_images), f"{v.clip_score:.3f}", f"{v.clip_ci95[0]:.3f} .. {v.clip_ci95[1]:.3f}",
            "-" if v.fid is None else f"{v.fid:.3f}", "-" if v.kid is None else f"{v.kid:.5f}",
            "-" if v.ms_per_image is None else f"{v.ms_per_image:.1f}",
        )
    console.print(table)
    if quality.random_weights:
        warn_random_weights("score (diffusion models, CLIP or FID features)")
    console.print(f"quality written to {output} (per image: {output.with_name(quality.per_image_file)})")


@cli_errors
@option_group("run", ImageRun)
def build_cascade(
    run: ImageRun = ImageRun(),
    output: Annotated[Path, typer.Option("--output", "-o", help="cascade.yaml to write (plot, details and discriminators go next to it).")] = Path("cascade.yaml"),
    real_images: Annotated[Optional[Path], typer.Option("--real-images", help="Folder of real images: the discriminator's positive class (the paper's method). Default: the heavy model's images.")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="profile.yaml or 'reference' for the latency references; default: generation time measured here ('reference' with --from-scores, which needs the models in it).")] = None,
    backbone: Annotated[str, typer.Option("--backbone", help="clip (frozen open_clip features + logistic regression) | efficientnet (EfficientNet-V2-S fine-tuned, the paper's).")] = "clip",
    backbone_weights: Annotated[Optional[Path], typer.Option("--backbone-weights", help="EfficientNet-V2-S weights file (e.g. torchvision ImageNet); default random init.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="EfficientNet fine-tuning epochs.")] = 3,
    backbone_image_size: Annotated[int, typer.Option("--backbone-image-size", min=32, help="EfficientNet input size.")] = 128,
    metric: Annotated[str, typer.Option("--metric", help="auto | clip | fid: the quality curve's unit (auto: FID when real images and enough test images).")] = "auto",
    grid_points: Annotated[Optional[int], typer.Option("--grid-points", min=2, help="Thresholds in the grid from 0 to 1 (default 101; 201, the artifact's grid, with --from-scores).")] = None,
    split: Annotated[str, typer.Option("--split", help="train,val,test fractions of the prompts.")] = "0.5,0.2,0.3",
    keep_all_pairs: Annotated[bool, typer.Option("--keep-all-pairs", help="Also write pairs that are not on the cost/quality Pareto front.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG of f(t) and Q(t) (default: next to the output).")] = None,
    from_scores: Annotated[Optional[Path], typer.Option("--from-scores", help="Build from offline discriminator scores instead of images: the artifact's P(fake) text file or a CSV of prompt,confidence.")] = None,
    quality_table: Annotated[Optional[Path], typer.Option("--quality-table", help="With --from-scores: CSV of light_fraction and FID (or CLIP) columns.")] = None,
    quality_column: Annotated[Optional[str], typer.Option("--quality-column", help="With --from-scores: the quality table's column to use (needed when it has several).")] = None,
    light: Annotated[Optional[str], typer.Option("--light", help="With --from-scores: the light model (a name in the profile).")] = None,
    heavy: Annotated[Optional[str], typer.Option("--heavy", help="With --from-scores: the heavy model (a name in the profile).")] = None,
    images_per_query: Annotated[int, typer.Option("--images-per-query", min=1, help="With --from-scores and the artifact's text format: consecutive scores per query.")] = 4,
) -> None:
    """Train the discriminator and measure f(t) and Q(t) for every (light, heavy) pair: writes cascade.yaml.

    With --from-scores it generates no image: f(t) comes from the given scores, Q(t) from the quality table.
    """
    import time

    from diffserve.errors import UserError

    if from_scores is not None:
        _build_from_scores(from_scores, quality_table, quality_column, light, heavy, profile, metric, grid_points, images_per_query, output)
        return
    for flag, value in (("--quality-table", quality_table), ("--quality-column", quality_column), ("--light", light), ("--heavy", heavy)):
        if value is not None:
            raise UserError(f"{flag} only applies with --from-scores")

    from diffserve.artifacts import load_profile
    from diffserve.cascade_builder.build import BuildOptions
    from diffserve.cascade_builder.build import build_cascade as run_build

    if backbone not in ("clip", "efficientnet"):
        raise UserError(f"--backbone must be clip or efficientnet, got {backbone!r}")
    if metric not in ("auto", "clip", "fid"):
        raise UserError(f"--metric must be auto, clip or fid, got {metric!r}")
    if backbone_weights is not None and backbone != "efficientnet":
        raise UserError("--backbone-weights needs --backbone efficientnet")
    if backbone_weights is not None and not backbone_weights.is_file():
        raise UserError(f"--backbone-weights file not found: {backbone_weights}")
    try:
        fractions = tuple(float(x) for x in split.split(","))
    except ValueError:
        raise UserError(f"--split must look like 0.5,0.2,0.3, got {split!r}") from None
    if len(fractions) != 3 or any(f <= 0 for f in fractions):
        raise UserError(f"--split needs three positive fractions train,val,test, got {split!r}")
    specs = run.variants()
    prompt_set = run.prompt_set()
    options = BuildOptions(
        **run.run_options(), real_images=real_images, backbone=backbone,  # type: ignore[arg-type]
        backbone_weights=str(backbone_weights) if backbone_weights else None, epochs=epochs,
        backbone_image_size=backbone_image_size, metric=metric,  # type: ignore[arg-type]
        grid_points=grid_points or 101, split=fractions, keep_all_pairs=keep_all_pairs,  # type: ignore[arg-type]
        profile=load_profile(profile) if profile else None, plot=plot,
    )
    loader = run.loader()
    start = time.perf_counter()
    cascade = run_build(specs, prompt_set, output, options, loader, console=err_console)
    if cascade.random_weights:
        warn_random_weights("build-cascade (diffusion models, CLIP or FID features)")
    best = cascade.recommended()
    console.print(
        f"cascade written to {output} ({len(cascade.pairs)} pair(s), recommended {best.name}); "
        f"plot {plot or output.with_suffix('.png')}; {time.perf_counter() - start:.0f} s"
    )


def _build_from_scores(
    scores: Path, quality_table: Optional[Path], column: Optional[str], light: Optional[str], heavy: Optional[str],
    profile: Optional[str], metric: str, grid_points: Optional[int], images_per_query: int, output: Path,
) -> None:
    from diffserve.artifacts import load_profile
    from diffserve.cascade_builder.from_scores import DEFAULT_GRID_POINTS, build_cascade_from_scores
    from diffserve.errors import UserError

    missing = [flag for flag, value in (("--quality-table", quality_table), ("--light", light), ("--heavy", heavy)) if value is None]
    if missing:
        raise UserError(f"--from-scores needs {', '.join(missing)}")
    if metric not in ("auto", "clip", "fid"):
        raise UserError(f"--metric must be auto, clip or fid, got {metric!r}")
    cascade = build_cascade_from_scores(
        scores, quality_table, light=light, heavy=heavy, profile=load_profile(profile or "reference"),  # type: ignore[arg-type]
        output=output, column=column, metric=metric, images_per_query=images_per_query,
        grid_points=grid_points or DEFAULT_GRID_POINTS,
    )
    pair = cascade.pairs[0]
    best = min(range(len(pair.q_t)), key=lambda i: pair.q_t[i] if pair.lower_is_better else -pair.q_t[i])
    console.print(
        f"cascade {pair.name} written to {output}: {pair.n_eval_prompts} queries, {len(pair.grid)} thresholds; "
        f"best {pair.metric.upper()} {pair.q_t[best]:.2f} at t = {pair.grid[best]:g} (defers {pair.f_t[best]:.1%})"
    )
