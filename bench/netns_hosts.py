"""Hosts by address on one machine: one network namespace per host on a private bridge.

Used by ``bench/ray_cluster.py --hosts netns``. The caller runs inside a parent network namespace
that it created itself (``unshare --net --mount``, see :func:`enter_parent_namespace`): that
namespace has loopback and the bridge and nothing else, so no route leads out of it; each host
namespace has one veth on the bridge with its own address (``10.77.0.1`` is the first host) and
no default route. Traffic can only reach these namespaces.

Everything started in a host is tracked by PID; :meth:`Hosts.close` SIGKILLs every process in
every host namespace (``ip netns pids``), then deletes the namespaces and the bridge. It runs on
normal exit, on an exception and on SIGTERM/SIGINT (the caller's ``with`` block).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

SUBNET = "10.77.0"
BRIDGE = "dsbr0"
MARK = "DIFFSERVE_NETNS_PARENT"


def sh(*argv: str, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def enter_parent_namespace() -> None:
    """Re-run this program inside a new network and mount namespace (once): loopback up, a
    private tmpfs on /run/netns for the host namespaces. Returns only inside it."""
    if os.environ.get(MARK) == str(os.getpid()):
        return
    if os.environ.get(MARK) is None:
        os.environ[MARK] = "pending"
        argv = ["unshare", "--net", "--mount", "--propagation", "private", "--", sys.executable, *sys.argv]
        os.execvp("unshare", argv)
    # the re-executed process: set up the parent namespace
    os.environ[MARK] = str(os.getpid())
    sh("ip", "link", "set", "lo", "up")
    os.makedirs("/run/netns", exist_ok=True)
    sh("mount", "-t", "tmpfs", "tmpfs", "/run/netns")


@dataclass
class Hosts:
    """``n`` host namespaces ``h0..h{n-1}`` with addresses ``10.77.0.1..n`` on a bridge."""

    n: int
    prefix: str = "dsh"
    procs: dict[str, list[subprocess.Popen]] = field(default_factory=dict)

    def name(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    @property
    def bridge_address(self) -> str:
        return f"{SUBNET}.254"

    def __enter__(self) -> "Hosts":
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        self._previous = previous
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "addr", "add", f"{self.bridge_address}/24", "dev", BRIDGE)
            sh("ip", "link", "set", BRIDGE, "up")
            for i in range(self.n):
                ns, host_if, peer = self.name(i), f"{self.prefix}v{i}", f"{self.prefix}e{i}"
                sh("ip", "netns", "add", ns)
                sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer)
                sh("ip", "link", "set", peer, "netns", ns)
                sh("ip", "link", "set", host_if, "master", BRIDGE)
                sh("ip", "link", "set", host_if, "up")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", peer)
                sh("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.close()
        raise SystemExit(128 + signum)

    def run(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in host ``i``; tracked for :meth:`kill_host` and :meth:`close`."""
        p = subprocess.Popen(["ip", "netns", "exec", self.name(i), *argv], **kw)
        self.procs.setdefault(self.name(i), []).append(p)
        return p

    def pids(self, i: int) -> list[int]:
        out = sh("ip", "netns", "pids", self.name(i), check=False)
        return [int(x) for x in out.split()]

    def kill_host(self, i: int) -> int:
        """SIGKILL every process in host ``i`` (a machine that loses power); returns how many."""
        killed = 0
        for _ in range(3):  # a dying parent can fork once more; look again
            pids = self.pids(i)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for p in self.procs.pop(self.name(i), []):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return killed

    def close(self) -> None:
        for i in range(self.n):
            if os.path.exists(f"/run/netns/{self.name(i)}"):
                self.kill_host(i)
                sh("ip", "netns", "del", self.name(i), check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        for s, h in getattr(self, "_previous", {}).items():
            signal.signal(s, h)
