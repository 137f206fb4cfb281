"""The GPU path's switches, one flag each in a variant spec, and what was really on.

Half precision comes from the spec's ``dtype``; the rest is here:

- ``sdpa``: PyTorch's scaled-dot-product attention in the UNet and VAE (diffusers' default on
  torch 2; ``false`` falls back to the classic matmul-softmax processor, for comparison);
- ``channels_last``: NHWC memory format for the UNet and VAE convolutions;
- ``compile``: ``torch.compile`` of the UNet (``default``, ``max-autotune`` or ``reduce-overhead``);
- ``cuda_graphs``: CUDA graphs through ``torch.compile(mode="reduce-overhead")``. Limits: one graph
  per (batch size, resolution), recorded on first use, so every new batch size pays a recompile and
  a capture and holds its own memory pool; only the UNet is graphed (text encoders, scheduler step
  and VAE run eagerly); needs a CUDA device;
- ``same_stream_decode``: VAE decode, uint8 conversion and the discriminator run on the GPU in the
  pipeline's stream, with one device-to-host copy at the end (needs a tensor discriminator);
- ``step_sync``: synchronise the device after every denoising step so a deadline is checked on
  finished work. Off by default: the host only queues kernels and syncs once per batch;
- ``pinned_outputs``: images come back through page-locked host memory (async copy).

:func:`apply_gpu_options` applies them to a loaded pipeline and returns a record of which were
actually on (an option a device cannot use is recorded off with the reason), which ``profile``
writes into the profile next to the latencies.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from diffserve.schemas import StrictModel

CompileMode = Literal["off", "default", "max-autotune", "reduce-overhead"]


class GpuOptions(StrictModel):
    """Per-variant switches of the GPU path (see the module docstring for each)."""

    sdpa: bool = True
    channels_last: bool = False
    compile: CompileMode = "off"
    compile_backend: str = Field(default="inductor", description="torch.compile backend; 'eager' checks the path without code generation")
    cuda_graphs: bool = False
    same_stream_decode: bool = False
    step_sync: bool = False
    pinned_outputs: bool = False

    @classmethod
    def fast(cls, **overrides: Any) -> "GpuOptions":
        """Everything that helps a fixed-shape GPU server on (compile left to the caller)."""
        return cls(**{"channels_last": True, "same_stream_decode": True, "pinned_outputs": True, **overrides})


def apply_gpu_options(pipe: Any, options: GpuOptions, device: str, dtype: str) -> dict[str, Any]:
    """Apply ``options`` to ``pipe`` in place; returns what was really on (and why not, when not)."""
    import torch

    cuda = device.startswith("cuda")
    record: dict[str, Any] = {"device": device, "dtype": dtype}
    notes: list[str] = []
    unet = getattr(pipe, "unet", None)
    vae = getattr(pipe, "vae", None)

    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in (unet, vae):
        if module is not None and hasattr(module, "set_attn_processor") and getattr(module, "attn_processors", None):
            module.set_attn_processor(AttnProcessor2_0() if options.sdpa else AttnProcessor())
    record["sdpa"] = options.sdpa

    if options.channels_last:
        for module in (unet, vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    record["channels_last"] = options.channels_last

    mode = options.compile
    graphs = options.cuda_graphs
    if graphs and not cuda:
        graphs = False
        notes.append("cuda_graphs off: needs a CUDA device")
    if graphs:
        if mode not in ("off", "reduce-overhead"):
            notes.append(f"compile mode {mode} replaced by reduce-overhead, which records CUDA graphs")
        mode = "reduce-overhead"
    if mode != "off" and unet is not None:
        kwargs: dict[str, Any] = {"backend": options.compile_backend, "dynamic": False}
        if options.compile_backend == "inductor":
            kwargs["mode"] = mode
        pipe.unet = torch.compile(unet, **kwargs)
    record["compile"] = mode
    record["compile_backend"] = options.compile_backend if mode != "off" else None
    record["cuda_graphs"] = graphs

    record["same_stream_decode"] = options.same_stream_decode
    record["step_sync"] = options.step_sync and cuda
    if options.step_sync and not cuda:
        notes.append("step_sync off: only a CUDA device runs asynchronously")
    record["pinned_outputs"] = options.pinned_outputs and cuda
    if options.pinned_outputs and not cuda:
        notes.append("pinned_outputs off: page-locked memory only helps copies from a CUDA device")
    record["notes"] = notes
    return record


def to_uint8_nhwc(images: Any) -> Any:
    """``[0, 1]`` float images (N, 3, H, W) on any device -> uint8 (N, H, W, 3), on that device."""
    import torch

    return (images.clamp(0, 1) * 255).round().to(dtype=torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_host(images_u8: Any, *, pinned: bool) -> Any:
    """A numpy array of device images: through a page-locked buffer and one sync when ``pinned``."""
    import torch

    if images_u8.device.type != "cuda" or not pinned:
        return images_u8.cpu().numpy()
    host = torch.empty(images_u8.shape, dtype=images_u8.dtype, pin_memory=True)
    host.copy_(images_u8, non_blocking=True)
    torch.cuda.current_stream(images_u8.device).synchronize()
    return host.numpy()
