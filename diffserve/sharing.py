"""Several worker processes on one GPU: CUDA MPS where it is available, time-slicing otherwise.

One SD-Turbo worker uses a fraction of a 141 GB H200's memory and compute, so k worker processes
can share it. Without MPS the driver time-slices the GPU between their contexts (kernels of two
processes never overlap); with the MPS control daemon running, their kernels share the SMs at
once. :func:`sharing_mode` says which applies to processes started now; :class:`MpsDaemon` starts
a private daemon (and stops it) when the binary exists and the user asks for it. Every figure
measured with co-located workers records the mode, because the two give different throughput.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MPS_CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"


def mps_available() -> bool:
    """Whether the MPS control binary is installed (the daemon may still refuse to start)."""
    return shutil.which(MPS_CONTROL) is not None


def mps_running(env: dict[str, str] | None = None) -> bool:
    """An MPS daemon's control pipe exists where a CUDA process started with ``env`` would look."""
    env = dict(os.environ if env is None else env)
    pipe_dir = Path(env.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_DIR))
    return (pipe_dir / "control").exists()


def device_worker(slot: int, device: str, workers_per_gpu: int) -> str:
    """The device of worker ``slot`` when each GPU holds ``workers_per_gpu`` workers (cpu stays cpu)."""
    if not device.startswith("cuda"):
        return device
    first = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{first + slot // max(1, workers_per_gpu)}"


def sharing_mode(device: str) -> str:
    """``cpu``, ``mps`` (a daemon is running) or ``time-slicing`` for processes sharing ``device``."""
    if not device.startswith("cuda"):
        return "cpu"
    return "mps" if mps_running() else "time-slicing"


class MpsDaemon:
    """A private MPS control daemon for this run, started in a temporary pipe/log folder.

    ``start()`` returns False (and the run falls back to time-slicing) when the binary is missing
    or the daemon cannot start (no permission, a GPU in exclusive mode it cannot use, a container
    without the IPC it needs). Environment variables for the workers are in :attr:`env`, and
    :meth:`stop` quits the daemon."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.env: dict[str, str] = {}
        self.error: str | None = None

    def start(self) -> bool:
        if not mps_available():
            self.error = f"{MPS_CONTROL} is not installed"
            return False
        if mps_running():
            self.error = None
            return True  # a daemon of the machine's admin: use it, never stop it
        self.folder = Path(tempfile.mkdtemp(prefix="diffserve-mps-"))
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(self.folder / "log")}
        for path in self.env.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([MPS_CONTROL, "-d"], env={**os.environ, **self.env}, check=True, timeout=30,
                           capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as exc:
            self.error = f"{MPS_CONTROL} -d failed: {exc}"
            self.env = {}
            return False
        os.environ.update(self.env)  # workers spawned from now on connect to it
        return True

    def stop(self) -> None:
        if not self.env:
            return
        try:
            subprocess.run([MPS_CONTROL], input="quit\n", env={**os.environ, **self.env}, timeout=30,
                           capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError):
            pass
        for key in self.env:
            os.environ.pop(key, None)
        self.env = {}
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
