"""What a model variant is: one YAML-describable recipe that every stage loads the same way.

A *variant* is a set of weights plus the knobs that set its cost and quality (steps, guidance,
resolution, dtype, scheduler). SD-Turbo at 1 step and SD v1.5 at 50 steps are two variants; so
are the built-in random-weight ``tiny-*`` models used on CPUs and in tests.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from diffserve.models.gpu_options import GpuOptions
from diffserve.schemas import StrictModel

#: dtype names a variant may ask for; ``auto`` means float16 on CUDA and float32 elsewhere.
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class VariantSpec(StrictModel):
    """One model variant, as written in a YAML file or built into the package."""

    name: str = Field(description="short name used in profiles, cascades and plans, e.g. sd-turbo")
    source: str = Field(description="builtin:<name>, a Hugging Face id, a local diffusers directory or a weight file")
    pipeline_class: str = Field(default="auto", description="a diffusers pipeline class name, or auto (model_index.json)")
    steps: int = Field(ge=1, le=1000, description="number of inference steps")
    guidance_scale: float = Field(ge=0, description="classifier-free guidance; <= 1 disables it (one UNet pass per step)")
    resolution: int = Field(ge=8, le=4096, description="image height and width in pixels")
    dtype: str = "float32"
    scheduler: str | None = Field(default=None, description="diffusers scheduler class (or alias) replacing the default")
    device: str = "auto"
    gpu: GpuOptions = Field(default_factory=GpuOptions, description="GPU-path switches (SDPA, channels-last, compile, CUDA graphs, ...)")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"name must be letters, digits, '.', '_' or '-' (no spaces), got {value!r}")
        return value

    @field_validator("source")
    @classmethod
    def _source_ok(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("source must not be empty")
        return value.strip()

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution must be divisible by 8 but is {value}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, value: str) -> str:
        value = _DTYPE_ALIASES.get(value.lower(), value.lower())
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value

    @property
    def is_arch(self) -> bool:
        """A published architecture with random weights (``arch:<name>``)."""
        return self.source.startswith("arch:")

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    @property
    def uses_cfg(self) -> bool:
        """Whether a step runs the UNet twice (conditional and unconditional), as diffusers decides."""
        return self.guidance_scale > 1.0
