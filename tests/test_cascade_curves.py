"""f(t), Q(t), the oracle, Pareto pair selection and the synthetic-data discriminator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffserve.models.clip import ClipConfig
from diffserve.cascade_builder.curves import (
    deferral_curve,
    mean_quality_curve,
    oracle_choice,
    random_split_curve,
    set_quality_curve,
    threshold_grid,
)
from diffserve.cascade_builder.discriminator import classification_metrics, fit_clip_logreg
from diffserve.models.discriminator import MAX_CONFIDENCE
from diffserve.cascade_builder.pairs import CurvePoints, candidate_pairs, cost_curve, pareto_counts, select_pairs

TINY_CLIP = ClipConfig(model="ViT-S-32", image_size=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=MAX_CONFIDENCE), min_size=1, max_size=50))
def test_deferral_curve_is_monotone_from_0_to_1(confidence: list[float]) -> None:
    grid = threshold_grid(101)
    f = deferral_curve(np.array(confidence), grid)
    assert f[0] == 0.0 and f[-1] == 1.0
    assert np.all(np.diff(f) >= 0)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_quality_curve_ends_at_light_and_heavy(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 30))
    floats = st.floats(min_value=-50, max_value=50, allow_nan=False)
    conf = np.array(data.draw(st.lists(st.floats(0.0, MAX_CONFIDENCE), min_size=n, max_size=n)))
    light = np.array(data.draw(st.lists(floats, min_size=n, max_size=n)))
    heavy = np.array(data.draw(st.lists(floats, min_size=n, max_size=n)))
    q = mean_quality_curve(conf, light, heavy, threshold_grid(11))
    assert q[0] == pytest.approx(light.mean())
    assert q[-1] == pytest.approx(heavy.mean())


def test_quality_curve_follows_the_mixture() -> None:
    conf = np.array([0.1, 0.5, 0.9])
    light, heavy = np.array([1.0, 1.0, 1.0]), np.array([4.0, 4.0, 4.0])
    q = mean_quality_curve(conf, light, heavy, np.array([0.0, 0.3, 0.6, 1.0]))
    assert q.tolist() == pytest.approx([1.0, 2.0, 3.0, 4.0])


def test_set_quality_curve_uses_the_actual_mixture() -> None:
    conf = np.array([0.2, 0.4, 0.6, 0.8])
    light, heavy = np.zeros((4, 2)), np.ones((4, 2))
    calls = []

    def distance(mixed: np.ndarray) -> float:
        calls.append(mixed.copy())
        return float(mixed.mean())

    grid = threshold_grid(101)
    q = set_quality_curve(conf, light, heavy, grid, distance, max_evaluations=11)
    assert q[0] == 0.0 and q[-1] == 1.0
    assert q[50] == pytest.approx(0.5)  # two of four deferred at t=0.5
    assert len(calls) == 5  # 11 thresholds, 5 distinct mixtures


def test_random_split_curve_scores_nested_random_heavy_sets() -> None:
    light, heavy = np.zeros(10), np.arange(1.0, 11.0)  # the heavy image of query i scores i + 1
    seen = []

    def score(mask: np.ndarray) -> float:
        seen.append(mask.copy())
        return float(np.where(mask, heavy, light).sum())

    q = random_split_curve(10, np.array([0.0, 0.3, 0.5, 1.0]), score, seed=3)
    assert [int(m.sum()) for m in seen] == [0, 3, 5, 10]
    assert all((a <= b).all() for a, b in zip(seen, seen[1:]))  # each heavy set holds the smaller ones
    assert q[0] == 0.0 and q[-1] == heavy.sum()
    assert not np.array_equal(seen[1], np.arange(10) < 3)  # random, not the first queries
    assert np.array_equal(random_split_curve(10, np.array([0.3]), lambda m: float(m @ heavy), seed=3), [q[1]])


def test_oracle_picks_the_better_image() -> None:
    assert oracle_choice(np.array([1.0, 3.0]), np.array([2.0, 2.0])).tolist() == [True, False]


def test_separable_synthetic_data_gives_high_auc() -> None:
    rng = np.random.default_rng(0)
    direction = rng.normal(size=32)
    pos = rng.normal(size=(200, 32)) + 2.5 * direction / np.linalg.norm(direction)
    neg = rng.normal(size=(200, 32)) - 2.5 * direction / np.linalg.norm(direction)
    disc = fit_clip_logreg(pos[:120], neg[:120], TINY_CLIP, positive_name="real")
    conf = np.concatenate([disc.confidence_from_features(pos[120:]), disc.confidence_from_features(neg[120:])])
    labels = np.concatenate([np.ones(80), np.zeros(80)])
    metrics = classification_metrics(conf, labels)
    assert metrics["auc"] > 0.98 and metrics["accuracy"] > 0.93
    assert conf.min() >= 0.0 and conf.max() < 1.0


def test_indistinguishable_data_gives_chance_auc() -> None:
    rng = np.random.default_rng(1)
    disc = fit_clip_logreg(rng.normal(size=(150, 16)), rng.normal(size=(150, 16)), TINY_CLIP, positive_name="real")
    pos, neg = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    conf = np.concatenate([disc.confidence_from_features(pos), disc.confidence_from_features(neg)])
    auc = classification_metrics(conf, np.concatenate([np.ones(300), np.zeros(300)]))["auc"]
    assert 0.4 < auc < 0.6


def test_candidate_pairs_need_a_faster_light_model() -> None:
    latency = {"a": 10.0, "b": 50.0, "c": 200.0, "d": 50.0}
    pairs = candidate_pairs(["c", "b", "a", "d"], latency)
    assert ("a", "b") in pairs and ("a", "c") in pairs and ("b", "c") in pairs and ("d", "c") in pairs
    assert ("b", "d") not in pairs and ("d", "b") not in pairs
    assert all(latency[l] < latency[h] for l, h in pairs)


def test_pareto_keeps_non_dominated_pairs_and_recommends_the_widest() -> None:
    f = np.linspace(0, 1, 11)
    good = CurvePoints("a->c", cost_curve(f, 10, 100), 20 - 5 * f)  # FID: lower is better
    dominated = CurvePoints("b->c", cost_curve(f, 30, 100), 22 - 3 * f)
    niche = CurvePoints("a->d", cost_curve(f, 10, 500), 20 - 6 * f)  # only its most expensive point wins
    counts = pareto_counts([good, dominated, niche], lower_is_better=True)
    assert counts["b->c"] == 0 and counts["a->c"] > counts["a->d"] > 0
    front, best = select_pairs([good, dominated, niche], lower_is_better=True)
    assert front == ["a->c", "a->d"] and best == "a->c"
    # with "higher is better" the same numbers reverse the ranking of qualities
    front_hi, _ = select_pairs([good, dominated], lower_is_better=False)
    assert "b->c" in front_hi
