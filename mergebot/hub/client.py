"""The few Hub operations mergebot needs, through huggingface_hub: resolve, list, fetch only what a merge reads,
create a repo, commit; each retried on transient failures and failing with one clear error otherwise.

Endpoint, token and cache come from HF_ENDPOINT, HF_TOKEN (or the token file) and HF_HOME like every
huggingface_hub tool; arguments only override them. Files go into the standard cache layout, which stores blobs by
content, so a shard that did not change between revisions is never downloaded twice; every identifier a server
sends (commit sha, LFS sha256, git blob id, file name) is checked for form before it names a path.
"""

import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    constants,
    get_token,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from mergebot import log
from mergebot.errors import (
    FileLimitError,
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubRepoNotFoundError,
    ModelError,
    UnsafePathError,
)
from mergebot.files import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, is_merge_input, read_json, size_limit
from mergebot.hub.download import (
    BLOB_ID,
    COMMIT_SHA,
    LFS_SHA256,
    Expected,
    cached_file,
    check_id,
    download,
    resolve_url,
)

T = TypeVar("T")
SAFE_PATH = re.compile(r"[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*")
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
TRANSIENT_ERRORS = (httpx2.TransportError, TimeoutError, ConnectionError)
XET_HTTP = re.compile(r"HTTP status (?:client|server) error \((?P<status>\d{3})[^)]*\), domain: (?P<url>\S+)")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, honouring Retry-After, a bounded number of attempts."""

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
        return max(backoff, min(retry_after or 0.0, self.max_retry_after))


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None
    """The LFS sha256 (None for a small regular file)."""
    oid: str | None = None
    """The git blob id."""


@dataclass(frozen=True)
class RemoteRevision:
    repo: str
    sha: str
    files: dict[str, RemoteFile] = field(default_factory=dict)


def endpoint_url(endpoint: str | None) -> str:
    """The endpoint a client made with `endpoint` talks to: it, else HF_ENDPOINT, else the Hub."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _check_repo_path(repo: str, path: str) -> None:
    """Refuse a repo file name that could escape the cache folder or is not a plain relative path."""
    if path.startswith("/") or "\\" in path or not SAFE_PATH.fullmatch(path) or ".." in path.split("/"):
        raise UnsafePathError(f"repo {repo}: refusing unsafe file name {path!r}")


class HubClient:
    """One Hub endpoint, token and cache; every call retried on transient failures."""

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | Literal[False] | None = None,
        cache_dir: Path | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """`token` False sends none; None takes HF_TOKEN (or the token file)."""
        self.endpoint = endpoint_url(endpoint)
        self.token = get_token() if token is None else token
        self.cache_dir = Path(cache_dir or constants.HF_HUB_CACHE)
        self.retry = retry or RetryPolicy()
        self._api = HfApi(endpoint=self.endpoint, token=self.token)
        self._log = log.get("hub")
        self.downloaded_bytes = 0
        """What `fetch` brought into the cache: files whose blob the cache did not hold yet."""
        self.uploaded_bytes = 0
        """The content of the files `commit` added."""

    def resolve(self, repo: str, revision: str | None = None) -> str:
        """The commit sha a branch, tag or sha points at: one cheap call. The branch is always named (a mirror
        does not take a missing revision for main)."""
        revision = revision or "main"
        info = self._call(repo, revision, lambda: self._api.model_info(repo, revision=revision))
        return check_id(COMMIT_SHA, info.sha, "commit sha", f"{repo}@{revision}")

    def list_files(self, repo: str, sha: str) -> RemoteRevision:
        """Every file of the commit with size and LFS sha256, from the tree listing (a mirror's model_info lists
        names only); unsafe names refuse the whole repo."""
        where = f"{repo}@{sha}"
        check_id(COMMIT_SHA, sha, "commit sha", where)
        entries = self._call(repo, sha, lambda: list(self._api.list_repo_tree(repo, revision=sha, recursive=True)))
        files = {}
        for entry in entries:
            if isinstance(entry, RepoFile):
                _check_repo_path(repo, entry.path)
                sha256 = check_id(LFS_SHA256, entry.lfs.sha256, "LFS sha256", where) if entry.lfs else None
                oid = check_id(BLOB_ID, entry.blob_id, "git blob id", where)
                if not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0:
                    raise HubError(f"repo {where}: the endpoint sent a malformed size for {entry.path}; refusing it")
                files[entry.path] = RemoteFile(entry.path, entry.size, sha256, oid)
        return RemoteRevision(repo, sha, files)

    def fetch(self, remote: RemoteRevision) -> Path:
        """Download (or find in the cache) what a merge reads; returns the snapshot folder."""
        names = {name for name in remote.files if is_merge_input(name)}
        weights = sorted(n for n in names if n.endswith(".safetensors"))
        if not weights:
            pickles = sorted(n for n in remote.files if n.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise ModelError(
                    f"repo {remote.repo}@{remote.sha[:12]}: only pickle weights ({', '.join(pickles)}); "
                    "mergebot reads safetensors only"
                )
            raise ModelError(f"repo {remote.repo}@{remote.sha[:12]}: no safetensors weights")
        metadata = sorted(names - set(weights))
        for name in metadata:
            if remote.files[name].size > size_limit(name):
                raise FileLimitError(
                    f"repo {remote.repo}@{remote.sha[:12]}: {name} is listed at {remote.files[name].size} bytes, "
                    f"over the {size_limit(name)} mergebot reads"
                )
        snapshot = None
        for name in metadata:
            snapshot = self._download(remote, name).parent
        if INDEX_FILE in names:
            weight_map = read_json(snapshot / INDEX_FILE, remote.repo, required=True).get("weight_map") or {}
            wanted = sorted(set(weight_map.values()))
            for name in wanted:
                _check_repo_path(remote.repo, name)
                if name not in remote.files:
                    raise ModelError(f"repo {remote.repo}@{remote.sha[:12]}: {INDEX_FILE} names missing {name}")
        else:
            wanted = [SINGLE_FILE] if SINGLE_FILE in names else weights
        for name in wanted:
            snapshot = self._download(remote, name).parent
        return snapshot

    def _download(self, remote: RemoteRevision, name: str) -> Path:
        """The snapshot file of `name`, from the cache or by mergebot's own bounded GET (see `download`)."""
        known = remote.files[name]
        expected = Expected(known.size, known.sha256, known.oid)
        folder = self.cache_dir / repo_folder_name(repo_id=remote.repo, repo_type="model")
        path = cached_file(folder, remote.sha, name, expected)
        if path is not None:
            return path
        url = resolve_url(self.endpoint, remote.repo, remote.sha, name)
        where = f"{remote.repo}@{remote.sha[:12]}: {name}"
        started = time.monotonic()
        path, received = self._call(
            remote.repo,
            remote.sha,
            lambda: download(url, self.token, folder, remote.sha, name, expected, where),
            what=f"download of {name}",
            file=name,
        )
        self.downloaded_bytes += received
        seconds = round(time.monotonic() - started, 3)
        self._log.info("downloaded", repo=remote.repo, file=name, bytes=received, seconds=seconds)
        return path

    def create_repo(self, repo: str, *, private: bool) -> None:
        """Create the model repo if it is missing; an existing one is left as it is."""
        self._call(repo, None, lambda: self._api.create_repo(repo, private=private, exist_ok=True), "create_repo")

    def commit(
        self,
        repo: str,
        add: Mapping[str, Path | bytes],
        delete: Iterable[str],
        message: str,
        parent: str | None,
        description: str = "",
    ) -> str:
        """One atomic commit on main adding `add` (name → file or content) and removing `delete`. `parent` is the
        head the commit was computed against, so a concurrent change fails it instead of being overwritten.
        Returns the new commit sha."""
        operations = [CommitOperationAdd(name, content) for name, content in add.items()]
        operations += [CommitOperationDelete(name) for name in delete]
        info = self._call(
            repo,
            "main",
            lambda: self._api.create_commit(
                repo, operations, commit_message=message, commit_description=description, parent_commit=parent
            ),
            "commit",
        )
        self.uploaded_bytes += sum(len(c) if isinstance(c, bytes) else c.stat().st_size for c in add.values())
        return check_id(COMMIT_SHA, info.oid, "commit sha", f"{repo}@main")

    def head_commit(self, repo: str) -> tuple[str, str, float]:
        """(sha, description, unix time) of the newest commit on the repo's main branch."""
        commits = self._call(repo, "main", lambda: self._api.list_repo_commits(repo, revision="main"))
        if not commits:
            raise HubNotFoundError(f"repo {repo}: main has no commits")
        return commits[0].commit_id, commits[0].message or "", commits[0].created_at.timestamp()

    def _call(
        self, repo: str, revision: str | None, action: Callable[[], T], what: str = "request", file: str | None = None
    ) -> T:
        """Run one Hub call (on `file`, for a download); retry what is transient, translate the rest into one
        clear error."""
        where = f"{repo}@{revision}" if revision else repo
        for attempt in range(self.retry.attempts):
            try:
                return action()
            except (HfHubHTTPError, *TRANSIENT_ERRORS, RuntimeError) as raised:
                error = _underlying(raised)
                retry_after = self._classify(error, repo, revision, where, what, file)
                failure = f"HTTP {error.response.status_code}" if _status(error) else _xet_failure(error)
            if attempt + 1 == self.retry.attempts:
                break
            delay = self.retry.delay(attempt, retry_after)
            self._log.warning("hub retry", repo=repo, what=what, failure=failure, wait=round(delay, 2))
            time.sleep(delay)
        raise HubError(f"repo {where}: {what} failed after {self.retry.attempts} attempts ({failure})")

    def _classify(
        self, error: Exception, repo: str, revision: str | None, where: str, what: str, file: str | None
    ) -> float | None:
        """Raise the clear error for what is not worth retrying; return the server's Retry-After otherwise."""
        if isinstance(error, RevisionNotFoundError):
            raise HubNotFoundError(self._revision_not_found(repo, revision)) from error
        if isinstance(error, RemoteEntryNotFoundError) and file is not None:
            raise HubNotFoundError(self._file_not_found(where, file)) from error
        status = _status(error)
        if isinstance(error, RepositoryNotFoundError | RemoteEntryNotFoundError) or status == 500:
            missing = self._missing(repo, revision, file)
            if missing is not None:
                kind = HubRepoNotFoundError if missing == self._repo_not_found(repo) else HubNotFoundError
                raise kind(missing) from error
        if isinstance(error, RemoteEntryNotFoundError):
            raise HubNotFoundError(f"repo {where}: not found ({what})") from error
        if isinstance(error, RepositoryNotFoundError):
            raise HubRepoNotFoundError(self._repo_not_found(repo)) from error
        if status in (401, 403):
            raise HubAuthError(
                f"repo {repo}: access denied (HTTP {status}); set HF_TOKEN to a token that can read it"
            ) from error
        if isinstance(error, HfHubHTTPError) and status not in TRANSIENT_STATUS:
            raise HubError(f"repo {where}: {what} failed with HTTP {status}") from error
        xet = XET_HTTP.search(str(error)) if isinstance(error, ConnectionError) else None
        if xet and int(xet["status"]) not in TRANSIENT_STATUS:
            raise HubError(f"repo {where}: {what} refused by the Hub's {_xet_failure(error)}") from error
        if not isinstance(error, (HfHubHTTPError, *TRANSIENT_ERRORS)):
            raise error
        return _retry_after(error) if isinstance(error, HfHubHTTPError) else None

    def _missing(self, repo: str, revision: str | None, file: str | None) -> str | None:
        """What is missing, the repo, the revision or the file, asked of the refs, the tree and the paths listing:
        a mirror answers 401 "repo not found" or 500 for a missing revision or file too. None when all are there,
        or when the endpoint cannot say (then the failure is what it claims, or transient)."""

        def refs() -> bool:
            self._api.list_repo_refs(repo)
            return True

        def tree() -> bool:
            list(self._api.list_repo_tree(repo, revision=revision))
            return True

        def paths() -> bool:
            return bool(self._api.get_paths_info(repo, [file], revision=revision))

        probes: list[tuple[Callable[[], bool], str]] = [(refs, self._repo_not_found(repo))]
        if revision is not None:
            probes.append((tree, self._revision_not_found(repo, revision)))
        if revision is not None and file is not None:
            probes.append((paths, self._file_not_found(f"{repo}@{revision}", file)))
        for probe, message in probes:
            found = _answers(probe)
            if found is None:
                return None
            if not found:
                return message
        return None

    def _repo_not_found(self, repo: str) -> str:
        return (
            f"repo {repo}: not found on {self.endpoint}, or not visible with this token "
            "(check the repo id, HF_ENDPOINT and HF_TOKEN)"
        )

    def _revision_not_found(self, repo: str, revision: str | None) -> str:
        return f"repo {repo}: revision {revision!r} not found on {self.endpoint}"

    def _file_not_found(self, where: str, file: str) -> str:
        return f"repo {where}: file {file} not found on {self.endpoint}"


def _answers(probe: Callable[[], bool]) -> bool | None:
    """What a listing call says, False too on a client error (4xx but 429); None when the endpoint cannot say. A
    connection dropped right after a 500 (uvicorn closes it) is tried once more."""
    for _ in range(2):
        try:
            return probe()
        except HfHubHTTPError as error:
            status = _status(error)
            return False if status is not None and 400 <= status < 500 and status != 429 else None
        except TRANSIENT_ERRORS:
            continue
    return None


def _underlying(error: Exception) -> Exception:
    """huggingface_hub wraps a failed LFS upload in a RuntimeError; what failed is its cause."""
    cause = error.__cause__
    if isinstance(error, RuntimeError) and isinstance(cause, (HfHubHTTPError, *TRANSIENT_ERRORS)):
        return cause
    return error


def _xet_failure(error: Exception) -> str:
    """hf_xet reports every HTTP failure of the Hub's Xet storage as a ConnectionError; its status and route (never
    the query, which may be signed) name it."""
    match = XET_HTTP.search(str(error)) if isinstance(error, ConnectionError | RuntimeError) else None
    if match is not None:
        return f"Xet storage: HTTP {match['status']} on {urlsplit(match['url']).path}"
    if type(error) is RuntimeError:  # hf_xet's own failures (a reconstruction it cannot follow, a bad chunk)
        return "Xet storage: " + re.sub(r"\w+://\S+", "<url>", str(error).splitlines()[0] if str(error) else "")[:160]
    return type(error).__name__


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return response.status_code if isinstance(error, HfHubHTTPError) and response is not None else None


def _retry_after(error: HfHubHTTPError) -> float | None:
    value = error.response.headers.get("Retry-After") if error.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
