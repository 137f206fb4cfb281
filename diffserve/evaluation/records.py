"""The per-request log: one record per request sent, whatever happened to it.

Failures, timeouts and refusals are records like any other, so the violation ratio is computed
over everything that was sent. Times are model milliseconds from the start of the run (wall time
multiplied by the speedup), the unit every SLO is stated in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from diffserve.errors import UserError
from diffserve.fileio import atomic_write_text


class Outcome(str, Enum):
    """How a request ended, judged against the SLO."""

    OK = "ok"  # answered within the SLO by the model the policy chose
    DEGRADED = "degraded"  # answered within the SLO with the light image instead of the heavy one
    LATE = "late"  # answered after the SLO, or 504: the deadline passed
    REJECTED = "rejected"  # 429/503: admission control or not ready
    FAILED = "failed"  # any other error, a timeout or a broken connection

    @property
    def violates(self) -> bool:
        return self in (Outcome.LATE, Outcome.REJECTED, Outcome.FAILED)


class RequestRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, description="position in the arrival list")
    prompt_index: int = Field(ge=0)
    scheduled_ms: float = Field(description="model time the request was due, from the start")
    sent_ms: float | None = Field(default=None, description="model time it actually left the client")
    done_ms: float | None = Field(default=None, description="model time the answer or the error arrived")
    status: int | None = Field(default=None, description="HTTP status; None when no response came")
    error: str | None = None
    model: str | None = Field(default=None, description="the model that answered")
    degraded: bool = False
    confidence: float | None = None
    latency_ms: float | None = Field(default=None, description="server-reported latency, model ms")
    queue_ms: float | None = None
    compute_ms: float | None = None
    retry_after: int | None = None
    ttfi_ms: float | None = Field(
        default=None, description="streamed requests: time to the first image (the partial light one), server-reported model ms"
    )

    @property
    def client_latency_ms(self) -> float | None:
        """Latency seen by the client, from the scheduled arrival (so client lag counts too)."""
        return None if self.done_ms is None else self.done_ms - self.scheduled_ms

    @property
    def effective_latency_ms(self) -> float | None:
        """The latency judged against the SLO: the server's own measure when it gave one.

        The emulated server runs on one injected model clock; the client's wall clock, multiplied
        by the speedup, also magnifies Python's scheduling jitter on a busy machine, so the
        server-reported figure is the fairer one and the client figure is kept for checking.
        """
        return self.latency_ms if self.latency_ms is not None else self.client_latency_ms

    def outcome(self, slo_ms: float, *, client_view: bool = False) -> Outcome:
        """The outcome against ``slo_ms``; ``client_view`` judges by the client's latency instead."""
        if self.status == 200:
            latency = self.client_latency_ms if client_view else self.effective_latency_ms
            if latency is not None and latency > slo_ms:
                return Outcome.LATE
            return Outcome.DEGRADED if self.degraded else Outcome.OK
        if self.status == 504:
            return Outcome.LATE
        if self.status in (429, 503):
            return Outcome.REJECTED
        return Outcome.FAILED


def write_jsonl(path: str | Path, records: Iterable[RequestRecord]) -> Path:
    """Write the log atomically, one JSON object per line, in arrival order."""
    lines = [r.model_dump_json() for r in sorted(records, key=lambda r: r.index)]
    return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def read_jsonl(path: str | Path) -> list[RequestRecord]:
    source = Path(path)
    if not source.is_file():
        raise UserError(f"request log not found: {source}")
    out = []
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(RequestRecord.model_validate(json.loads(line)))
        except (ValueError, TypeError) as exc:
            raise UserError(f"{source}:{lineno}: not a request record ({exc.__class__.__name__})") from None
    return out
