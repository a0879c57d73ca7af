"""The local Hugging Face Hub (devhub): the HTTP API the real `huggingface_hub` client calls, served from a directory.

Tests and `mergebot demo` need a Hub without internet. Repos are stored with real commits (see `devhub_store`), so
revisions, refs and history behave as on the Hub. For tests the server also counts requests per route and bytes per
file (to assert what was and was not downloaded), injects faults on request (HTTP 500, 429 with Retry-After, a
connection dropped mid-body, slow responses) and posts webhooks after commits. Standard library only; run it with
`DevHub(root).start()` in-process or `serve()` in the foreground.
"""

import base64
import hashlib
import io
import json
import logging
import re
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Literal, Self
from urllib.parse import parse_qs, unquote, urlsplit

from mergebot.dev.devhub.store import (
    DEFAULT_BRANCH,
    REPO_TYPES,
    Commit,
    Delete,
    Entry,
    HubError,
    Operation,
    PutFile,
    PutLfs,
    Repo,
    RepoType,
    Store,
    folder_oid,
    folders,
    is_lfs,
    repo_key,
)

logger = logging.getLogger(__name__)

USER = "devhub"  # the account every accepted token belongs to, and the namespace of repos created without one
FaultKind = Literal["500", "429", "drop", "slow"]
FAULT_KINDS: tuple[FaultKind, ...] = ("500", "429", "drop", "slow")
_PLURALS: dict[str, RepoType] = {f"{t}s": t for t in REPO_TYPES}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SEND_CHUNK = 8 * 1024 * 1024


class _Body:
    """A request body read on demand, plain or chunked, so multi-GB LFS uploads stream to disk."""

    def __init__(self, rfile: BinaryIO, headers: Message) -> None:
        self._rfile = rfile
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._left = 0 if self._chunked else int(headers.get("Content-Length") or 0)
        self._done = not self._chunked and self._left == 0

    def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" once the body is consumed."""
        if self._done:
            return b""
        if self._chunked and self._left == 0:
            self._left = int(self._rfile.readline().split(b";")[0], 16)
            if self._left == 0:
                while self._rfile.readline().strip():  # trailers, up to the blank line
                    pass
                self._done = True
                return b""
        data = self._rfile.read(min(size, self._left))
        if not data:
            raise ConnectionError("client closed the connection mid-body")
        self._left -= len(data)
        if self._left == 0:
            if self._chunked:
                self._rfile.readline()  # the CRLF closing the chunk
            else:
                self._done = True
        return data

    def read_all(self) -> bytes:
        return b"".join(iter(lambda: self.read(1 << 20), b""))

    def drain(self) -> None:
        """Consume what the route did not read, so the next request on this connection parses."""
        while self.read(1 << 20):
            pass


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: _Body
    base_url: str
    params: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    def json(self) -> Any:
        return json.loads(self.body.read_all() or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


@dataclass
class _Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # sent instead of `body`: `length` bytes from `start`
    start: int = 0
    length: int = 0
    counted: tuple[str, str] | None = None  # (repo, path) whose served bytes go to the stats


def _json(status: int, data: Any, content_type: str = "application/json") -> _Response:
    return _Response(status, {"Content-Type": content_type}, json.dumps(data).encode())


def _error(err: HubError) -> _Response:
    response = _json(err.status, {"error": err.message})
    # Messages quote file names; JSON escaping keeps the header ASCII and on one line.
    response.headers |= err.headers | {"X-Error-Message": json.dumps(err.message)[1:-1]}
    if err.code:
        response.headers["X-Error-Code"] = err.code
    return response


def _checked_path(path: str) -> str:
    """Refuse file names that could escape a checkout; only `DevHub.commit_files` may plant such names."""
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, length) of a single `bytes=` range, None for the whole file; 416 when it is unsatisfiable."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if match is None or match[1] == match[2] == "":
        return None  # absent, malformed or multi-range: serve the whole file, as HTTP allows
    if match[1]:
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
    else:
        start, end = max(size - int(match[2]), 0), size - 1
    if start >= size or start > end:
        raise HubError(416, f"Range {header} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end - start + 1


def _file_json(path: str, entry: Entry) -> dict[str, Any]:
    """A tree / paths-info entry; LFS details use the tree API's names (`oid`, `pointerSize`)."""
    data: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
    if entry.sha256:
        data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return data


def _folder_json(commit: Commit, path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": folder_oid(commit.tree, path), "size": 0, "path": path}


class _Stats:
    """Thread-safe counters: requests per route kind, bytes served and bytes uploaded per (repo, file)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests: Counter[str] = Counter()
            self._by_method: Counter[str] = Counter()
            self._served: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self._received: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self._unclaimed: Counter[tuple[str, str]] = Counter()  # LFS bytes until a commit names their path

    def request(self, kind: str, method: str) -> None:
        with self._lock:
            self._requests[kind] += 1
            self._by_method[f"{method} {kind}"] += 1

    def served(self, repo: str, path: str, size: int) -> None:
        with self._lock:
            self._served[repo][path] += size

    def received(self, repo: str, path: str, size: int) -> None:
        with self._lock:
            self._received[repo][path] += size

    def lfs_uploaded(self, repo: str, sha256: str, size: int) -> None:
        with self._lock:
            self._unclaimed[(repo, sha256)] += size

    def lfs_committed(self, repo: str, path: str, sha256: str) -> None:
        with self._lock:
            self._received[repo][path] += self._unclaimed.pop((repo, sha256), 0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self._requests),
                "requests_by_method": dict(self._by_method),
                "bytes_served": {repo: dict(files) for repo, files in self._served.items()},
                "bytes_served_total": sum(sum(files.values()) for files in self._served.values()),
                "bytes_received": {repo: dict(files) for repo, files in self._received.items()},
            }


@dataclass
class _Fault:
    """A failure for the next `times` requests whose route kind equals `match`, or whose path `match` searches."""

    match: str
    kind: FaultKind
    times: int = 1
    method: str | None = None
    retry_after: int = 1  # seconds, for "429"
    seconds: float = 1.0  # delay, for "slow"

    def applies(self, route_kind: str, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return self.match == route_kind if self.match in ROUTE_KINDS else re.search(self.match, path) is not None


def _fault_response(fault: _Fault | None) -> _Response | None:
    """The response replacing the route's for 500 and 429; "slow" waits here, "drop" acts while sending."""
    if fault is None:
        return None
    if fault.kind == "500":
        return _error(HubError(500, "Internal Error (injected by devhub)"))
    if fault.kind == "429":
        headers = {"Retry-After": str(fault.retry_after)}
        return _error(HubError(429, "Too Many Requests (injected by devhub)", headers=headers))
    if fault.kind == "slow":
        time.sleep(fault.seconds)
    return None


class _HubApi:
    """The Hub's HTTP routes over the store; each returns a response or raises HubError."""

    def __init__(self, store: Store, stats: _Stats, on_commit: Callable[[Repo, str, Commit, str, str], None]) -> None:
        self.store = store
        self.stats = stats
        self.on_commit = on_commit

    def _lookup(self, req: _Request) -> Repo:
        repo_id = f"{req.params['ns']}/{req.params['name']}"
        repo = self.store.repo(_PLURALS[req.params.get("type") or "models"], repo_id)
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _repo(self, req: _Request, *, write: bool = False) -> Repo:
        """The repo in the URL, hidden as the Hub hides missing and private repos: 401 without a token, else 404."""
        try:
            repo = self._lookup(req)
            if repo.private and req.token is None:
                raise HubError(404, f"Repository not found: {repo.id}", "RepoNotFound")
        except HubError as err:
            raise HubError(401 if req.token is None else 404, err.message, "RepoNotFound") from None
        if write:
            _require_token(req)
        return repo

    def whoami(self, req: _Request) -> _Response:
        _require_token(req)
        access = {"displayName": USER, "role": "write"}
        user = {"type": "user", "id": USER, "name": USER, "fullname": USER, "email": None, "orgs": []}
        return _json(200, user | {"auth": {"type": "access_token", "accessToken": access}})

    def repo_create(self, req: _Request) -> _Response:
        _require_token(req)
        data = req.json()
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or USER}/{data['name']}"
        if repo_type not in REPO_TYPES or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise HubError(400, f"Invalid repo: {repo_type} {repo_id}")
        url = f"{req.base_url}/{repo_key(repo_type, repo_id)}"
        private = data.get("visibility") == "private" or data.get("private") is True
        try:
            self.store.create_repo(repo_type, repo_id, private)
        except HubError as err:
            if err.status != 409:
                raise
            return _json(409, {"error": err.message, "url": url})
        return _json(200, {"url": url, "name": repo_id})

    def repo_delete(self, req: _Request) -> _Response:
        _require_token(req)
        data = req.json()
        self.store.delete_repo(data.get("type") or "model", f"{data.get('organization') or USER}/{data['name']}")
        return _json(200, {})

    def validate_yaml(self, req: _Request) -> _Response:
        return _json(200, {"errors": [], "warnings": []})

    def repo_info(self, req: _Request) -> _Response:
        repo = self._repo(req)
        commit = self.store.resolve(repo, req.params.get("rev") or DEFAULT_BRANCH)
        siblings = []
        for path, entry in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if req.flag("blobs"):  # model_info(files_metadata=True); siblings name LFS details differently
                sibling |= {"size": entry.size, "blobId": entry.oid}
                if entry.sha256:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        info = {
            "id": repo.id,
            "author": repo.id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        return _json(200, info | ({"modelId": repo.id} if repo.type == "model" else {}))

    def refs(self, req: _Request) -> _Response:
        branches, tags = self.store.refs(self._repo(req))

        def listing(kind: str, refs: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(refs.items())]

        data = {"branches": listing("heads", branches), "tags": listing("tags", tags), "converts": []}
        return _json(200, data | ({"pullRequests": []} if req.flag("include_prs") else {}))

    def commits(self, req: _Request) -> _Response:
        history = self.store.history(self._repo(req), req.params["rev"])
        return _json(
            200,
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": USER}],
                    "parents": list(c.parents),
                }
                for c in history
            ],
        )

    def tree(self, req: _Request) -> _Response:
        commit = self.store.resolve(self._repo(req), req.params["rev"])
        folder = req.params.get("path", "").strip("/")
        all_folders = folders(commit.tree)
        if folder and folder not in all_folders:
            raise HubError(404, f"No folder {folder!r}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        prefix = f"{folder}/" if folder else ""

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (req.flag("recursive") or "/" not in path[len(prefix) :])

        entries = [_folder_json(commit, p) for p in sorted(all_folders) if listed(p)]
        entries += [_file_json(p, e) for p, e in sorted(commit.tree.items()) if listed(p)]
        return _json(200, entries)

    def paths_info(self, req: _Request) -> _Response:
        commit = self.store.resolve(self._repo(req), req.params["rev"])
        body = req.body.read_all()
        if "json" in req.headers.get("Content-Type", ""):
            paths = json.loads(body).get("paths", [])
        else:  # the client posts a form: paths=a&paths=b
            paths = parse_qs(body.decode()).get("paths", [])
        all_folders = folders(commit.tree)
        entries = []
        for path in (p.strip("/") for p in paths):
            if path in commit.tree:
                entries.append(_file_json(path, commit.tree[path]))
            elif path in all_folders:
                entries.append(_folder_json(commit, path))
        return _json(200, entries)

    def preupload(self, req: _Request) -> _Response:
        commit = self.store.resolve(self._repo(req, write=True), req.params["rev"])
        files = []
        for item in req.json().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", ""))
            remote = commit.tree.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs(path, size, sample) else "regular",
                    "shouldIgnore": False,
                    # Compared by the client with its local oid (sha256 for LFS, git oid otherwise) to skip no-ops.
                    "oid": None if remote is None else remote.sha256 or remote.oid,
                }
            )
        return _json(200, {"files": files, "commitOid": commit.id})

    def commit(self, req: _Request) -> _Response:
        repo = self._repo(req, write=True)
        if req.flag("create_pr"):
            raise HubError(400, "devhub does not support pull requests")
        header: dict[str, Any] = {}
        operations: list[Operation] = []
        for line in req.body.read_all().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"].encode()
                if value.get("encoding") == "base64":
                    content = base64.b64decode(content, validate=True)
                operations.append(PutFile(_checked_path(value["path"]), content))
            elif key == "lfsFile":
                operations.append(PutLfs(_checked_path(value["path"]), value["oid"], value.get("size")))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append(Delete(value["path"], folder=key == "deletedFolder"))
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if not header.get("summary"):
            raise HubError(400, "The commit needs a header with a summary")
        branch = req.params["rev"]
        commit, old = self.store.commit(
            repo, branch, operations, header["summary"], header.get("description", ""), header.get("parentCommit")
        )
        for op in operations:
            if isinstance(op, PutFile):
                self.stats.received(repo.key, op.path, len(op.content))
            elif isinstance(op, PutLfs):
                self.stats.lfs_committed(repo.key, op.path, op.sha256)
        self.on_commit(repo, branch, commit, old, req.base_url)
        return _json(
            200,
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{req.base_url}/{repo.key}/commit/{commit.id}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def branch(self, req: _Request) -> _Response:
        repo = self._repo(req, write=True)
        if req.method == "DELETE":
            self.store.delete_branch(repo, req.params["rev"])
        else:
            self.store.create_branch(repo, req.params["rev"], req.json().get("startingPoint") or DEFAULT_BRANCH)
        return _json(200, {})

    def tag(self, req: _Request) -> _Response:
        repo = self._repo(req, write=True)
        if req.method == "DELETE":
            self.store.delete_tag(repo, req.params["rev"])
        else:
            self.store.create_tag(repo, req.json()["tag"], req.params["rev"])
        return _json(200, {})

    def lfs_batch(self, req: _Request) -> _Response:
        """Upload instructions: objects already stored get none, the others a PUT to this server and a verify."""
        repo = self._repo(req, write=True)
        data = req.json()
        if data.get("operation") != "upload":
            raise HubError(400, "devhub only implements LFS uploads; download through /resolve")
        base = f"{req.base_url}/{repo.key}.git/info/lfs/objects"
        objects = []
        for obj in data.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            if not _SHA256.fullmatch(oid) or not isinstance(size, int):
                raise HubError(400, f"Invalid LFS object {oid!r} of size {size!r}")
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if self.store.lfs_size(oid) != size:
                item["actions"] = {"upload": {"href": f"{base}/upload/{oid}"}, "verify": {"href": f"{base}/verify"}}
            objects.append(item)
        body = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return _json(200, body, "application/vnd.git-lfs+json")

    def lfs_upload(self, req: _Request) -> _Response:
        """The PUT target of an upload action; like a presigned URL it needs no token."""
        repo = self._lookup(req)
        size = self.store.store_lfs(req.body.read, req.params["oid"])
        self.stats.lfs_uploaded(repo.key, req.params["oid"], size)
        return _json(200, {})

    def lfs_verify(self, req: _Request) -> _Response:
        self._repo(req, write=True)
        data = req.json()
        if self.store.lfs_size(data["oid"]) != data["size"]:
            raise HubError(404, f"LFS object {data['oid']} of size {data['size']} was not uploaded")
        return _json(200, {})

    def resolve(self, req: _Request) -> _Response:
        """A file at a revision, with the headers `hf_hub_download` relies on; honours single byte ranges."""
        repo = self._repo(req)
        commit = self.store.resolve(repo, req.params["rev"])
        path = req.params["path"]
        headers = {"X-Repo-Commit": commit.id}
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        headers |= {
            "ETag": f'"{entry.sha256 or entry.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.sha256:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        status, start, length = 200, 0, entry.size
        span = _byte_range(req.headers.get("Range"), entry.size)
        if span is not None:
            (start, length), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{entry.size}"
        counted = (repo.key, path) if req.method == "GET" else None
        return _Response(status, headers, file=self.store.blob_path(entry), start=start, length=length, counted=counted)


def _require_token(req: _Request) -> None:
    if req.token is None:
        raise HubError(401, "Invalid username or password.")


_TYPE = r"(?:(?P<type>models|datasets|spaces)/)"
_API_REPO = rf"/api/{_TYPE}(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT_REPO = rf"/{_TYPE}?(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects"
_FILE = rf"/{_TYPE}?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
_ROUTES: list[tuple[tuple[str, ...], re.Pattern[str], str, Callable[[_HubApi, _Request], _Response]]] = [
    (methods, re.compile(pattern), handler.__name__, handler)
    for methods, pattern, handler in [
        (("GET",), r"/api/whoami-v2", _HubApi.whoami),
        (("POST",), r"/api/repos/create", _HubApi.repo_create),
        (("DELETE",), r"/api/repos/delete", _HubApi.repo_delete),
        (("POST",), r"/api/validate-yaml", _HubApi.validate_yaml),
        (("GET",), rf"{_API_REPO}(?:/revision/(?P<rev>[^/]+))?", _HubApi.repo_info),
        (("GET",), rf"{_API_REPO}/refs", _HubApi.refs),
        (("GET",), rf"{_API_REPO}/commits/(?P<rev>[^/]+)", _HubApi.commits),
        (("GET",), rf"{_API_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", _HubApi.tree),
        (("POST",), rf"{_API_REPO}/paths-info/(?P<rev>[^/]+)", _HubApi.paths_info),
        (("POST",), rf"{_API_REPO}/preupload/(?P<rev>[^/]+)", _HubApi.preupload),
        (("POST",), rf"{_API_REPO}/commit/(?P<rev>[^/]+)", _HubApi.commit),
        (("POST", "DELETE"), rf"{_API_REPO}/branch/(?P<rev>[^/]+)", _HubApi.branch),
        (("POST", "DELETE"), rf"{_API_REPO}/tag/(?P<rev>[^/]+)", _HubApi.tag),
        (("POST",), rf"{_GIT_REPO}/batch", _HubApi.lfs_batch),
        (("PUT",), rf"{_GIT_REPO}/upload/(?P<oid>[0-9a-f]{{64}})", _HubApi.lfs_upload),
        (("POST",), rf"{_GIT_REPO}/verify", _HubApi.lfs_verify),
        (("GET", "HEAD"), _FILE, _HubApi.resolve),
    ]
]
ROUTE_KINDS = frozenset(kind for _, _, kind, _ in _ROUTES) | {"unknown"}


def _not_found(api: _HubApi, req: _Request) -> _Response:
    raise HubError(404, f"devhub has no route {req.method} {req.path}")


def _route(method: str, path: str) -> tuple[str, Callable[[_HubApi, _Request], _Response], dict[str, str]]:
    """The route kind, handler and URL-decoded path parameters (revisions and paths arrive percent-encoded)."""
    for methods, pattern, kind, handler in _ROUTES:
        if method in methods and (match := pattern.fullmatch(path)):
            return kind, handler, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
    return "unknown", _not_found, {}


def _bearer(headers: Message, tokens: frozenset[str] | None) -> str | None:
    """The request's token; a malformed or (when `tokens` is set) unknown one is refused outright, like the Hub."""
    auth = headers.get("Authorization")
    if auth is None:
        return None
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token or (tokens is not None and token not in tokens):
        raise HubError(401, "Invalid credentials in Authorization header")
    return token


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
        body = _Body(self.rfile, self.headers)
        host = self.headers.get("Host") or hub.url.removeprefix("http://")
        req = _Request(self.command, url.path, parse_qs(url.query), self.headers, body, f"http://{host}")
        fault = None
        try:
            if url.path.startswith("/_devhub/"):
                response = hub._control(req)
            else:
                kind, handler, req.params = _route(self.command, url.path)
                hub._stats.request(kind, self.command)
                fault = hub._take_fault(kind, self.command, unquote(url.path))
                response = _fault_response(fault)
                if response is None:
                    req.token = _bearer(self.headers, hub._tokens)
                    response = handler(hub._api, req)
        except HubError as err:
            response = _error(err)
        except (ValueError, KeyError, TypeError) as err:
            response = _error(HubError(400, f"Malformed request: {err!r}"))
        except Exception:
            logger.exception("devhub failed on %s %s", self.command, self.path)
            response = _error(HubError(500, "devhub internal error"))
        try:
            body.drain()
        except OSError:
            self.close_connection = True
            return
        self._send(response, drop=fault is not None and fault.kind == "drop")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def _send(self, response: _Response, *, drop: bool) -> None:
        """Write the response; a "drop" fault sends the headers and half the body, then closes the socket."""
        length = response.length if response.file else len(response.body)
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
                else:
                    with response.file.open("rb") as f:
                        while sent < limit:
                            n = self.connection.sendfile(f, response.start + sent, min(_SEND_CHUNK, limit - sent))
                            if n == 0:
                                break
                            sent += n
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


def _post_webhook(url: str, secret: str, body: bytes) -> None:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "X-Webhook-Secret": secret}
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except OSError as err:  # best effort: a receiver that is down must not break commits
        logger.debug("webhook %s failed: %s", url, err)


class DevHub:
    """A local Hub serving the repos stored under `root` on a loopback port (a free one by default).

    `tokens=None` accepts any bearer token; a set accepts only those, so a test can revoke one (401). Writes and
    private repos need a token, as on the Hub. Only one DevHub may serve a given root at a time.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0, tokens: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        self._address = (host, port)
        self._store = Store(self.root)
        self._stats = _Stats()
        self._api = _HubApi(self._store, self._stats, self._notify)
        self._tokens = None if tokens is None else frozenset(tokens)
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._webhooks: list[tuple[str, str]] = []
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
        and file the bytes `bytes_served` by resolve GETs and `bytes_received` through commits and LFS uploads."""
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
    ) -> None:
        """Fail the next `times` requests whose route kind is `match` (see ROUTE_KINDS) or whose decoded path
        `match` searches as a regex, optionally only for one HTTP method.

        "500" and "429" (with `Retry-After: retry_after`) answer instead of the route, so nothing changes on the
        server; "slow" waits `seconds` first; "drop" runs the route, then sends half the body and hangs up.
        """
        if fault not in FAULT_KINDS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULT_KINDS}")
        with self._lock:
            self._faults.append(_Fault(match, fault, times, method, retry_after, seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, kind: str, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.applies(kind, method, path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def add_webhook(self, url: str, secret: str) -> None:
        """POST a `repo.content` update event to `url` after every commit, with `X-Webhook-Secret: secret`."""
        with self._lock:
            self._webhooks.append((url, secret))

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
        operations: list[Operation] = []
        for path, content in files.items():
            if is_lfs(path, len(content), content[:512]):
                sha256 = hashlib.sha256(content).hexdigest()
                self._store.store_lfs(io.BytesIO(content).read, sha256)
                operations.append(PutLfs(path, sha256))
            else:
                operations.append(PutFile(path, content))
        operations += [Delete(path) for path in delete]
        commit, old = self._store.commit(repo, branch, operations, message)
        host, port = self._server.server_address[:2] if self._server else self._address
        self._notify(repo, branch, commit, old, f"http://{host}:{port}")
        return commit.id

    def _notify(self, repo: Repo, branch: str, commit: Commit, old: str, base_url: str) -> None:
        """Send the Hub's webhook payload (v3 fields) for a commit, from background threads."""
        with self._lock:
            hooks = list(self._webhooks)
        if not hooks:
            return
        payload = {
            "event": {"action": "update", "scope": "repo.content"},
            "repo": {
                "type": repo.type,
                "name": repo.id,
                "id": repo.id,
                "private": repo.private,
                "headSha": self._store.resolve(repo, DEFAULT_BRANCH).id,
                "owner": {"id": repo.id.split("/")[0]},
                "url": {"web": f"{base_url}/{repo.key}", "api": f"{base_url}/api/{repo.type}s/{repo.id}"},
            },
            "updatedRefs": [{"ref": f"refs/heads/{branch}", "oldSha": old, "newSha": commit.id}],
            "webhook": {"id": "devhub", "version": 3},
        }
        body = json.dumps(payload).encode()
        for url, secret in hooks:
            threading.Thread(target=_post_webhook, args=(url, secret, body), daemon=True).start()

    def _control(self, req: _Request) -> _Response:
        """`/_devhub/…`: stats, faults and webhooks for tests in other processes; never counted nor faulted."""
        match req.method, req.path:
            case "GET", "/_devhub/stats":
                return _json(200, self.stats())
            case "DELETE", "/_devhub/stats":
                self.reset_stats()
            case "POST", "/_devhub/faults":
                data = req.json()
                options = {k: data[k] for k in ("method", "retry_after", "seconds") if k in data}
                self.inject(data["match"], data["fault"], data.get("times", 1), **options)
            case "DELETE", "/_devhub/faults":
                self.clear_faults()
            case "POST", "/_devhub/webhooks":
                data = req.json()
                self.add_webhook(data["url"], data.get("secret", ""))
            case _:
                raise HubError(404, f"devhub has no control route {req.method} {req.path}")
        return _json(200, {})


def serve(root: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run a devhub in the foreground until SIGINT or SIGTERM (`mergebot devhub`); call from the main thread."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    with DevHub(root, host, port) as hub:
        print(f"devhub serving {Path(root).resolve()} at {hub.url}", flush=True)
        stopping.wait()
