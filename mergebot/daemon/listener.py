"""HTTP serving that no client can exhaust, for the webhook receiver and the metrics listener.

A fixed number of connections at once (one more is closed as it is accepted, with no thread of its own); one
deadline for the whole of a request, however slowly its bytes arrive (a socket timeout alone bounds each read, so
a byte every few seconds would hold a thread for ever); a byte budget per request. Rejected requests are counted,
not logged one by one: a reason's first reject is logged at once, then at most one line a minute per reason with
the number since its last line, and what is left when the server stops.
"""

import io
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import socket

from mergebot import log

MAX_CONNECTIONS = 8
"""Requests served at once per listener: the Hub sends a webhook now and then, Prometheus scrapes every few seconds."""
REQUEST_S = 5.0
"""From accepting a connection to the last byte of its answer."""
HEAD_BYTES = 16 * 1024
"""The request line and headers: the Hub's and Prometheus' are a few hundred bytes."""
REJECTS_EVERY_S = 60.0

_log = log.get("daemon")


class Expired(Exception):
    """The request's deadline passed before it was read or answered."""


class TooLarge(Exception):
    """The request sent more bytes than its budget."""


class _Budgeted(io.RawIOBase):
    """A connection's bytes, read within its deadline and byte budget."""

    def __init__(self, sock: socket, deadline: float, budget: int) -> None:
        self.sock = sock
        self.deadline = deadline
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.budget <= 0:
            raise TooLarge
        self.sock.settimeout(remaining(self.deadline))
        try:
            count = self.sock.recv_into(memoryview(buffer)[: self.budget])
        except TimeoutError as error:
            raise Expired from error
        self.budget -= count
        return count


def remaining(deadline: float) -> float:
    """Seconds left before `deadline`, as a socket timeout; Expired when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise Expired
    return left


class Rejects:
    """Rejected requests by reason, logged as `event` with the reason and how many since its last line."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.logged: dict[str, float] = {}

    def note(self, reason: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            if now - self.logged.get(reason, -math.inf) < REJECTS_EVERY_S:
                return
            count, self.counts[reason], self.logged[reason] = self.counts[reason], 0, now
        _log.warning(self.event, reason=reason, count=count)

    def flush(self) -> None:
        """Log the counts no line told yet."""
        with self.lock:
            left = {reason: count for reason, count in self.counts.items() if count}
            self.counts.clear()
        for reason, count in left.items():
            _log.warning(self.event, reason=reason, count=count)


class Handler(BaseHTTPRequestHandler):
    """Reads through the request's budget and deadline; not access-logged (the daemon logs what requests cause,
    and the server counts what it rejects)."""

    server: "BoundedServer"

    def setup(self) -> None:
        super().setup()
        self.deadline = time.monotonic() + REQUEST_S
        self.rfile.close()  # the socket's own reader, replaced by one that keeps the bounds
        self.rfile = io.BufferedReader(_Budgeted(self.connection, self.deadline, self.server.request_bytes))

    def log_message(self, *_args: object) -> None:
        return

    def log_error(self, format: str, *args: object) -> None:
        """Called by `send_error`, for a request line or headers that cannot be parsed."""
        self.server.rejects.note(f"HTTP {args[0]}" if format.startswith("code") and args else "bad request")

    def reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.connection.settimeout(remaining(self.deadline))  # sendall: a bound on the whole answer
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reject(self, status: int, reason: str) -> None:
        self.server.rejects.note(reason)
        self.reply(status)


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them; each request within `request_bytes`."""

    request_queue_size = 64
    """Connections the kernel holds until they are accepted: a burst is accepted (and the excess closed) at once,
    rather than left to the clients' connect retries."""

    def __init__(self, name: str, address: tuple[str, int], handler: type[Handler], request_bytes: int) -> None:
        super().__init__(address, handler)
        self.request_bytes = request_bytes
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.rejects = Rejects(f"{name} requests rejected")

    def process_request(self, request: socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        if not self.slots.acquire(blocking=False):
            self.rejects.note(f"more than {MAX_CONNECTIONS} connections at once")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        """Counted like any reject, never a traceback on stderr (socketserver's default)."""
        error = sys.exc_info()[1]
        if isinstance(error, Expired):
            reason = f"not sent and answered within {REQUEST_S:g} s"
        elif isinstance(error, TooLarge):
            reason = "request too large"
        elif isinstance(error, OSError):
            reason = "connection broken"
        else:
            reason = f"internal error ({type(error).__name__})"
        self.rejects.note(reason)

    def shutdown(self) -> None:
        super().shutdown()
        self.rejects.flush()


def serve(name: str, address: tuple[str, int], handler: type[Handler], request_bytes: int) -> BoundedServer:
    server = BoundedServer(name, address, handler, request_bytes)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    _log.info(f"{name} listening", address=f"{address[0]}:{address[1]}")
    return server
