"""Failures a test asks the devhub to inject: HTTP 500, 429 with Retry-After, a connection dropped mid-body, a delay,
and the lies of a hostile Hub (see `hostile`).

They let tests drive the client's retries and defences against a real server; each fault is used up by the
requests it matches.
"""

import re
import threading
import time
from dataclasses import dataclass
from typing import Literal

from mergebot.dev.devhub.hostile import HOSTILE_KINDS, HostileKind, tamper
from mergebot.dev.devhub.messages import Response, error_response
from mergebot.dev.devhub.routes import ROUTE_KINDS
from mergebot.dev.devhub.store import HubError

FaultKind = Literal["500", "429", "drop", "slow"] | HostileKind
FAULT_KINDS: tuple[str, ...] = ("500", "429", "drop", "slow", *HOSTILE_KINDS)


@dataclass
class Fault:
    """A failure for the next `times` requests whose route kind equals `match`, or whose path `match` searches."""

    match: str
    kind: FaultKind
    times: int = 1
    method: str | None = None
    retry_after: int = 1  # seconds, for "429"
    seconds: float = 1.0  # delay, for "slow"
    value: str = ""  # what a hostile kind sends
    extra: int = 0  # bytes beyond the file, for "oversize"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {FAULT_KINDS}")

    def applies(self, route_kind: str, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return self.match == route_kind if self.match in ROUTE_KINDS else re.search(self.match, path) is not None

    def response(self) -> Response | None:
        """The response replacing the route's for 500 and 429; "slow" waits here, "drop" acts while sending."""
        if self.kind == "500":
            return error_response(HubError(500, "Internal Error (injected by devhub)"))
        if self.kind == "429":
            headers = {"Retry-After": str(self.retry_after)}
            return error_response(HubError(429, "Too Many Requests (injected by devhub)", headers=headers))
        if self.kind == "slow":
            time.sleep(self.seconds)
        return None

    def tamper(self, response: Response) -> Response:
        """The route's response as a hostile Hub sends it (unchanged for the other kinds)."""
        return tamper(self.kind, response, self.value, self.extra)


class Faults:
    """The faults waiting for a request to match them, shared by the server's handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._pending.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    def take(self, route_kind: str, method: str, path: str) -> Fault | None:
        """The first fault this request matches, counted as used."""
        with self._lock:
            for fault in self._pending:
                if fault.applies(route_kind, method, path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._pending.remove(fault)
                    return fault
        return None
