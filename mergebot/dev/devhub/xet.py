"""The Xet routes of the local Hub: the Hub's token endpoints and the CAS API the hf_xet client calls.

The Hub hands out a short-lived CAS token for one repo (`xet-read-token`, `xet-write-token`), in a JSON body as the
specification says and in `X-Xet-*` headers, which is where huggingface_hub reads it; the CAS routes on this same
server accept only such tokens. Xorb bytes are fetched from the URL a reconstruction names, without a token, as from
a presigned URL. Global dedupe answers, for a chunk the client may ask about (a file's first chunk, or one whose hash
is 0 mod 1024) that a kept file holds, a shard listing that file's xorbs from the chunk on, chunk hashes keyed; for
any other chunk 404 ("not tracked"). The v2 routes (`/v2/reconstructions`, `/v2/shards`) answer 404, on which the
client falls back to v1, as the specification asks of it.
"""

import secrets
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from mergebot.dev.devhub.messages import Request, Response, byte_range, json_response
from mergebot.dev.devhub.stats import Stats
from mergebot.dev.devhub.store import DEFAULT_BRANCH, HubError, Repo, Store
from mergebot.dev.devhub.xetformat import MAX_XORB
from mergebot.dev.devhub.xetstore import XetStore

if TYPE_CHECKING:
    from mergebot.dev.devhub.api import HubApi

TOKEN_SECONDS = 3600
_MAX_SHARD = 64 * 1024 * 1024


class Cas:
    """The CAS service: its storage, and the tokens the Hub issued for it (kept in memory: after a restart the
    client gets 401 and asks the Hub for a new one)."""

    def __init__(self, store: Store, stats: Stats) -> None:
        self.storage = XetStore(store)
        self.stats = stats
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[Repo, str | None, bool, float]] = {}  # → (repo, commit, may write, expiry)

    def issue(self, repo: Repo, commit: str | None, write: bool) -> tuple[str, int]:
        token, expiry = "xet_" + secrets.token_urlsafe(24), int(time.time()) + TOKEN_SECONDS
        with self._lock:
            self._tokens[token] = (repo, commit, write, expiry)
        return token, expiry

    def authorize(self, req: Request, *, write: bool) -> tuple[Repo, str | None]:
        """The repo (and commit) a request's CAS token was issued for: 401 without a valid one, 403 for a read
        token that tries to write."""
        scheme, _, token = req.headers.get("Authorization", "").partition(" ")
        with self._lock:
            grant = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if grant is None or grant[3] < time.time():
            raise HubError(401, "Invalid or expired Xet token")
        if write and not grant[2]:
            raise HubError(403, "A Xet read token cannot upload")
        return grant[0], grant[1]


def _body(req: Request, limit: int, what: str) -> bytes:
    if int(req.headers.get("Content-Length") or 0) > limit:
        raise HubError(400, f"{what} over {limit} bytes")
    data = req.body.read(limit + 1)
    while len(data) <= limit and (more := req.body.read(limit + 1 - len(data))):
        data += more
    if len(data) > limit:
        raise HubError(400, f"{what} over {limit} bytes")
    return data


def xet_token(api: "HubApi", req: Request) -> Response:
    write = req.params["scope"] == "write"
    repo = api._repo(req, write=write)
    revision = req.params.get("rev", DEFAULT_BRANCH)
    commit = None  # the client asks a write token for revision "None" before a pull request exists
    if not (write and revision == "None"):
        commit = api.store.resolve(repo, revision).id
    token, expiry = api.cas.issue(repo, commit, write)
    response = json_response(200, {"accessToken": token, "exp": expiry, "casUrl": req.base_url})
    response.headers |= {
        "X-Xet-Cas-Url": req.base_url,
        "X-Xet-Access-Token": token,
        "X-Xet-Token-Expiration": str(expiry),
    }
    return response


def xorb_upload(api: "HubApi", req: Request) -> Response:
    repo, _ = api.cas.authorize(req, write=True)
    body = _body(req, MAX_XORB, "Xorb")
    inserted = api.cas.storage.put_xorb(req.params["hash"], body)
    if inserted:
        api.stats.xorb_uploaded(repo.key, req.params["hash"], len(body))
    return json_response(200, {"was_inserted": inserted})


def xorb_download(api: "HubApi", req: Request) -> Response:
    """A presigned-URL stand-in: a byte range of a stored xorb, counted per repo the URL was issued for."""
    xorb = req.params["hash"]
    if api.cas.storage.chunks(xorb) is None:
        raise HubError(404, f"Xorb {xorb} not found")
    path = api.cas.storage.xorb_path(xorb)
    size = path.stat().st_size
    start, length = byte_range(req.headers.get("Range"), size) or (0, size)
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
    status = 200
    if req.headers.get("Range"):
        status, headers["Content-Range"] = 206, f"bytes {start}-{start + length - 1}/{size}"
    counted = ("xet:" + req.query.get("repo", ["?"])[-1], xorb) if req.method == "GET" else None
    return Response(status, headers, file=path, start=start, length=length, counted=counted)


def shard_upload(api: "HubApi", req: Request) -> Response:
    api.cas.authorize(req, write=True)
    api.cas.storage.put_shard(_body(req, _MAX_SHARD, "Shard"))
    return json_response(200, {"result": 1})


def chunk_dedupe(api: "HubApi", req: Request) -> Response:
    api.cas.authorize(req, write=False)
    shard = api.cas.storage.dedupe(req.params["hash"])
    if shard is None:
        raise HubError(404, "Chunk not tracked by global deduplication")
    return Response(200, {"Content-Type": "application/octet-stream"}, shard)


def reconstruction(api: "HubApi", req: Request) -> Response:
    """The terms and xorb ranges of a file; the file's bytes they deliver count as served for the path that holds
    it at the token's revision, as a resolve GET's do (the xorb bytes count apart, per xorb)."""
    repo, commit = api.cas.authorize(req, write=False)
    url = f"{req.base_url}/v1/xorbs/default/"
    data = api.cas.storage.reconstruction(req.params["hash"], req.headers.get("Range"), url)
    size = api.cas.storage.file(req.params["hash"])["size"]
    _, length = byte_range(req.headers.get("Range"), size) or (0, size)
    tree = api.store.resolve(repo, commit).tree if commit else {}
    for path in [p for p, entry in sorted(tree.items()) if entry.xet_hash == req.params["hash"]][:1]:
        api.stats.served(repo.key, path, length)
    suffix = "?" + urlencode({"repo": repo.key})  # whose download the served xorb bytes count for
    for entries in data["fetch_info"].values():
        for entry in entries:
            entry["url"] += suffix
    return json_response(200, data)


_HASH = r"(?P<hash>[0-9a-f]{64})"
XET_ROUTES = [
    (("GET",), r"/xet-(?P<scope>read|write)-token/(?P<rev>[^/]+)", xet_token),
    (("POST",), rf"/v1/xorbs/default/{_HASH}", xorb_upload),
    (("GET", "HEAD"), rf"/v1/xorbs/default/{_HASH}", xorb_download),
    (("POST",), r"/v1/shards", shard_upload),
    (("GET",), rf"/v1/chunks/default(?:-merkledb)?/{_HASH}", chunk_dedupe),  # the client asks under "default"
    (("GET",), rf"/v1/reconstructions/{_HASH}", reconstruction),
]
"""The token route is relative to a repo's API path; the CAS routes are absolute."""
