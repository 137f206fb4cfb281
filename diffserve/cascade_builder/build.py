"""``diffserve build-cascade``: from variants and prompts to a measured ``cascade.yaml``.

Steps: split the prompts (train / validation / test, by prompt so that no prompt's images leak
across splits); generate every variant's images (cached, resumable); embed them with CLIP; for
every (light, heavy) pair with a faster light model, train a discriminator (positive class: real
images when given, else the heavy model's images; negative: the light model's images), measure
validation accuracy and AUC, then on the held-out test prompts measure the confidences, f(t) and
Q(t) of the actual mixed outputs, plus light-only, heavy-only and oracle quality. Keep the pairs
on the cost/quality Pareto front, mark the recommended one, and write ``cascade.yaml``, the
discriminator artifacts, a details JSON and a PNG of the curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from diffserve.models.clip import clip_score, get_encoder
from diffserve.cascade_builder.curves import (
    deferral_curve,
    mean_quality_curve,
    oracle_choice,
    random_split_curve,
    set_quality_curve,
    threshold_grid,
)
from diffserve.cascade_builder.discriminator import classification_metrics, fit_clip_logreg, fit_efficientnet
from diffserve.models.discriminator import ClipLogRegDiscriminator, Discriminator
from diffserve.cascade_builder.fid import MIN_FID_SAMPLES, FidFeatures, fid, kid
from diffserve.cascade_builder.generation import ModelLoader, VariantImages, generate_all, load_image_folder, open_images, progress_bar
from diffserve.cascade_builder.pairs import CurvePoints, candidate_pairs, cost_curve, select_pairs
from diffserve.cascade_builder.plots import plot_cascade
from diffserve.cascade_builder.scoring import ImageRunOptions
from diffserve.datasets import PromptSet
from diffserve.errors import UserError
from diffserve.fileio import atomic_write_text, write_model
from diffserve.schemas import CascadeFile, CascadePair, DiscriminatorRef, ProfileFile

Backbone = Literal["clip", "efficientnet"]
Metric = Literal["auto", "clip", "fid"]
#: Heavy fractions at which the random-split (Proteus) curve is measured: one set-metric evaluation each.
RANDOM_SPLIT_FRACTIONS = np.round(np.linspace(0.0, 1.0, 11), 6)


@dataclass
class BuildOptions(ImageRunOptions):
    real_images: Path | None = None
    max_real_images: int = 5000
    backbone: Backbone = "clip"
    backbone_weights: str | None = None
    epochs: int = 3
    backbone_image_size: int = 128
    metric: Metric = "auto"
    grid_points: int = 101
    split: tuple[float, float, float] = (0.5, 0.2, 0.3)
    keep_all_pairs: bool = False
    profile: ProfileFile | None = None
    plot: Path | None = None
    min_fid_samples: int = MIN_FID_SAMPLES


@dataclass
class Split:
    train: list[int] = field(default_factory=list)
    val: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)


def split_prompts(n: int, fractions: tuple[float, float, float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt indices of train, validation and test; each split gets at least one prompt."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions):
        raise UserError(f"the split needs three positive fractions train,val,test, got {fractions}")
    if n < 3:
        raise UserError(f"building a cascade needs at least 3 prompts (train, validation, test), got {n}")
    total = sum(fractions)
    n_val = max(1, round(n * fractions[1] / total))
    n_test = max(1, round(n * fractions[2] / total))
    n_train = n - n_val - n_test
    if n_train < 1:
        n_train, n_test = 1, n - n_val - 1
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_val]), np.sort(order[n_train + n_val :])


def _query_split(variant: VariantImages, prompt_split: dict[str, str]) -> Split:
    split = Split()
    for i, (prompt, _) in enumerate(variant.queries):
        getattr(split, prompt_split[prompt.id]).append(i)
    return split


def latency_references(images: dict[str, VariantImages], profile: ProfileFile | None) -> tuple[dict[str, float], dict[str, str]]:
    """Batch-1 latency per model from the profile, else this machine's measured time per image."""
    latency, where = {}, {}
    for name, variant in images.items():
        if profile is not None and name in profile.models:
            try:
                latency[name] = profile.models[name].latency_ms(1)
                where[name] = "profile"
                continue
            except KeyError:
                pass
        if variant.ms_per_image is None:
            raise UserError(f"no latency for {name}: it is not in the profile and its images were not timed here")
        latency[name] = variant.ms_per_image
        where[name] = "measured"
    return latency, where


def build_cascade(
    specs: list[Any],
    prompts: PromptSet,
    output: Path,
    options: BuildOptions,
    loader: ModelLoader,
    console: Console | None = None,
) -> CascadeFile:
    """Build and write the cascade file. Its ``random_weights`` tells the caller to warn that the
    quality figures came from random-weight networks (this stage does not know the CLI).

    The stages: split the prompts, generate every model's images, read their CLIP features, train
    one discriminator per (light, positive class) and measure every candidate pair's curves, keep
    the Pareto front, then write the cascade, its plot and its details."""
    console = console or Console(stderr=True)
    if len(specs) < 2:
        raise UserError(f"a cascade needs at least two models, got {len(specs)}")
    started = time.perf_counter()
    splits, prompt_split = _prompt_splits(prompts, options)
    real_paths = None
    if options.real_images is not None:
        real_paths = load_image_folder(options.real_images, limit=options.max_real_images, seed=options.seed, what="--real-images folder")
    elif prompts.has_images:
        real_paths = [p.image_path for p in prompts]
    metric = _resolve_metric(options, real_paths, len(splits["test"]) * options.images_per_prompt)

    images = generate_all(
        specs, prompts.prompts, images_per_prompt=options.images_per_prompt, cache_root=options.cache_dir,
        loader=loader, batch_size=options.batch_size, seed=options.seed, console=console,
    )
    names = list(images)
    first = images[names[0]]
    split = _query_split(first, prompt_split)
    feats, scores = _clip_features(images, first, options, console)
    real = _real_sets(real_paths, prompts, prompt_split, options) if real_paths else None
    fid_net = FidFeatures(options.fid, options.feature_device) if real is not None else None
    measure = _PairMeasure(
        images=images, feats=feats, scores=scores, split=split, real=real, metric=metric, options=options,
        grid=threshold_grid(options.grid_points), artifacts_dir=output.parent / f"{output.stem}.discriminators",
        output=output, console=console,
        fid_real=fid_net(real["images"]) if fid_net is not None else None,
        fid_test={name: fid_net(v.images(split.test)) for name, v in images.items()} if fid_net is not None else {},
    )

    latency, latency_source = latency_references(images, options.profile)
    candidates = candidate_pairs(names, latency)
    if not candidates:
        raise UserError(f"no (light, heavy) pair with a faster light model among {', '.join(names)} (latencies {latency})")
    results = [measure.pair(light, heavy) for light, heavy in candidates]
    curves = [
        CurvePoints(f"{r['light']}->{r['heavy']}", cost_curve(r["f_t"], latency[r["light"]], latency[r["heavy"]], r["disc_ms"]), r["q_t"])
        for r in results
    ]
    front, recommended = select_pairs(curves, lower_is_better=metric == "fid")
    any_random = any(images[n].random_weights for n in names) or options.clip.random_weights
    if metric == "fid":
        any_random = any_random or options.fid.random_weights
    pairs = [
        _cascade_pair(r, curve.name == recommended, metric, measure.grid, latency, len(splits["test"]), any_random)
        for r, curve in zip(results, curves)
        if curve.name in front or options.keep_all_pairs
    ]
    cascade = CascadeFile(source="measured by diffserve build-cascade", random_weights=any_random, prompts=prompts.name, pairs=pairs)
    write_model(output, cascade)
    plot_cascade(cascade, options.plot or output.with_suffix(".png"))
    details = {
        "prompts": prompts.name,
        "metric": metric,
        "latency_ms": latency,
        "latency_source": latency_source,
        "random_weights": any_random,
        "splits": {k: [prompts.prompts[i].id for i in v] for k, v in splits.items()},
        "pareto_front": front,
        "recommended": recommended,
        "elapsed_s": round(time.perf_counter() - started, 2),
        "pairs": [_pair_details(r, c, first, split, scores) for r, c in zip(results, curves)],
    }
    atomic_write_text(output.with_name(output.stem + ".details.json"), json.dumps(details, indent=1))
    _summary(console, results, curves, front, recommended, metric)
    return cascade


def _prompt_splits(prompts: PromptSet, options: BuildOptions) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The train/val/test prompt indices, and each prompt id's split."""
    train_idx, val_idx, test_idx = split_prompts(len(prompts), options.split, options.seed)
    splits = {"train": train_idx, "val": val_idx, "test": test_idx}
    prompt_split = {prompts.prompts[i].id: name for name, idx in splits.items() for i in idx}
    return splits, prompt_split


def _clip_features(images: dict[str, VariantImages], first: VariantImages, options: BuildOptions,
                   console: Console) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every model's CLIP image features and its CLIP score against the prompts."""
    encoder = get_encoder(options.clip, options.feature_device)
    text = encoder.encode_texts([p.text for p, _ in first.queries])
    feats: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    with progress_bar(console) as progress:
        for name, variant in images.items():
            task = progress.add_task(f"CLIP features {name}", total=len(variant.queries))
            chunks = []
            for i in range(0, len(variant.queries), 64):
                idx = range(i, min(i + 64, len(variant.queries)))
                chunks.append(encoder.encode_images(variant.images(idx)))
                progress.advance(task, len(idx))
            feats[name] = np.concatenate(chunks)
            scores[name] = clip_score(feats[name], text)
    return feats, scores


@dataclass
class _PairMeasure:
    """What measuring a candidate pair needs; one discriminator is trained per (light, positive)."""

    images: dict[str, VariantImages]
    feats: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    split: Split
    real: dict[str, Any] | None
    metric: str
    options: BuildOptions
    grid: np.ndarray
    artifacts_dir: Path
    output: Path
    console: Console
    fid_real: np.ndarray | None
    fid_test: dict[str, np.ndarray]
    trained: dict[tuple[str, str], tuple[Discriminator, dict, str, float]] = field(default_factory=dict)

    def pair(self, light: str, heavy: str) -> dict[str, Any]:
        """The pair's deferral and quality curves on the test split, and its discriminator."""
        options, split, grid = self.options, self.split, self.grid
        positive = "real" if self.real is not None else heavy
        if (light, positive) not in self.trained:
            self.console.print(f"training the {options.backbone} discriminator: {light} (negative) vs {positive} (positive)")
            self.trained[(light, positive)] = _train(light, positive, self.images, self.feats, split, self.real, options,
                                                     self.artifacts_dir, self.output, self.console)
        disc, val_metrics, artifact, disc_ms = self.trained[(light, positive)]
        if isinstance(disc, ClipLogRegDiscriminator):
            conf = disc.confidence_from_features(self.feats[light][split.test])
        else:
            conf = disc.confidence(self.images[light].images(split.test))
        f_t = deferral_curve(conf, grid)
        light_s, heavy_s = self.scores[light][split.test], self.scores[heavy][split.test]
        oracle = oracle_choice(light_s, heavy_s)
        extra: dict[str, Any] = {}
        if self.metric == "clip":
            q_t = mean_quality_curve(conf, light_s, heavy_s, grid)
            q_light, q_heavy = float(light_s.mean()), float(heavy_s.mean())
            q_oracle = float(np.where(oracle, heavy_s, light_s).mean())
            q_rand = random_split_curve(len(conf), RANDOM_SPLIT_FRACTIONS, lambda m: float(np.where(m, heavy_s, light_s).mean()), options.seed)
        else:
            fid_real, fid_test = self.fid_real, self.fid_test

            def distance(mixed: np.ndarray) -> float:
                return fid(fid_real, mixed)

            q_t = set_quality_curve(conf, fid_test[light], fid_test[heavy], grid, distance)
            q_light, q_heavy = float(q_t[0]), float(q_t[-1])
            q_oracle = distance(np.where(oracle[:, None], fid_test[heavy], fid_test[light]))
            q_rand = random_split_curve(
                len(conf), RANDOM_SPLIT_FRACTIONS,
                lambda m: distance(np.where(m[:, None], fid_test[heavy], fid_test[light])), options.seed,
            )
            extra["clip_q_t"] = mean_quality_curve(conf, light_s, heavy_s, grid).round(4).tolist()
        if self.fid_real is not None:
            fid_real = self.fid_real
            extra["kid_q_t"] = set_quality_curve(
                conf, self.fid_test[light], self.fid_test[heavy], grid, lambda mixed: kid(fid_real, mixed)[0], max_evaluations=11
            ).tolist()
        return {
            "light": light, "heavy": heavy, "positive": positive, "f_t": f_t, "q_t": q_t,
            "q_light": q_light, "q_heavy": q_heavy, "q_oracle": q_oracle, "q_rand": q_rand, "conf": conf,
            "disc": disc, "val": val_metrics, "artifact": artifact, "disc_ms": disc_ms, "extra": extra,
        }


def _cascade_pair(r: dict[str, Any], recommended: bool, metric: str, grid: np.ndarray, latency: dict[str, float],
                  n_test: int, any_random: bool) -> CascadePair:
    """A measured pair as the cascade file states it."""
    disc: Discriminator = r["disc"]
    return CascadePair(
        light=r["light"], heavy=r["heavy"], recommended=recommended, metric=metric,
        grid=[float(t) for t in grid], f_t=[round(float(v), 6) for v in r["f_t"]],
        q_t=[round(float(v), 4) for v in r["q_t"]],
        q_light=round(r["q_light"], 4), q_heavy=round(r["q_heavy"], 4), q_oracle=round(r["q_oracle"], 4),
        f_rand=[float(f) for f in RANDOM_SPLIT_FRACTIONS], q_rand=[round(float(v), 4) for v in r["q_rand"]],
        discriminator=DiscriminatorRef(
            kind=disc.kind, path=r["artifact"], feature_model=disc.feature_model,
            random_weights=disc.random_weights, latency_ms=round(r["disc_ms"], 3),
            val_accuracy=r["val"]["accuracy"], val_auc=r["val"]["auc"],
        ),
        latency_ms={r["light"]: round(latency[r["light"]], 3), r["heavy"]: round(latency[r["heavy"]], 3)},
        n_eval_prompts=n_test,
        source="measured" + (" (RANDOM WEIGHTS: quality figures are meaningless)" if any_random else ""),
    )


def _pair_details(r: dict[str, Any], curve: CurvePoints, first: VariantImages, split: Split,
                  scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """A pair's per-query figures for the details file (what the cascade file summarises)."""
    return {
        "pair": f"{r['light']}->{r['heavy']}", "positive_class": r["positive"], "val": r["val"],
        "test_queries": [{"prompt_id": first.queries[i][0].id, "seed": first.queries[i][1].seed} for i in split.test],
        "confidence": [round(float(c), 6) for c in r["conf"]],
        "clip_light": scores[r["light"]][split.test].round(4).tolist(),
        "clip_heavy": scores[r["heavy"]][split.test].round(4).tolist(),
        "cost_ms": curve.cost.round(3).tolist(), **r["extra"],
    }


def _resolve_metric(options: BuildOptions, real_paths: list[Path] | None, n_test: int) -> str:
    if options.metric == "clip":
        return "clip"
    large = real_paths is not None and n_test >= options.min_fid_samples and len(real_paths) >= options.min_fid_samples
    if options.metric == "fid":
        if real_paths is None:
            raise UserError("--metric fid needs real images (--real-images DIR or MS-COCO captions with their images)")
        if not large:
            raise UserError(
                f"--metric fid needs at least {options.min_fid_samples} test images and real images "
                f"(have {n_test} test images, {len(real_paths)} real); use more prompts or --metric clip"
            )
        return "fid"
    return "fid" if large else "clip"


def _real_sets(paths: list[Path], prompts: PromptSet, prompt_split: dict[str, str], options: BuildOptions) -> dict[str, Any]:
    """Real images and their train/val indices: by prompt when aligned (COCO), else a seeded split."""
    images = open_images(paths)
    if options.real_images is None:  # the prompts' own images, one per prompt
        where = [prompt_split[p.id] for p in prompts]
        train = [i for i, s in enumerate(where) if s == "train"]
        val = [i for i, s in enumerate(where) if s == "val"]
    else:
        order = np.random.default_rng(options.seed + 1).permutation(len(images))
        total = sum(options.split)
        n_train = max(2, int(len(images) * options.split[0] / total))
        n_val = max(2, int(len(images) * options.split[1] / total))
        if n_train + n_val > len(images):
            raise UserError(f"--real-images needs at least 4 images, got {len(images)}")
        train, val = sorted(order[:n_train].tolist()), sorted(order[n_train : n_train + n_val].tolist())
    return {"images": images, "train": train, "val": val}


def _train(
    light: str,
    positive: str,
    images: dict[str, VariantImages],
    feats: dict[str, np.ndarray],
    split: Split,
    real: dict[str, Any] | None,
    options: BuildOptions,
    artifacts_dir: Path,
    output: Path,
    console: Console,
) -> tuple[Discriminator, dict, str, float]:
    """Train one discriminator, report its validation metrics, save it; returns its per-image latency too."""
    stem = f"{light}__vs__{positive}"
    if options.backbone == "clip":
        encoder = get_encoder(options.clip, options.feature_device)
        if real is not None:
            real_feats = encoder.encode_images(real["images"])
            pos_train, pos_val = real_feats[real["train"]], real_feats[real["val"]]
        else:
            pos_train, pos_val = feats[positive][split.train], feats[positive][split.val]
        disc: Discriminator = fit_clip_logreg(
            pos_train, feats[light][split.train], options.clip, positive_name=positive, seed=options.seed
        )
        disc.device = options.feature_device
        val_conf = np.concatenate([disc.confidence_from_features(pos_val), disc.confidence_from_features(feats[light][split.val])])
        n_pos = len(pos_val)
        path = artifacts_dir / f"{stem}.joblib"
    else:
        if real is not None:
            pos_train = [real["images"][i] for i in real["train"]]
            pos_val = [real["images"][i] for i in real["val"]]
        else:
            pos_train, pos_val = images[positive].images(split.train), images[positive].images(split.val)
        neg_train = images[light].images(split.train)
        with progress_bar(console) as progress:
            task = progress.add_task(f"fine-tune EfficientNet-V2-S ({stem})", total=options.epochs * (len(pos_train) + len(neg_train)))
            disc = fit_efficientnet(
                pos_train, neg_train, positive_name=positive, backbone_weights=options.backbone_weights,
                image_size=options.backbone_image_size, epochs=options.epochs, seed=options.seed,
                progress=lambda n: progress.advance(task, n), device=options.feature_device,
            )
        val_conf = np.concatenate([disc.confidence(pos_val), disc.confidence(images[light].images(split.val))])
        n_pos = len(pos_val)
        path = artifacts_dir / f"{stem}.safetensors"
    labels = np.concatenate([np.ones(n_pos), np.zeros(len(val_conf) - n_pos)])
    metrics = classification_metrics(val_conf, labels)
    disc.save(path)
    probe = images[light].images(split.test[:8])
    start = time.perf_counter()
    disc.confidence(probe)
    disc_ms = 1000.0 * (time.perf_counter() - start) / max(1, len(probe))
    return disc, metrics, path.relative_to(output.parent).as_posix(), disc_ms


def _summary(console: Console, results: list[dict], curves: list[CurvePoints], front: list[str], recommended: str, metric: str) -> None:
    from rich import box

    table = Table(
        title=f"cascade pairs: Q = {metric.upper()} ({'lower' if metric == 'fid' else 'higher'} is better), "
        "* recommended, - dominated; AUC on validation",
        box=box.SIMPLE, padding=(0, 1), pad_edge=False,
    )
    table.add_column("pair", no_wrap=True)
    for col in ("AUC", "light", "heavy", "oracle", "best", "t*"):
        table.add_column(col, justify="right", no_wrap=True)
    better = np.argmin if metric == "fid" else np.argmax
    for r, c in zip(results, curves):
        k = int(better(r["q_t"]))
        auc = r["val"]["auc"]
        mark = "* " if c.name == recommended else ("  " if c.name in front else "- ")
        table.add_row(
            mark + c.name, f"{auc:.3f}" if auc is not None else "-", f"{r['q_light']:.3f}", f"{r['q_heavy']:.3f}",
            f"{r['q_oracle']:.3f}", f"{r['q_t'][k]:.3f}", f"{k / (len(r['q_t']) - 1):.2f}",
        )
    console.print(table)
