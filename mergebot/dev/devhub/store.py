"""Disk-backed repositories for the local Hub (devhub): content-addressed blobs, commits, branches and tags.

Kept apart from the HTTP layer so the storage rules (git blob oids, LFS pointers, atomic metadata writes) read on
their own. Everything survives a restart: blobs and commits are immutable files named by their hash, and each repo's
refs live in one JSON document that is replaced atomically after the commit it points to is on disk.
"""

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from mergebot.files import fsync_dir, git_blob_id, write_atomic

RepoType = Literal["model", "dataset", "space"]
RefKind = Literal["branch", "tag"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"

# What the Hub stores with LFS: big files, binary files, and the suffixes of its default .gitattributes.
LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar",
    ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip
_SHA1 = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1024 * 1024


class HubError(Exception):
    """A request the Hub refuses, with the HTTP status and the `X-Error-Code` the client maps to its exceptions."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The small text git stores in place of an LFS file; its blob id is the file's git oid."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Whether the Hub would store this file with LFS rather than as a regular git blob."""
    name = path.rsplit("/", 1)[-1].lower()
    return size >= LFS_MIN_SIZE or name.endswith(LFS_SUFFIXES) or "tfevents" in name or b"\0" in sample


def repo_key(repo_type: str, repo_id: str) -> str:
    """A repo as it appears in Hub URLs: `ns/name` for models, `datasets/ns/name` for the other types."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def _now() -> str:
    """The Hub's timestamp format, which the client parses strictly."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Entry:
    """A file in a commit's tree: `oid` is git's blob id (of the pointer for LFS files); `sha256` marks LFS."""

    size: int
    oid: str
    sha256: str | None = None
    xet_hash: str | None = None  # uploaded through Xet into a repo with Xet storage

    @property
    def pointer_size(self) -> int | None:
        return None if self.sha256 is None else len(lfs_pointer(self.sha256, self.size))

    def to_json(self) -> dict:
        data = {"size": self.size, "oid": self.oid} | ({"sha256": self.sha256} if self.sha256 else {})
        return data | ({"xet_hash": self.xet_hash} if self.xet_hash else {})


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot of a repo: the whole file tree, so any revision is served without replaying history."""

    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    tree: Mapping[str, Entry]


@dataclass
class Repo:
    """A repo's mutable state: visibility and refs. `seq` counts commits and feeds commit ids."""

    type: RepoType
    id: str
    private: bool
    created_at: str
    seq: int
    branches: dict[str, str]
    tags: dict[str, str]
    xet: bool = True  # Xet storage, as the Hub's repos have; without it a repo lists and serves files as LFS

    @property
    def key(self) -> str:
        return repo_key(self.type, self.id)


@dataclass(frozen=True)
class PutFile:
    """A regular file: its content is stored as a git blob."""

    path: str
    content: bytes


@dataclass(frozen=True)
class PutLfs:
    """A file whose content was uploaded before the commit, through LFS or Xet; `size`, when given, must match."""

    path: str
    sha256: str
    size: int | None = None
    xet_hash: str | None = None


@dataclass(frozen=True)
class Delete:
    """A file, or with `folder` every file below that folder."""

    path: str
    folder: bool = False


Operation = PutFile | PutLfs | Delete


def folders(tree: Iterable[str]) -> set[str]:
    """Every folder that holds at least one file of the tree."""
    return {path.rsplit("/", i)[0] for path in tree for i in range(1, path.count("/") + 1)}


def folder_oid(tree: Mapping[str, Entry], folder: str) -> str:
    """A stable id for a folder's content (the Hub returns git tree ids; any content hash serves clients)."""
    prefix = folder + "/"
    listing = "".join(f"{p}\0{e.oid}\n" for p, e in sorted(tree.items()) if p.startswith(prefix))
    return hashlib.sha1(f"tree {folder}\n{listing}".encode()).hexdigest()


def _dump(data: object) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


class Store:
    """All repos under `root`: `objects/` holds blobs (git by sha1, LFS by sha256), `repos/` holds metadata."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.RLock()
        self._commits: dict[tuple[str, str], Commit] = {}
        self._repos: dict[tuple[str, str], Repo] = {}
        shutil.rmtree(root / "trash", ignore_errors=True)  # deletions and uploads a crash interrupted
        for partial in root.glob("objects/.upload-*"):
            partial.unlink()
        for meta in sorted(root.glob("repos/*/*/*/repo.json")):
            repo = Repo(**json.loads(meta.read_bytes()))
            self._repos[(repo.type, repo.id)] = repo

    # Blobs

    def _git_path(self, oid: str) -> Path:
        return self.root / "objects" / "git" / oid[:2] / oid[2:]

    def _lfs_path(self, sha256: str) -> Path:
        return self.root / "objects" / "lfs" / sha256[:2] / sha256[2:]

    def blob_path(self, entry: Entry) -> Path:
        return self._lfs_path(entry.sha256) if entry.sha256 else self._git_path(entry.oid)

    def lfs_size(self, sha256: str) -> int | None:
        """Size of a stored LFS object, or None when it has not been uploaded."""
        path = self._lfs_path(sha256)
        return path.stat().st_size if path.exists() else None

    def store_lfs(self, read: Callable[[int], bytes], sha256: str) -> int:
        """Stream an uploaded LFS object to disk, keeping it only if its content really hashes to `sha256`."""
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "objects", prefix=".upload-")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != sha256:
                raise HubError(400, f"Uploaded content does not match sha256 {sha256}")
            target = self._lfs_path(sha256)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return size

    def put(self, path: str, content: bytes) -> Operation:
        """The operation adding `content` at `path`, stored first in LFS when the Hub would keep it there."""
        if not is_lfs(path, len(content), content[:512]):
            return PutFile(path, content)
        sha256 = hashlib.sha256(content).hexdigest()
        self.store_lfs(io.BytesIO(content).read, sha256)
        return PutLfs(path, sha256)

    def _store_git(self, content: bytes) -> str:
        oid = git_blob_id(content)
        path = self._git_path(oid)
        if not path.exists():
            write_atomic(path, content)
        return oid

    # Repos

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def _save(self, repo: Repo) -> None:
        write_atomic(self._repo_dir(repo.type, repo.id) / "repo.json", _dump(repo.__dict__))

    def repo(self, repo_type: RepoType, repo_id: str) -> Repo | None:
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    def refs(self, repo: Repo) -> tuple[dict[str, str], dict[str, str]]:
        """A consistent copy of the repo's branches and tags."""
        with self._lock:
            return dict(repo.branches), dict(repo.tags)

    def create_repo(self, repo_type: RepoType, repo_id: str, private: bool, xet: bool = True) -> Repo:
        """Create a repo whose first commit adds a .gitattributes, as the Hub does."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_type, repo_id, private, _now(), seq=0, branches={}, tags={}, xet=xet)
            gitattributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
            tree = {".gitattributes": self._entry(gitattributes.encode())}
            repo.branches[DEFAULT_BRANCH] = self._new_commit(repo, (), "initial commit", "", tree).id
            self._save(repo)
            self._repos[(repo_type, repo_id)] = repo
            return repo

    def delete_repo(self, repo_type: RepoType, repo_id: str) -> None:
        """Forget a repo; its blobs stay, as other repos may share them."""
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
            trash = self.root / "trash" / uuid.uuid4().hex
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._repo_dir(repo_type, repo_id), trash)
            del self._repos[(repo_type, repo_id)]
            self._commits = {k: v for k, v in self._commits.items() if k[0] != f"{repo_type}/{repo_id}"}
        shutil.rmtree(trash, ignore_errors=True)

    # Commits and refs

    def _entry(self, content: bytes) -> Entry:
        return Entry(len(content), self._store_git(content))

    def _new_commit(
        self, repo: Repo, parents: tuple[str, ...], title: str, message: str, tree: Mapping[str, Entry]
    ) -> Commit:
        """Write a commit; its id hashes repo, sequence number, parents, message and tree, but not the clock."""
        repo.seq += 1
        identity = {
            "repo": f"{repo.type}/{repo.id}",
            "seq": repo.seq,
            "parents": parents,
            "title": title,
            "message": message,
            "tree": {path: entry.oid for path, entry in tree.items()},
        }
        commit_id = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        commit = Commit(commit_id, parents, title, message, _now(), dict(tree))
        record = commit.__dict__ | {"tree": {path: entry.to_json() for path, entry in sorted(tree.items())}}
        write_atomic(self._repo_dir(repo.type, repo.id) / "commits" / f"{commit_id}.json", _dump(record))
        self._commits[(f"{repo.type}/{repo.id}", commit_id)] = commit
        return commit

    def _load_commit(self, repo: Repo, commit_id: str) -> Commit | None:
        key = (f"{repo.type}/{repo.id}", commit_id)
        if key not in self._commits:
            path = self._repo_dir(repo.type, repo.id) / "commits" / f"{commit_id}.json"
            if not path.exists():
                return None
            data = json.loads(path.read_bytes())
            tree = {p: Entry(**e) for p, e in data.pop("tree").items()}
            self._commits[key] = Commit(**(data | {"parents": tuple(data["parents"]), "tree": tree}))
        return self._commits[key]

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, tag (bare or as `refs/heads/…`, `refs/tags/…`) or full commit id, to its commit."""
        with self._lock:
            if revision.startswith("refs/heads/"):
                commit_id = repo.branches.get(revision.removeprefix("refs/heads/"))
            elif revision.startswith("refs/tags/"):
                commit_id = repo.tags.get(revision.removeprefix("refs/tags/"))
            else:
                commit_id = repo.branches.get(revision) or repo.tags.get(revision)
            if commit_id is None and _SHA1.fullmatch(revision):
                commit_id = revision
            commit = self._load_commit(repo, commit_id) if commit_id else None
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def history(self, repo: Repo, revision: str) -> list[Commit]:
        """The commits reachable from `revision` by first parents, newest first."""
        commits = [self.resolve(repo, revision)]
        while commits[-1].parents:
            commits.append(self.resolve(repo, commits[-1].parents[0]))
        return commits

    def commit(
        self,
        repo: Repo,
        branch: str,
        operations: Iterable[Operation],
        title: str,
        message: str = "",
        parent: str | None = None,
    ) -> tuple[Commit, str]:
        """Apply operations on top of a branch head; returns the new commit and the head it replaced."""
        with self._lock:
            if branch not in repo.branches:
                self.resolve(repo, branch)  # a missing revision is RevisionNotFound, a tag or sha is refused
                raise HubError(400, f"Can only commit to a branch, not to '{branch}'")
            head = repo.branches[branch]
            if parent is not None and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(self.resolve(repo, head).tree)
            for op in operations:
                self._apply(tree, op)
            commit = self._new_commit(repo, (head,), title, message, tree)
            repo.branches[branch] = commit.id
            self._save(repo)
            return commit, head

    def _apply(self, tree: dict[str, Entry], op: Operation) -> None:
        match op:
            case PutFile(path, content):
                tree[path] = self._entry(content)
            case PutLfs(path, sha256, size, xet_hash):
                stored = self.lfs_size(sha256)
                if stored is None or (size is not None and size != stored):
                    raise HubError(422, f"LFS object {sha256} of '{path}' was not uploaded")
                tree[path] = Entry(stored, git_blob_id(lfs_pointer(sha256, stored)), sha256, xet_hash)
            case Delete(path, folder=False):
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            case Delete(path, folder=True):
                inside = [p for p in tree if p.startswith(path.rstrip("/") + "/")]
                if not inside:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in inside:
                    del tree[p]

    def create_ref(self, repo: Repo, kind: RefKind, name: str, revision: str) -> None:
        with self._lock:
            refs = repo.branches if kind == "branch" else repo.tags
            if name in refs:
                raise HubError(409, f"{kind.capitalize()} {name} already exists")
            refs[name] = self.resolve(repo, revision).id
            self._save(repo)

    def delete_ref(self, repo: Repo, kind: RefKind, name: str) -> None:
        with self._lock:
            if kind == "branch" and name == DEFAULT_BRANCH:
                raise HubError(400, "The default branch cannot be deleted")
            if (repo.branches if kind == "branch" else repo.tags).pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            self._save(repo)
