"""A ``diffserve serve`` subprocess we started: the one way the benchmarks start a server.

``bench compare --clock real`` runs one per policy and seed; the scripts under ``bench/`` start
theirs through it too. It waits for ``/readyz``, stops with SIGTERM (the server drains) and
SIGKILL if that hangs, and never leaves the process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from diffserve.errors import UserError


class ServerProcess:
    """A server subprocess we started: wait until ready, stop it gracefully, never leave it behind."""

    def __init__(self, cmd: list[str], url: str, log_path: Path, *, cwd: Path | None = None) -> None:
        self.cmd, self.url, self.log_path, self.cwd = cmd, url, log_path, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self) -> ServerProcess:  # noqa: PYI034 - typing.Self needs Python 3.11
        """Start the process, its output going to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ``GET /readyz`` answered 200; raise if the process dies or time runs out."""
        assert self.proc is not None
        start = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise UserError(f"the server exited with code {self.proc.returncode} before it was ready:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                if time.monotonic() - start > timeout_s:
                    raise UserError(f"the server was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait for the drain, SIGKILL if it hangs; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode
