"""How many accepted-by-the-kernel connections wait for the server: the HTTP layer's own overload.

The door (:mod:`diffserve.server.shedding`) shuts when the models cannot take more work. Past what
one CPU can parse (about 650 image requests/s on this project's 2-core box) the models sit idle
and the event loop is the bottleneck; yet its iterations stay short (a few ms, measured), so the
loop's lateness does not show it. The wait is in the kernel's accept queue: connections the
kernel has completed and the server has not accepted yet, which the server cannot see by
itself. Before this check, 1,500 rps were all admitted and answered in 6 s against a 0.5 s SLO
(docs/serving.md).

Linux reports that queue's length for a listening socket (``TCP_INFO``: ``tcpi_unacked`` holds the
accept backlog, ``tcpi_sacked`` its limit). While it is longer than the server accepts in
``max_wait_s``, image requests are refused unparsed, which costs a fraction of an admission, so
the loop catches up and every connection, refused or admitted, waits little. Elsewhere the
length is unknown and this check never shuts the door.
"""

from __future__ import annotations

import socket
import struct
import time

#: The longest a connection should wait in the accept queue before it is answered (wall seconds).
MAX_ACCEPT_WAIT_S = 0.01
#: Never shut the door for a queue this short (a burst of a few simultaneous connects is normal).
MIN_QUEUE = 8
_TCP_INFO_LEN, _UNACKED_OFFSET = 104, 24  # struct tcp_info: 8 one-byte fields, rto, ato, snd_mss, rcv_mss, unacked
_RATE_WINDOW_S = 0.25


class AcceptBacklog:
    """The accept queue of one listening socket, judged against the rate the server takes requests."""

    def __init__(self, sock: socket.socket | None, max_wait_s: float = MAX_ACCEPT_WAIT_S, min_queue: int = MIN_QUEUE) -> None:
        self.sock = sock if sock is not None and hasattr(socket, "TCP_INFO") else None
        self.max_wait_s = max_wait_s
        self.min_queue = min_queue
        self.rate = 0.0  # requests judged per second, over the last window
        self._count = 0
        self._window_start = time.monotonic()

    def length(self) -> int | None:
        """Connections completed by the kernel and not yet accepted; ``None`` where unknown."""
        if self.sock is None:
            return None
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            self.sock = None  # closed, or not a TCP socket: no signal from now on
            return None
        return struct.unpack_from("I", info, _UNACKED_OFFSET)[0]

    def behind(self) -> bool:
        """Called once per new request: do more connections wait than the server takes in ``max_wait_s``?"""
        now = time.monotonic()
        self._count += 1
        if now - self._window_start >= _RATE_WINDOW_S:
            self.rate = self._count / (now - self._window_start)
            self._count, self._window_start = 0, now
        queued = self.length()
        return queued is not None and queued > max(self.min_queue, self.rate * self.max_wait_s)
