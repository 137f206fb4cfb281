"""Peak memory of one batch: CUDA's peak allocated bytes, or the process's peak RSS on CPU.

On Linux the RSS high-water mark (``VmHWM``) can be reset by writing ``5`` to
``/proc/self/clear_refs``, which gives a per-batch peak. Where that is not possible the probe
falls back to ``getrusage``'s lifetime peak, which only ever grows (documented in profile.md).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


class MemoryProbe:
    """``reset()`` before a batch, ``peak_mb()`` after it."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _vm_hwm_kb()
        if hwm is not None:
            return hwm / 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux

    @property
    def kind(self) -> str:
        return "cuda peak allocated" if self.cuda else "process peak RSS"


def _vm_hwm_kb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        return None
    return None
