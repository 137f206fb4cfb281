"""SDXL and SDXL-Lightning: one real denoising step each on the CPU at 64 px (random weights, real architecture).

The full pipeline runs: both text encoders, the UNet (2.57 B parameters), the scheduler step and the
VAE decode, producing an image. The two variants share every component (same configurations, and
the same seed fills them with the same values), so this module builds them once, inside
:func:`~diffserve.models.arch.shared_modules`: 13.9 GiB resident in float32, released when the module
ends. Each variant still goes through ``load_variant`` with its own scheduler configuration and
guidance. float32, because these CPUs have no native bfloat16 (AVX2 only): the VAE decode alone
took 114 s in bfloat16 against 1.1 s in float32 (``python bench/arch_cpu.py --compare-bf16``
measures that, and the time and memory of these two tests). One torch thread. The GPU runs are in
bench/gpu.py.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from diffserve.models import load_variant
from diffserve.models.arch import ARCH_LABEL, arch_config, arch_variant, shared_modules


@pytest.fixture(scope="module")
def sdxl_modules_once():
    """SDXL's modules built at most once for this module's tests, on one torch thread.

    One thread, not two: on a 2-core machine shared with other work, two threads took 118 s for
    both variants against 73 s for one (``bench/arch_cpu.py --threads 1|2``), since a preempted
    thread stalls the other at every op. A second thread would at best halve the compute part,
    and only on an idle machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with shared_modules():
            yield
    finally:
        torch.set_num_threads(before)
        gc.collect()
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the heap pages freed by the modules back to the OS (glibc keeps them otherwise), so the
    rest of the suite runs as if these tests had not."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only; elsewhere nothing to do
        libc.malloc_trim(0)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "cfg_batch", "first_timestep"), [
    ("sdxl", 2, 1),  # guidance 5.0: negative and positive prompt in one UNet batch; 'leading' spacing + offset 1
    ("sdxl-lightning", 1, 999),  # guidance 0: no CFG; 'trailing' spacing starts at the last training step
])
def test_sdxl_variant_runs_one_real_step_on_cpu_at_64px(name, cfg_batch, first_timestep, sdxl_modules_once):
    spec = arch_variant(name, resolution=64, steps=1, dtype="float32")
    model = load_variant(spec, device="cpu")
    seen: list[tuple[int, float]] = []  # (UNet batch, timestep) of every UNet call

    def record(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append((int(sample.shape[0]), float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep)))

    pipe = model.pipeline
    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        assert model.label == ARCH_LABEL and model.random_weights
        assert type(pipe).__name__ == "StableDiffusionXLPipeline"
        assert pipe.scheduler.config.timestep_spacing == arch_config(name)["scheduler"]["config"]["timestep_spacing"]
        assert sum(p.numel() for p in pipe.unet.parameters()) == pytest.approx(2.567e9, rel=0.005)
        weight = next(pipe.unet.parameters())
        assert str(weight.dtype) == "torch.float32" and weight.device.type == "cpu"
        del weight
        images = model.generate(["a red cube on a blue table"], seeds=[0])
    finally:
        hook.remove()
        del pipe
    try:
        assert seen == [(cfg_batch, first_timestep)], seen  # one step, with this variant's guidance and scheduler
        assert len(images) == 1 and images[0].size == (64, 64)
        pixels = np.asarray(images[0])
        assert pixels.dtype == np.uint8 and pixels.std() > 0  # a decoded image, not a blank
    finally:
        del model, images
        gc.collect()
