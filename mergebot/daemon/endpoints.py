"""The daemon's HTTP endpoints: the Hub webhook receiver, which only moves a check forward, and Prometheus metrics
with the status page beside them.

Each serves from its own thread within listener.py's bounds; the caller shuts the returned servers down before it
closes the state.
"""

import hmac
import json
import os
import re
from collections.abc import Callable

from mergebot import log
from mergebot.config.daemon import DaemonSettings
from mergebot.daemon.listener import HEAD_BYTES, BoundedServer, Handler, serve
from mergebot.daemon.page import page_html, page_json
from mergebot.errors import StateError

MAX_BODY = 64 * 1024
"""A Hub webhook's payload is a few KiB."""
MAX_DEPTH = 32
"""Of the payload's JSON nesting (the Hub's is 4 deep): deeper is refused before it is parsed."""
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")

_log = log.get("daemon")


def start_webhook(settings: DaemonSettings, on_update: Callable[[str], None]) -> BoundedServer | None:
    """Accept Hub webhooks carrying the shared secret; `on_update(repo)` for each. None when not configured, or
    when its secret variable is empty (an open receiver would let anyone trigger checks).

    The secret is checked before a byte of the body is read, and the body's size before it is read."""
    if settings.webhook_listen is None:
        return None
    secret = os.environ.get(settings.webhook_secret_env, "").strip()  # an env file's trailing newline
    if not secret:
        _log.error("webhook disabled: its secret variable is empty", variable=settings.webhook_secret_env)
        return None

    class Webhook(Handler):
        def do_POST(self) -> None:
            given = self.headers.get("X-Webhook-Secret", "")
            length = self.headers.get("Content-Length", "")
            size = int(length) if re.fullmatch(r"\d{1,12}", length) else None
            if not hmac.compare_digest(given.encode(), secret.encode()):
                if size is not None and size <= MAX_BODY:  # so the client reads the 401, not a reset connection
                    self.rfile.read(size)
                self.reject(401, "bad secret")
                return
            if size is None:
                self.reject(400, "no valid Content-Length")
                return
            if size > MAX_BODY:
                self.reject(413, f"body over {MAX_BODY // 1024} KiB")
                return
            repo = updated_repo(self.rfile.read(size))
            if repo is None:
                self.reject(400, "not a Hub webhook payload")
                return
            _log.info("webhook", repo=repo)
            on_update(repo)
            self.reply(202)

    return serve("webhook", settings.webhook_listen, Webhook, HEAD_BYTES + MAX_BODY)


def updated_repo(body: bytes) -> str | None:
    """The repo a webhook payload names, or None for anything that is not one."""
    if json_depth(body) > MAX_DEPTH:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    repo = payload.get("repo") if isinstance(payload, dict) else None
    name = repo.get("name") if isinstance(repo, dict) else None
    return name if isinstance(name, str) and REPO_ID.fullmatch(name) else None


def json_depth(text: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def start_metrics(
    address: tuple[str, int] | None, render: Callable[[], str], status: Callable[[], dict] | None
) -> BoundedServer | None:
    """Serve `render()` at /metrics in Prometheus text format and, given `status` (the page's data), the status
    page at / and /status.json; None when no address is configured."""
    if address is None:
        return None
    routes = {"/metrics": lambda: (render(), "text/plain; version=0.0.4")}
    if status is not None:
        routes["/"] = lambda: (page_html(status()), "text/html; charset=utf-8")
        routes["/status.json"] = lambda: (page_json(status()), "application/json")

    class Metrics(Handler):
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

    return serve("metrics", address, Metrics, HEAD_BYTES)
