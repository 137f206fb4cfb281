"""Versioned schemas of the files that connect the pipeline stages.

``profile.yaml`` (what each model costs) -> ``cascade.yaml`` (how the discriminator splits queries
and what quality each split gives) -> ``plan.yaml`` (workers, batch sizes, threshold) -> the server.
Each file carries ``schema_version`` and ``kind`` so that a stage rejects a file from another stage
or another release with a clear message instead of misreading it. Every model forbids unknown
fields: a typo in a hand-edited file must fail, not be ignored.
"""

from __future__ import annotations

import bisect
import datetime as _dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

SCHEMA_VERSION = 1


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# profile.yaml
# --------------------------------------------------------------------------------------------


class BatchProfile(StrictModel):
    """Latency of one batch size; infeasible entries keep the reason (OOM, time limit)."""

    batch_size: int = Field(ge=1)
    feasible: bool = True
    median_ms: float | None = Field(default=None, gt=0)
    p90_ms: float | None = Field(default=None, gt=0)
    p99_ms: float | None = Field(default=None, gt=0)
    throughput_ips: float | None = Field(default=None, ge=0, description="images per second")
    peak_memory_mb: float | None = Field(default=None, ge=0)
    repeats: int | None = Field(default=None, ge=1)
    reason: str | None = None
    edit_median_ms: float | None = Field(
        default=None, gt=0,
        description="median latency of a batch of img2img edits at the model's edit_strength (diffserve profile measures it)",
    )

    @property
    def serving_ms(self) -> float | None:
        """What planning and admission price a batch at: the dearer of a generation and an edit.
        Edit demand is not a stream of its own in the planner (yet): pricing every batch at the
        dearer kind bounds every batch, since the batcher never mixes kinds (the edit column is
        measured at the dearest strength, 1.0, by default).
        Without an edit column: the generation's median."""
        if self.median_ms is None or self.edit_median_ms is None:
            return self.median_ms
        return max(self.median_ms, self.edit_median_ms)

    @model_validator(mode="after")
    def _feasible_has_latency(self) -> "BatchProfile":
        if self.feasible and self.median_ms is None:
            raise ValueError(f"batch_size {self.batch_size} is marked feasible but has no median_ms")
        return self


class ColocatedBatch(StrictModel):
    """k workers of one model sharing one device, each running batches of ``batch_size`` at once."""

    workers: int = Field(ge=1, description="co-located worker processes on the device")
    batch_size: int = Field(ge=1)
    sharing: str = Field(description="how the device was shared: 'mps' (CUDA MPS), 'time-slicing' or 'cpu'")
    median_ms: float = Field(gt=0, description="median batch latency seen by one worker while all k run")
    p99_ms: float | None = Field(default=None, gt=0)
    throughput_ips: float = Field(ge=0, description="aggregate images per second of the k workers")


class ModelProfile(StrictModel):
    name: str
    source: str = Field(description="Hugging Face id, local directory, builtin:<name> or reference")
    random_weights: bool = False
    load_time_s: float | None = Field(
        default=None, ge=0, description="seconds to load onto the device: measured by diffserve profile; an estimate in the reference profile"
    )
    resolution: int | None = Field(default=None, ge=8)
    steps: int | None = Field(default=None, ge=1)
    edit_strength: float | None = Field(default=None, gt=0, le=1, description="the strength the batches' edit_median_ms was measured at")
    batches: list[BatchProfile]
    label: str | None = Field(default=None, description="what the weights are, e.g. 'random weights, real architecture'")
    gpu_options: dict[str, Any] | None = Field(default=None, description="the GPU-path options that were on while measuring")
    colocated: list[ColocatedBatch] = Field(default_factory=list, description="aggregate throughput of k workers sharing the device")
    variant: dict[str, Any] | None = Field(default=None, description="the variant spec as profiled; the diffusers backend serves exactly this")

    @field_validator("batches")
    @classmethod
    def _sorted_unique(cls, batches: list[BatchProfile]) -> list[BatchProfile]:
        sizes = [b.batch_size for b in batches]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"duplicate batch sizes {sizes}")
        return sorted(batches, key=lambda b: b.batch_size)

    def feasible_batches(self) -> list[BatchProfile]:
        return [b for b in self.batches if b.feasible]

    def latency_ms(self, batch_size: int) -> float:
        """Median latency of a batch of ``batch_size``; raises KeyError when not profiled or infeasible."""
        for b in self.batches:
            if b.batch_size == batch_size and b.feasible and b.median_ms is not None:
                return b.serving_ms  # type: ignore[return-value]
        raise KeyError(f"{self.name}: batch size {batch_size} is not profiled as feasible")


class ProfileFile(StrictModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["diffserve.profile"] = "diffserve.profile"
    created: _dt.datetime = Field(default_factory=utc_now)
    device: str = Field(description="device name, for example 'NVIDIA A100-SXM4-80GB' or 'cpu'")
    device_type: str = "cpu"
    torch_version: str | None = None
    diffusers_version: str | None = None
    source: str = Field(default="measured", description="'measured' or a citation for transcribed figures")
    random_weights: bool = Field(default=False, description="true when any model had random weights")
    models: dict[str, ModelProfile]

    @model_validator(mode="after")
    def _names_match(self) -> "ProfileFile":
        for key, model in self.models.items():
            if key != model.name:
                raise ValueError(f"models.{key} has name {model.name!r}; the key and the name must match")
        return self

    def model(self, name: str) -> ModelProfile:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not in the profile (it has: {', '.join(self.models)})") from None


# --------------------------------------------------------------------------------------------
# cascade.yaml
# --------------------------------------------------------------------------------------------

QualityMetric = Literal["fid", "clip"]


class DiscriminatorRef(StrictModel):
    """Where the discriminator lives and how good it is; ``replayed`` means published scores only."""

    kind: Literal["clip-logreg", "efficientnet", "replayed"]
    path: str | None = Field(default=None, description="artifact file, relative to the cascade file")
    feature_model: str | None = None
    random_weights: bool = False
    latency_ms: float = Field(default=0.0, ge=0, description="per-image scoring latency")
    val_accuracy: float | None = Field(default=None, ge=0, le=1)
    val_auc: float | None = Field(default=None, ge=0, le=1)


class CascadePair(StrictModel):
    """One light -> heavy cascade with its measured curves.

    A query goes to the heavy model when the discriminator's confidence in the light image is
    below the threshold ``t``. ``f_t[i]`` is the fraction of queries deferred at ``grid[i]``;
    ``q_t[i]`` is the quality of the mixed output at that threshold, in ``metric`` units
    (FID: lower is better; CLIP score: higher is better).
    """

    light: str
    heavy: str
    recommended: bool = False
    metric: QualityMetric = "fid"
    grid: list[float]
    f_t: list[float]
    q_t: list[float]
    q_light: float | None = None
    q_heavy: float | None = None
    q_oracle: float | None = None
    f_rand: list[float] | None = Field(
        default=None, description="heavy fractions of the measured random-split curve (no discriminator), increasing"
    )
    q_rand: list[float] | None = Field(
        default=None, description="quality of a random split at each f_rand: the Proteus baseline's measured curve"
    )
    discriminator: DiscriminatorRef
    latency_ms: dict[str, float] = Field(default_factory=dict, description="batch-1 latency reference per model")
    n_eval_prompts: int | None = Field(default=None, ge=1)
    source: str = "measured"

    @model_validator(mode="after")
    def _curves_consistent(self) -> "CascadePair":
        n = len(self.grid)
        if n < 2:
            raise ValueError("grid needs at least two thresholds")
        if len(self.f_t) != n or len(self.q_t) != n:
            raise ValueError(f"grid, f_t and q_t must have the same length, got {n}, {len(self.f_t)}, {len(self.q_t)}")
        if any(b <= a for a, b in zip(self.grid, self.grid[1:])):
            raise ValueError("grid must be strictly increasing")
        if self.grid[0] < 0 or self.grid[-1] > 1:
            raise ValueError("grid thresholds must lie in [0, 1]")
        if any(not 0 <= f <= 1 for f in self.f_t):
            raise ValueError("f_t values are fractions and must lie in [0, 1]")
        if any(b < a - 1e-9 for a, b in zip(self.f_t, self.f_t[1:])):
            raise ValueError("f_t must be non-decreasing in the threshold")
        if self.light == self.heavy:
            raise ValueError("light and heavy must be different models")
        if (self.f_rand is None) != (self.q_rand is None):
            raise ValueError("f_rand and q_rand come together: give both or neither")
        if self.f_rand is not None and self.q_rand is not None:
            if len(self.f_rand) != len(self.q_rand) or len(self.f_rand) < 2:
                raise ValueError("f_rand and q_rand must have the same length, at least 2")
            if any(not 0 <= f <= 1 for f in self.f_rand) or any(b <= a for a, b in zip(self.f_rand, self.f_rand[1:])):
                raise ValueError("f_rand must be strictly increasing fractions in [0, 1]")
        return self

    @property
    def name(self) -> str:
        return f"{self.light}->{self.heavy}"

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "fid"

    def deferral_at(self, t: float) -> float:
        """f(t) by linear interpolation on the grid (clamped at the ends)."""
        return interpolate(t, self.grid, self.f_t)

    def quality_at(self, t: float) -> float:
        return interpolate(t, self.grid, self.q_t)


class CascadeFile(StrictModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["diffserve.cascade"] = "diffserve.cascade"
    created: _dt.datetime = Field(default_factory=utc_now)
    source: str = "measured"
    random_weights: bool = False
    prompts: str | None = Field(default=None, description="the prompt set the curves were measured on")
    pairs: list[CascadePair] = Field(min_length=1)

    def recommended(self) -> CascadePair:
        for pair in self.pairs:
            if pair.recommended:
                return pair
        return self.pairs[0]

    def pair(self, light: str, heavy: str) -> CascadePair:
        for p in self.pairs:
            if p.light == light and p.heavy == heavy:
                return p
        raise KeyError(f"no cascade pair {light}->{heavy} (have: {', '.join(p.name for p in self.pairs)})")

    def pair_for(self, light: str, heavy: str | None) -> CascadePair:
        """The pair a plan with these models serves: its own pair; for a one-model plan (no heavy,
        or a pair the cascade lacks) the first pair that has the model; else the recommended one.
        The server scores and routes with this pair, so every server path must pick the same."""
        if heavy:
            try:
                return self.pair(light, heavy)
            except KeyError:
                pass
        for pair in self.pairs:
            if pair.light == light or pair.heavy == light:
                return pair
        return self.recommended()


# --------------------------------------------------------------------------------------------
# plan.yaml
# --------------------------------------------------------------------------------------------

Routing = Literal["cascade", "light-only", "heavy-only", "random-split"]


class PoolPlan(StrictModel):
    """One model's pool: how many workers run it and with which batch size."""

    model: str
    workers: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    capacity_qps: float = Field(ge=0, description="sustained queries/s of the pool at this batch size")
    latency_ms: float = Field(ge=0, description="predicted worst-case time in this stage, waits included")


class ClassPlan(StrictModel):
    """One SLO class of a plan for a class mix (planner/class_mix.py): its share of the demand,
    its own threshold and what the planner predicts for it."""

    slo_ms: float = Field(gt=0)
    demand_qps: float = Field(ge=0)
    threshold: float | None = Field(default=None, ge=0, le=1, description="defer this class's queries when confidence < threshold")
    heavy_fraction: float = Field(default=0.0, ge=0, le=1)
    predicted: dict[str, float] = Field(default_factory=dict, description="predicted quality and degraded share of this class")
    heavy_workers_reserved: int = Field(
        default=0, ge=0, description="heavy workers held for this class's urgent work (an EDF pool starts loose work on the others)")
    heavy_batch_size: int | None = Field(default=None, ge=1, description="batch size of this loose class's heavy batches (None: the pool's)")


class PlanFile(StrictModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["diffserve.plan"] = "diffserve.plan"
    created: _dt.datetime = Field(default_factory=utc_now)
    policy: str = "diffserve"
    routing: Routing = "cascade"
    light: str
    heavy: str | None = None
    threshold: float | None = Field(default=None, ge=0, le=1, description="defer when confidence < threshold")
    heavy_fraction: float = Field(default=0.0, ge=0, le=1, description="expected fraction of queries on the heavy model")
    pools: list[PoolPlan]
    demand_qps: float = Field(ge=0)
    slo_ms: float = Field(gt=0)
    workers_available: int = Field(ge=1)
    metric: QualityMetric = "fid"
    predicted: dict[str, float] = Field(default_factory=dict, description="predicted quality under the metric's name, capacity_qps, latency_ms")
    degraded: bool = False
    overload_factor: float | None = Field(default=None, description="demand / capacity when degraded")
    solver: str = ""
    solve_time_ms: float = 0.0
    notes: list[str] = Field(default_factory=list)
    #: per SLO class (a server with --slo-class); absent from the file when the plan has none
    classes: dict[str, ClassPlan] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_classes(self, handler: Any) -> Any:
        """A plan without classes serialises exactly as before the field existed."""
        data = handler(self)
        if isinstance(data, dict) and data.get("classes") is None:
            data.pop("classes", None)
        return data

    def pool(self, model: str) -> PoolPlan | None:
        for p in self.pools:
            if p.model == model:
                return p
        return None

    @property
    def workers_used(self) -> int:
        return sum(p.workers for p in self.pools)


def interpolate(x: float, xs: list[float] | tuple[float, ...], ys: list[float] | tuple[float, ...]) -> float:
    """Piecewise-linear y(x) through (xs, ys), clamped at the ends; xs increasing."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
