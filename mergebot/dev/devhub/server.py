"""The local Hugging Face Hub (devhub): the HTTP API the real `huggingface_hub` client calls, served from a directory.

Tests and `mergebot demo` need a Hub without internet. Repos are stored with real commits (see `store`), so
revisions, refs and history behave as on the Hub. For tests the server also counts requests per route and bytes per
file (to assert what was and was not downloaded), injects faults on request (HTTP 500, 429 with Retry-After, a
connection dropped mid-body, slow responses) and posts webhooks after commits. Standard library only; run it with
`DevHub(root).start()` in-process or `serve()` in the foreground.
"""

import logging
import signal
import socket
import threading
from collections.abc import Iterable, Mapping
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

from mergebot.dev.devhub.api import HubApi
from mergebot.dev.devhub.faults import Fault, FaultKind, Faults
from mergebot.dev.devhub.messages import Body, Request, Response, bearer_token, error_response, json_response
from mergebot.dev.devhub.routes import route
from mergebot.dev.devhub.stats import Stats
from mergebot.dev.devhub.store import DEFAULT_BRANCH, Commit, Delete, HubError, Repo, RepoType, Store
from mergebot.dev.devhub.webhooks import Webhooks

logger = logging.getLogger(__name__)
_SEND_CHUNK = 8 * 1024 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: "DevHub") -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("devhub connection from %s failed", client_address, exc_info=True)

    def hang_up_all(self) -> None:
        """Close kept-alive connections, so no handler thread keeps serving after stop()."""
        with self.connections_lock:
            for conn in self.connections:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _handle(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        body = Body(self.rfile, self.headers)
        host = self.headers.get("Host") or hub.url.removeprefix("http://")
        req = Request(self.command, url.path, parse_qs(url.query), self.headers, body, f"http://{host}")
        fault = None
        try:
            if url.path.startswith("/_devhub/"):
                response = hub._control(req)
            else:
                response, fault = hub._answer(req)
        except HubError as err:
            response = error_response(err)
        except (ValueError, KeyError, TypeError) as err:
            response = error_response(HubError(400, f"Malformed request: {err!r}"))
        except Exception:
            logger.exception("devhub failed on %s %s", self.command, self.path)
            response = error_response(HubError(500, "devhub internal error"))
        try:
            body.drain()
        except OSError:
            self.close_connection = True
            return
        self._send(response, drop=fault is not None and fault.kind == "drop")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def _send(self, response: Response, *, drop: bool) -> None:
        """Write the response; a "drop" fault sends the headers and half the body, then closes the socket."""
        length = (response.length if response.file else len(response.body)) + response.padding
        if drop and (self.command == "HEAD" or length == 0):
            self._hang_up()  # no body to cut short: the client gets no response at all
            return
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            limit = length // 2 if drop else length
            sent = 0
            try:
                if response.file is None:
                    self.wfile.write(response.body[:limit])
                    sent = min(limit, len(response.body))
                else:
                    with response.file.open("rb") as f:
                        while sent < limit - response.padding:
                            n = self.connection.sendfile(f, response.start + sent, min(_SEND_CHUNK, limit - sent))
                            if n == 0:
                                break
                            sent += n
                while sent < limit:  # a hostile Hub's bytes beyond the file
                    self.wfile.write(b"\0" * min(_SEND_CHUNK, limit - sent))
                    sent += min(_SEND_CHUNK, limit - sent)
            except OSError:
                self.close_connection = True
            if response.counted:
                self.server.hub._stats.served(*response.counted, sent)
        if drop:
            self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        with suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class DevHub:
    """A local Hub serving the repos stored under `root` on a loopback port (a free one by default).

    `tokens=None` accepts any bearer token; a set accepts only those, so a test can revoke one (401). Writes and
    private repos need a token, as on the Hub. Only one DevHub may serve a given root at a time.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0, tokens: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        self._address = (host, port)
        self._store = Store(self.root)
        self._stats = Stats()
        self._api = HubApi(self._store, self._stats, self._committed)
        self._tokens = None if tokens is None else frozenset(tokens)
        self._faults = Faults()
        self._webhooks = Webhooks()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the DevHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        """Serve from a daemon thread; returns self so `hub = DevHub(root).start()` reads naturally."""
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="devhub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.hang_up_all()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self if self._server else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_tokens(self, tokens: Iterable[str] | None) -> None:
        """Change which tokens are valid (None: any), e.g. to revoke one in the middle of a test."""
        self._tokens = None if tokens is None else frozenset(tokens)

    def stats(self) -> dict[str, Any]:
        """A snapshot: `requests` and `requests_by_method` ("GET resolve") counts per route kind, and per repo
        and file the bytes `bytes_served` by resolve GETs (under `xet:REPO`, per xorb, by Xet downloads), the
        bytes of each file `bytes_received` through a commit, an LFS upload or new Xet xorbs, and per repo the
        `xorb_bytes_received` (what Xet uploads really sent: compressed, only the chunks the Hub lacked)."""
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    def inject(
        self,
        match: str,
        fault: FaultKind,
        times: int = 1,
        *,
        method: str | None = None,
        retry_after: int = 1,
        seconds: float = 1.0,
        value: str = "",
        extra: int = 0,
    ) -> None:
        """Fail the next `times` requests whose route kind is `match` (see `api.ROUTE_KINDS`) or whose decoded path
        `match` searches as a regex, optionally only for one HTTP method.

        "500" and "429" (with `Retry-After: retry_after`) answer instead of the route, so nothing changes on the
        server; "slow" waits `seconds` first; "drop" runs the route, then sends half the body and hangs up; the
        hostile kinds (`hostile.HOSTILE_KINDS`) run the route and lie in its answer with `value` or `extra`.
        """
        self._faults.add(Fault(match, fault, times, method, retry_after, seconds, value, extra))

    def clear_faults(self) -> None:
        self._faults.clear()

    def add_webhook(self, url: str, secret: str) -> None:
        """POST a `repo.content` update event to `url` after every commit, with `X-Webhook-Secret: secret`."""
        self._webhooks.add(url, secret)

    def create_repo(self, repo_id: str, *, xet: bool = True, repo_type: RepoType = "model") -> None:
        """Create a repo with Xet storage (as the Hub does) or without it, listing and serving files as LFS only."""
        self._store.create_repo(repo_type, repo_id, private=False, xet=xet)

    def xet_ranges(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> dict[str, int]:
        """Per xorb, the bytes a Xet download of a file fetches (the ranges its reconstruction names): what a test
        compares with `bytes_served["xet:REPO"]`."""
        repo = self._store.repo("model", repo_id)
        entry = self._store.resolve(repo, revision).tree[path] if repo else None
        if entry is None or entry.xet_hash is None:
            raise KeyError(f"{repo_id}@{revision}: {path} is not a Xet file")
        fetch = self._api.cas.storage.reconstruction(entry.xet_hash, None, "")["fetch_info"]
        return {x: sum(e["url_range"]["end"] + 1 - e["url_range"]["start"] for e in v) for x, v in fetch.items()}

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        message: str = "Commit from devhub",
        delete: Iterable[str] = (),
        branch: str = DEFAULT_BRANCH,
        repo_type: RepoType = "model",
    ) -> str:
        """Commit straight into the store, creating the repo if needed, and return the commit id.

        Paths are not checked, unlike over HTTP: tests use this to plant what the real client refuses to upload
        (`../evil.safetensors`, absolute paths).
        """
        repo = self._store.repo(repo_type, repo_id) or self._store.create_repo(repo_type, repo_id, private=False)
        operations = [self._store.put(path, content) for path, content in files.items()]
        operations += [Delete(path) for path in delete]
        commit, old = self._store.commit(repo, branch, operations, message)
        host, port = self._server.server_address[:2] if self._server else self._address
        self._committed(repo, branch, commit, old, f"http://{host}:{port}")
        return commit.id

    def _committed(self, repo: Repo, branch: str, commit: Commit, old: str, base_url: str) -> None:
        head = self._store.resolve(repo, DEFAULT_BRANCH).id
        self._webhooks.notify(repo, branch, commit, old, head, base_url)

    def _answer(self, req: Request) -> tuple[Response, Fault | None]:
        """Route a Hub API request, counted, and failed instead when a fault matches it."""
        kind, handler, req.params = route(req.method, req.path)
        self._stats.request(kind, req.method)
        fault = self._faults.take(kind, req.method, unquote(req.path))
        response = fault.response() if fault else None
        if response is None:
            req.token = bearer_token(req.headers, self._tokens)
            response = handler(self._api, req)
            if fault is not None:
                response = fault.tamper(response)
        return response, fault

    def _control(self, req: Request) -> Response:
        """`/_devhub/…`: stats, faults and webhooks for tests in other processes; never counted nor faulted."""
        match req.method, req.path:
            case "GET", "/_devhub/stats":
                return json_response(200, self.stats())
            case "DELETE", "/_devhub/stats":
                self.reset_stats()
            case "POST", "/_devhub/faults":
                data = req.json()
                options = {k: data[k] for k in ("method", "retry_after", "seconds", "value", "extra") if k in data}
                self.inject(data["match"], data["fault"], data.get("times", 1), **options)
            case "DELETE", "/_devhub/faults":
                self.clear_faults()
            case "POST", "/_devhub/webhooks":
                data = req.json()
                self.add_webhook(data["url"], data.get("secret", ""))
            case _:
                raise HubError(404, f"devhub has no control route {req.method} {req.path}")
        return json_response(200, {})


def serve(root: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run a devhub in the foreground until SIGINT or SIGTERM (`mergebot devhub`); call from the main thread."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    with DevHub(root, host, port) as hub:
        print(f"devhub serving {Path(root).resolve()} at {hub.url}", flush=True)
        stopping.wait()
