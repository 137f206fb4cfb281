"""The profile's edit column: edit latency per batch size, measured by ``diffserve profile``, and
the conservative price planning and admission put on a batch (the dearer of generation and edit)."""

from __future__ import annotations

import time

from diffserve.models import resolve_variants
from diffserve.profiler import ProfileSettings, profile_variants
from diffserve.schemas import BatchProfile, ModelProfile
from diffserve.server.latency import LatencyTable


class EditingModel:
    """A fake loaded model that records its generate and edit calls."""

    def __init__(self, spec) -> None:
        self.spec, self.device, self.load_time_s, self.random_weights = spec, "cpu", 0.1, True
        self.generated: list[int] = []
        self.edited: list[tuple[int, float]] = []

    def generate(self, prompts, seeds=None, *, deadline=None, steps=None):
        self.generated.append(len(prompts))
        return [None] * len(prompts)

    def edit(self, prompts, seeds, images, *, strength, masks=None):
        assert len(images) == len(prompts) == len(seeds) and images[0].size == (self.spec.resolution,) * 2
        self.edited.append((len(prompts), strength))
        time.sleep(0.001)  # something to time; the value is never asserted
        return [None] * len(prompts)


def _run(tmp_path, **settings):
    spec = resolve_variants("tiny-turbo")[0]
    loaded: list[EditingModel] = []

    def load(s, device):
        loaded.append(EditingModel(s))
        return loaded[-1]

    opts = {"batch_sizes": (1, 2), "repeats": 2, "warmup": 1, "device": "cpu", "loader": load, **settings}
    return profile_variants([spec], tmp_path / "profile.yaml", ProfileSettings(**opts)), loaded


def test_profile_measures_the_edit_column_per_batch_size_at_full_strength(tmp_path) -> None:
    profile, loaded = _run(tmp_path)
    model = profile.model("tiny-turbo")
    assert model.edit_strength == 1.0
    assert all(b.edit_median_ms is not None and b.edit_median_ms > 0 for b in model.batches)
    assert loaded[0].edited == [(1, 1.0)] * 3 + [(2, 1.0)] * 3  # warm-up + repeats per size
    # resumed: both columns known, the model is not loaded again
    again, loaded_again = _run(tmp_path, resume=True)
    assert loaded_again == [] and again.model("tiny-turbo") == model


def test_the_edit_column_can_be_skipped_or_taken_at_another_strength(tmp_path) -> None:
    profile, loaded = _run(tmp_path, edit_strength=None)
    assert loaded[0].edited == [] and all(b.edit_median_ms is None for b in profile.model("tiny-turbo").batches)
    profile, loaded = _run(tmp_path, edit_strength=0.5)
    assert {s for _, s in loaded[0].edited} == {0.5} and profile.model("tiny-turbo").edit_strength == 0.5


def test_planning_prices_a_batch_at_the_dearer_of_generation_and_edit() -> None:
    batches = [BatchProfile(batch_size=1, median_ms=100.0, edit_median_ms=130.0), BatchProfile(batch_size=2, median_ms=200.0, edit_median_ms=150.0),
               BatchProfile(batch_size=4, median_ms=350.0)]
    model = ModelProfile(name="m", source="test", edit_strength=1.0, batches=batches)
    assert [model.latency_ms(b) for b in (1, 2, 4)] == [130.0, 200.0, 350.0]
    table = LatencyTable(model)
    assert [table(b) for b in (1, 2, 3, 4)] == [130.0, 200.0, 275.0, 350.0]
