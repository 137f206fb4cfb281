"""The request ledger in two units: HTTP requests and the images they ask for, never mixed.

One request asks for ``n`` images; admission takes all of them or none. Counting both in one number
(images at admission, one per request shed at the door) made ``accepted = completed + failed +
cancelled`` impossible to check against a client's own counts. Here each unit keeps its own
invariant once nothing is in flight:

- ``requests_offered = requests_rejected + requests_accepted`` and
  ``requests_accepted = requests_completed + requests_failed + requests_cancelled``;
- the same with ``images_*``.

A request refused at the door before its body is read (``requests_shed``, part of
``requests_rejected``) has an unknown ``n``: it is counted in requests only. The controller plans in
images, so its demand (:meth:`Ledger.demand_images`) adds those at the mean ``n`` of the requests it
did read. A request's outcome: completed when every image was, cancelled when any was cancelled
(the client left), else failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

from prometheus_client.core import CounterMetricFamily

OUTCOMES = ("offered", "rejected", "accepted", "completed", "failed", "cancelled")


@dataclass
class Ledger:
    requests_offered: int = 0
    requests_rejected: int = 0
    requests_shed: int = 0  # refused at the door unread (their n is unknown); part of requests_rejected
    requests_accepted: int = 0
    requests_completed: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    images_offered: int = 0
    images_rejected: int = 0
    images_accepted: int = 0
    images_completed: int = 0
    images_failed: int = 0
    images_cancelled: int = 0

    # ------------------------------------------------------------ the two units' events
    def shed(self) -> None:
        """A request refused before it was read: one request, images unknown."""
        self.requests_offered += 1
        self.requests_rejected += 1
        self.requests_shed += 1

    def offer(self, n: int) -> None:
        self.requests_offered += 1
        self.images_offered += n

    def reject(self, n: int) -> None:
        self.requests_rejected += 1
        self.images_rejected += n

    def accept(self, n: int) -> None:
        self.requests_accepted += 1
        self.images_accepted += n

    def settle_image(self, outcome: str) -> None:
        """One admitted image answered: ``completed``, ``failed`` or ``cancelled``."""
        name = f"images_{outcome}"
        setattr(self, name, getattr(self, name) + 1)

    def settle_request(self, outcomes: list[str]) -> None:
        """An admitted request once all its images are answered (their outcomes)."""
        outcome = "completed" if all(o == "completed" for o in outcomes) else "cancelled" if "cancelled" in outcomes else "failed"
        name = f"requests_{outcome}"
        setattr(self, name, getattr(self, name) + 1)

    # ------------------------------------------------------------ views
    @property
    def inflight(self) -> int:
        """Admitted images not answered yet."""
        return self.images_accepted - self.images_completed - self.images_failed - self.images_cancelled

    @property
    def requests_inflight(self) -> int:
        return self.requests_accepted - self.requests_completed - self.requests_failed - self.requests_cancelled

    def demand_images(self) -> float:
        """Images offered so far, counting each request shed unread at the mean ``n`` of those read."""
        read = self.requests_offered - self.requests_shed
        mean_n = self.images_offered / read if read else 1.0
        return self.images_offered + self.requests_shed * mean_n

    def view(self) -> dict[str, int]:
        return asdict(self)

    # the image-unit names the rest of the server used before the split (the controller plans in images)
    offered = property(lambda self: self.images_offered)
    rejected = property(lambda self: self.images_rejected)
    accepted = property(lambda self: self.images_accepted)
    completed = property(lambda self: self.images_completed)
    failed = property(lambda self: self.images_failed)
    cancelled = property(lambda self: self.images_cancelled)


class LedgerCollector:
    """``/metrics`` view of the ledger: ``diffserve_ledger_requests_total`` and
    ``diffserve_ledger_images_total``, one series per outcome, each family naming its unit."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[CounterMetricFamily]:
        for unit, what in (("requests", "HTTP image requests (one per POST, whatever its n)"),
                           ("images", "images (a request asks for n; a request shed unread counts in requests only)")):
            family = CounterMetricFamily(
                f"diffserve_ledger_{unit}", f"the ledger in {what}, by outcome: offered = rejected + accepted, "
                "accepted = completed + failed + cancelled + in flight", labels=["outcome"],
            )
            for outcome in OUTCOMES:
                family.add_metric([outcome], getattr(self.ledger, f"{unit}_{outcome}"))
            if unit == "requests":
                family.add_metric(["shed"], self.ledger.requests_shed)
            yield family
