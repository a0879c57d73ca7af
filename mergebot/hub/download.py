"""One file of a listed revision into the standard Hugging Face cache layout, by mergebot's own GET.

huggingface_hub's download names the blob after the response's ETag and the snapshot after its X-Repo-Commit, both
sent by the endpoint: a hostile one wrote outside the cache with them. Here every path component is known and
checked before a byte arrives: the blob is the listing's LFS sha256 (or git blob id), the snapshot the commit sha,
the file name a checked relative path. The body is written only up to the listed size and hashed as it arrives, so
a server sending more, or other bytes, is stopped at that size and nothing it sent stays in the cache.
"""

import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urljoin, urlsplit

import httpx2
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from mergebot.errors import HubError
from mergebot.files import FileHashes, default_cache_dir, fsync_dir

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
"""A git commit id, as the Hub gives it: 40 lowercase hex digits."""
BLOB_ID = COMMIT_SHA
"""A git blob id (sha1 of the content with git's header)."""
LFS_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_REDIRECTS = 5
ERROR_BODY_LIMIT = 64 * 1024
CHUNK = 1 << 20
TIMEOUT = httpx2.Timeout(60.0, connect=10.0)


def check_id(pattern: re.Pattern[str], value: object, what: str, where: str) -> str:
    """`value` when it has the form of `pattern`; anything else from a server is refused before it is used."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise HubError(f"repo {where}: the endpoint sent a malformed {what} {str(value)[:80]!r}; refusing it")
    return value


class Expected:
    """What the listing says a file is: its size, and its LFS sha256 or else its git blob id."""

    def __init__(self, size: int, sha256: str | None, oid: str | None) -> None:
        self.size, self.sha256, self.oid = size, sha256, oid

    @property
    def blob(self) -> str:
        return self.sha256 or self.oid or ""

    def hasher(self) -> "hashlib._Hash":
        if self.sha256:
            return hashlib.sha256()
        digest = hashlib.sha1()
        digest.update(b"blob %d\0" % self.size)
        return digest


def cached_file(repo_folder: Path, sha: str, name: str, expected: Expected) -> Path | None:
    """The snapshot file when its blob is already in the cache and is what the listing names. The cache is shared
    with other tools, which name blobs after what an endpoint said: a blob is hashed once (remembered by its stat)
    before it is trusted, and one that is not what its name says is removed."""
    blob = repo_folder / "blobs" / expected.blob
    if not blob.is_file():
        return None
    if blob.stat().st_size != expected.size or _digest(blob, expected) != expected.blob:
        blob.unlink()  # named by a checked id inside the repo's own blobs folder
        return None
    return _link(repo_folder, sha, name, expected.blob)


def _digest(blob: Path, expected: Expected) -> str:
    if expected.sha256:
        return FileHashes(default_cache_dir()).sha256(blob)
    digest = expected.hasher()
    with blob.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str, token: str | bool | None, repo_folder: Path, sha: str, name: str, expected: Expected, where: str
) -> tuple[Path, int]:
    """GET `url` into blobs/<listed id> and link snapshots/<sha>/<name> to it; returns the snapshot path and the
    bytes received. A partial blob from an earlier attempt is resumed with a Range request; one process at a time
    writes a blob (a lock on its partial file)."""
    blobs = repo_folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / expected.blob
    partial = blobs / f"{expected.blob}.incomplete"
    descriptor = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "ab+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        received = 0
        if not (blob.is_file() and blob.stat().st_size == expected.size):
            received = _fill(handle, url, token, expected, where)
            os.replace(partial, blob)
            fsync_dir(blobs)
            if expected.sha256:
                FileHashes(default_cache_dir()).remember(blob, expected.sha256)  # hashed as it arrived
    return _link(repo_folder, sha, name, expected.blob), received


def _fill(handle: BinaryIO, url: str, token: str | bool | None, expected: Expected, where: str) -> int:
    """Write the body after what `handle` holds, at most up to the listed size, and check the whole file."""
    digest = expected.hasher()
    handle.seek(0)
    held = 0
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
        held += len(chunk)
    if held > expected.size:
        handle.truncate(0)
        digest, held = expected.hasher(), 0
    received = 0
    with _get(url, token, held if 0 < held < expected.size else 0, where) as response:
        if held and not (response.status_code == 206 and _range_start(response) == held):
            handle.truncate(0)  # the server sends the whole file (or another range): start over
            digest, held = expected.hasher(), 0
        for chunk in response.iter_bytes(CHUNK):
            if held + len(chunk) > expected.size:
                handle.truncate(0)
                raise HubError(
                    f"repo {where}: the endpoint sent more than the listed {expected.size} bytes; stopped there"
                )
            handle.write(chunk)
            digest.update(chunk)
            held += len(chunk)
            received += len(chunk)
    handle.flush()
    os.fsync(handle.fileno())
    if held != expected.size or digest.hexdigest() != expected.blob:
        handle.truncate(0)
        raise HubError(f"repo {where}: the download is not the file its listing names (size or hash differs); not kept")
    return received


@contextmanager
def _get(url: str, token: str | bool | None, start: int, where: str) -> Iterator[httpx2.Response]:
    """The streamed GET of `url` (with `Range` from `start`), redirects followed by hand: at most MAX_REDIRECTS,
    http(s) only, and the token only to the endpoint's own origin. Errors name the file, never a URL (which may
    hold credentials)."""
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        headers = build_hf_headers(token=token if _origin(url) == origin else False)
        if start:
            headers["Range"] = f"bytes={start}-"
        request = get_session().build_request("GET", url, headers=headers, timeout=TIMEOUT)
        response = get_session().send(request, stream=True, follow_redirects=False)
        if not response.is_redirect:
            try:
                _raise_for_status(response)
                yield response
            finally:
                response.close()
            return
        response.close()
        url = urljoin(url, response.headers.get("Location", ""))
        if urlsplit(url).scheme not in ("http", "https"):
            raise HubError(f"repo {where}: redirected to a non-HTTP location; refusing it")
    raise HubError(f"repo {where}: more than {MAX_REDIRECTS} redirects")


def _raise_for_status(response: httpx2.Response) -> None:
    """huggingface_hub's error for a failed response (so retries and messages are the API calls'), reading at most
    ERROR_BODY_LIMIT of its body."""
    if response.is_success:
        return
    body = b""
    for chunk in response.iter_bytes(ERROR_BODY_LIMIT):
        body += chunk
        if len(body) >= ERROR_BODY_LIMIT:
            break
    response.close()
    bounded = httpx2.Response(
        response.status_code, headers=response.headers, content=body[:ERROR_BODY_LIMIT], request=response.request
    )
    hf_raise_for_status(bounded)


def _range_start(response: httpx2.Response) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/\d+", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.rpartition("@")[2]


def _link(repo_folder: Path, sha: str, name: str, blob: str) -> Path:
    """snapshots/<sha>/<name> → ../../blobs/<blob> (relative, as huggingface_hub links them), replaced atomically."""
    path = repo_folder / "snapshots" / sha / name
    path.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(repo_folder / "blobs" / blob, path.parent)
    if path.is_symlink() and os.readlink(path) == target:
        return path
    temp = path.with_name(f".{path.name}.{os.getpid()}.link")
    temp.unlink(missing_ok=True)
    os.symlink(target, temp)
    os.replace(temp, path)
    return path


def resolve_url(endpoint: str, repo: str, sha: str, name: str) -> str:
    return f"{endpoint}/{quote(repo)}/resolve/{sha}/{quote(name)}"
