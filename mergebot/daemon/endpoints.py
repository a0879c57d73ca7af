"""The daemon's HTTP endpoints: the Hub webhook receiver, which only moves a check forward, and Prometheus metrics
with the status page beside them.

Each serves from its own thread; the caller shuts the returned servers down before it closes the state.
"""

import hmac
import json
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mergebot import log
from mergebot.config.daemon import DaemonSettings
from mergebot.daemon.page import page_html, page_json
from mergebot.errors import StateError

_log = log.get("daemon")


class _Quiet(BaseHTTPRequestHandler):
    """Requests are not access-logged: the daemon logs what they cause."""

    def log_message(self, *_args: object) -> None:
        return

    def reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(name: str, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(address, handler)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    _log.info(f"{name} listening", address=f"{address[0]}:{address[1]}")
    return server


def start_webhook(settings: DaemonSettings, on_update: Callable[[str], None]) -> ThreadingHTTPServer | None:
    """Accept Hub webhooks carrying the shared secret; `on_update(repo)` for each. None when not configured, or
    when its secret variable is empty (an open receiver would let anyone trigger checks)."""
    if settings.webhook_listen is None:
        return None
    secret = os.environ.get(settings.webhook_secret_env, "")
    if not secret:
        _log.error("webhook disabled: its secret variable is empty", variable=settings.webhook_secret_env)
        return None

    class Handler(_Quiet):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
            given = self.headers.get("X-Webhook-Secret", "")
            if not hmac.compare_digest(given.encode(), secret.encode()):
                _log.warning("webhook rejected: bad secret", client=self.client_address[0])
                self.reply(401)
                return
            try:
                repo = json.loads(body)["repo"]["name"]
            except (ValueError, KeyError, TypeError):
                self.reply(400)
                return
            _log.info("webhook", repo=repo)
            on_update(repo)
            self.reply(202)

    return _serve("webhook", settings.webhook_listen, Handler)


def start_metrics(
    address: tuple[str, int] | None, render: Callable[[], str], status: Callable[[], dict] | None
) -> ThreadingHTTPServer | None:
    """Serve `render()` at /metrics in Prometheus text format and, given `status` (the page's data), the status
    page at / and /status.json; None when no address is configured."""
    if address is None:
        return None
    routes = {"/metrics": lambda: (render(), "text/plain; version=0.0.4")}
    if status is not None:
        routes["/"] = lambda: (page_html(status()), "text/html; charset=utf-8")
        routes["/status.json"] = lambda: (page_json(status()), "application/json")

    class Handler(_Quiet):
        def do_GET(self) -> None:
            route = routes.get(self.path.partition("?")[0])
            if route is None:
                self.reply(404)
                return
            try:
                body, content_type = route()
            except StateError as error:
                self.reply(503, f"{error}\n".encode())
                return
            self.reply(200, body.encode(), content_type)

    return _serve("metrics", address, Handler)
