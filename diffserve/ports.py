"""Free ports for the servers we start ourselves (benchmarks, tests, the Ray engine's HTTP proxy)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """An unused port on ``host``: bound then released, for a server that binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
