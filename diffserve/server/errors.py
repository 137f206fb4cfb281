"""Errors the serving path raises, each knowing its HTTP status and OpenAI-style error type.

One boundary in :mod:`diffserve.server.api` turns a :class:`ServeError` into its status code and
an ``{"error": {...}}`` body; anything else is our bug and becomes a sanitised 500.
"""

from __future__ import annotations


class ServeError(Exception):
    """The base: a subclass states what differs as class keywords (``status=``, ``type=``, ``code=``)."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init_subclass__(cls, *, status: int | None = None, type: str | None = None, code: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in (("status", status), ("type", type), ("code", code)):
            if value is not None:
                setattr(cls, name, value)

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        #: the label of ``diffserve_rejected_total`` when this error refuses a request at admission
        self.reason = reason or self.code or "error"
        self.counted = False  # already in diffserve_rejected_total (the runtime counted it at admission)


class InvalidRequest(ServeError, status=400, type="invalid_request_error", code="invalid_request"):
    """The request itself is wrong (a field, a value): the client must change it."""


class UnprocessableRequest(InvalidRequest, status=422):
    """Well-formed, but asks for what this server cannot do."""


class BodyTooLarge(InvalidRequest, status=413, code="body_too_large"):
    """The body exceeds the server's limit."""


class NotFound(InvalidRequest, status=404, code="not_found"):
    """No such route or object."""


class Unauthorized(InvalidRequest, status=401, code="unauthorized"):
    """An admin route without the right token."""


class QueueFull(ServeError, status=429, type="rate_limit_error", code="queue_full"):
    """Admission control: the pool's bounded queue is full. 429 by default (configurable 503)."""


class Unavailable(ServeError, status=503, type="server_unavailable", code="unavailable"):
    """Not ready, draining, or the request cannot be served at all: answered at once."""


class DeadlineExceeded(ServeError, status=504, type="timeout_error", code="deadline_exceeded"):
    """The request's deadline passed before its images were ready."""


class WouldMissDeadline(Exception):
    """Internal: a queued heavy job can no longer finish in time; the router degrades it."""


class BatchCancelled(Exception):
    """Internal: every request of a running batch was gone, so it stopped at a step boundary."""

    def __init__(self, model: str, *, ran_ms: float, saved_ms: float) -> None:
        super().__init__(f"{model} batch stopped after {ran_ms:.0f} ms: every request in it was gone")
        self.ran_ms = ran_ms
        self.saved_ms = saved_ms


class WorkerCrashed(Exception):
    """Internal: the worker process died while running a batch; the batch may be retried once."""


class WorkerHung(Exception):
    """Internal: the worker exceeded its watchdog; it is restarted and the batch answered 504."""
