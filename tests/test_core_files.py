"""The YAML hand-off between stages: schemas, atomic writes, and unit parsing."""

from __future__ import annotations

import pytest

from diffserve.artifacts import load_cascade, load_profile
from diffserve.errors import UserError
from diffserve.fileio import read_model, write_model
from diffserve.reference import reference_cascade, reference_profile
from diffserve.schemas import CascadeFile, CascadePair, DiscriminatorRef, ProfileFile
from diffserve.units import parse_duration_ms, parse_int_list, parse_range


def test_reference_profile_round_trips(tmp_path):
    path = write_model(tmp_path / "p.yaml", reference_profile())
    again = read_model(path, ProfileFile)
    assert again == reference_profile()
    assert again.model("sd-v1.5").latency_ms(4) == 3680
    assert [b.batch_size for b in again.model("sdxl").feasible_batches()] == [1, 2, 4, 8, 16]


def test_reference_cascade_matches_published_points():
    pair = reference_cascade().recommended()
    assert pair.quality_at(0.0) == pytest.approx(22.77)  # nothing deferred: SD-Turbo alone
    assert pair.quality_at(1.0) == pytest.approx(18.55)  # everything deferred: SD v1.5 alone
    assert pair.deferral_at(0.35) == pytest.approx(0.837)
    best = min(pair.q_t)
    assert best == pytest.approx(16.79, abs=0.05)  # the U shape's bottom, 40% on the light model


def test_curves_must_be_consistent():
    base = dict(light="a", heavy="b", discriminator=DiscriminatorRef(kind="replayed"))
    with pytest.raises(ValueError, match="non-decreasing"):
        CascadePair(grid=[0, 0.5, 1], f_t=[0, 0.6, 0.5], q_t=[1, 2, 3], **base)
    with pytest.raises(ValueError, match="same length"):
        CascadePair(grid=[0, 1], f_t=[0, 0.5, 1], q_t=[1, 2], **base)


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("schema_version: 1\nkind: diffserve.cascade\npairs: []\nbogus: 1\n")
    with pytest.raises(UserError, match="bogus"):
        read_model(path, CascadeFile)


def test_wrong_kind_and_bad_yaml_are_user_errors(tmp_path):
    write_model(tmp_path / "p.yaml", reference_profile())
    with pytest.raises(UserError, match="kind"):
        load_cascade(tmp_path / "p.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_profile(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not found"):
        load_profile(tmp_path / "missing.yaml")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_model(tmp_path / "out" / "p.yaml", reference_profile())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["p.yaml"]


@pytest.mark.parametrize(("text", "ms"), [("5s", 5000), ("500ms", 500), ("2m", 120_000), ("5", 5000), (1.5, 1500)])
def test_durations(text, ms):
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "-1s", "0", "fast", "5 hours"])
def test_bad_durations(text):
    with pytest.raises(UserError):
        parse_duration_ms(text, name="--slo")


def test_int_lists_and_ranges():
    assert parse_int_list("4,1,2,2") == [1, 2, 4]
    with pytest.raises(UserError, match="x"):
        parse_int_list("1,x")
    with pytest.raises(UserError):
        parse_int_list("0,1")
    assert parse_range("1:40") == (1.0, 40.0)
    with pytest.raises(UserError):
        parse_range("40:1")
