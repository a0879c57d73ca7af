"""The Hub's HTTP API over the store: one handler per route the huggingface_hub client calls (routes.py maps URLs
to them).

Handlers answer as the Hub does, down to the headers and error codes the client relies on.
"""

import base64
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from mergebot.dev.devhub.messages import Request, Response, byte_range, json_response, tree_page
from mergebot.dev.devhub.stats import Stats
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
from mergebot.dev.devhub.xet import Cas

USER = "devhub"  # the account every accepted token belongs to, and the namespace of repos created without one
_PLURALS: dict[str, RepoType] = {f"{t}s": t for t in REPO_TYPES}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _checked_path(path: str) -> str:
    """Refuse file names that could escape a checkout; only `DevHub.commit_files` may plant such names."""
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _file_json(path: str, entry: Entry) -> dict[str, Any]:
    """A tree / paths-info entry; LFS details use the tree API's names (`oid`, `pointerSize`)."""
    data: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
    if entry.sha256:
        data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return data | ({"xetHash": entry.xet_hash} if entry.xet_hash else {})


def _folder_json(commit: Commit, path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": folder_oid(commit.tree, path), "size": 0, "path": path}


class HubApi:
    """The Hub's HTTP routes over the store; each returns a response or raises HubError."""

    def __init__(self, store: Store, stats: Stats, on_commit: Callable[[Repo, str, Commit, str, str], None]) -> None:
        self.store = store
        self.stats = stats
        self.on_commit = on_commit
        self.cas = Cas(store, stats)

    def _lookup(self, req: Request) -> Repo:
        repo_id = f"{req.params['ns']}/{req.params['name']}"
        repo = self.store.repo(_PLURALS[req.params.get("type") or "models"], repo_id)
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _repo(self, req: Request, *, write: bool = False) -> Repo:
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

    def whoami(self, req: Request) -> Response:
        _require_token(req)
        access = {"displayName": USER, "role": "write"}
        user = {"type": "user", "id": USER, "name": USER, "fullname": USER, "email": None, "orgs": []}
        return json_response(200, user | {"auth": {"type": "access_token", "accessToken": access}})

    def repo_create(self, req: Request) -> Response:
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
            return json_response(409, {"error": err.message, "url": url})
        return json_response(200, {"url": url, "name": repo_id})

    def repo_delete(self, req: Request) -> Response:
        _require_token(req)
        data = req.json()
        self.store.delete_repo(data.get("type") or "model", f"{data.get('organization') or USER}/{data['name']}")
        return json_response(200, {})

    def validate_yaml(self, req: Request) -> Response:
        return json_response(200, {"errors": [], "warnings": []})

    def repo_info(self, req: Request) -> Response:
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
        return json_response(200, info | ({"modelId": repo.id} if repo.type == "model" else {}))

    def refs(self, req: Request) -> Response:
        branches, tags = self.store.refs(self._repo(req))

        def listing(kind: str, refs: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(refs.items())]

        data = {"branches": listing("heads", branches), "tags": listing("tags", tags), "converts": []}
        return json_response(200, data | ({"pullRequests": []} if req.flag("include_prs") else {}))

    def commits(self, req: Request) -> Response:
        history = self.store.history(self._repo(req), req.params["rev"])
        return json_response(
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

    def tree(self, req: Request) -> Response:
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
        return json_response(200, entries)

    def tree_html(self, req: Request) -> Response:
        """The page a browser opens at `/{repo}/tree/{rev}` (the status page links a published revision there)."""
        repo = self._repo(req)
        commit = self.store.resolve(repo, req.params["rev"])
        files = [(path, entry.size) for path, entry in sorted(commit.tree.items())]
        return tree_page(repo.id, commit.id, files, f"/{repo.id}/resolve/{commit.id}")

    def paths_info(self, req: Request) -> Response:
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
        return json_response(200, entries)

    def preupload(self, req: Request) -> Response:
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
        return json_response(200, {"files": files, "commitOid": commit.id})

    def commit(self, req: Request) -> Response:
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
                xet = self.cas.storage.file_by_sha256(value["oid"]) if repo.xet else None
                operations.append(PutLfs(_checked_path(value["path"]), value["oid"], value.get("size"), xet))
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
        xet_files = []
        for op in operations:
            if isinstance(op, PutFile):
                self.stats.received(repo.key, op.path, len(op.content))
            elif isinstance(op, PutLfs):
                self.stats.lfs_committed(repo.key, op.path, op.sha256)
                if xet := self.cas.storage.file_by_sha256(op.sha256):
                    record = self.cas.storage.file(xet)
                    xet_files.append((op.path, record["size"], [term[0] for term in record["terms"]]))
        self.stats.xet_committed(repo.key, xet_files)
        self.on_commit(repo, branch, commit, old, req.base_url)
        return json_response(
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

    def branch(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        if req.method == "DELETE":
            self.store.delete_ref(repo, "branch", req.params["rev"])
        else:
            self.store.create_ref(repo, "branch", req.params["rev"], req.json().get("startingPoint") or DEFAULT_BRANCH)
        return json_response(200, {})

    def tag(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        if req.method == "DELETE":
            self.store.delete_ref(repo, "tag", req.params["rev"])
        else:
            self.store.create_ref(repo, "tag", req.json()["tag"], req.params["rev"])
        return json_response(200, {})

    def lfs_batch(self, req: Request) -> Response:
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
        return json_response(200, body, "application/vnd.git-lfs+json")

    def lfs_upload(self, req: Request) -> Response:
        """The PUT target of an upload action; like a presigned URL it needs no token."""
        repo = self._lookup(req)
        size = self.store.store_lfs(req.body.read, req.params["oid"])
        self.stats.lfs_uploaded(repo.key, req.params["oid"], size)
        return json_response(200, {})

    def lfs_verify(self, req: Request) -> Response:
        self._repo(req, write=True)
        data = req.json()
        if self.store.lfs_size(data["oid"]) != data["size"]:
            raise HubError(404, f"LFS object {data['oid']} of size {data['size']} was not uploaded")
        return json_response(200, {})

    def resolve(self, req: Request) -> Response:
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
        if entry.xet_hash:  # what sends huggingface_hub the Xet way: the hash, and where to get a read token
            token_url = f"{req.base_url}/api/{repo.type}s/{repo.id}/xet-read-token/{commit.id}"
            headers |= {"X-Xet-Hash": entry.xet_hash, "Link": f'<{token_url}>; rel="xet-auth"'}
        status, start, length = 200, 0, entry.size
        span = byte_range(req.headers.get("Range"), entry.size)
        if span is not None:
            (start, length), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{entry.size}"
        counted = (repo.key, path) if req.method == "GET" else None
        return Response(status, headers, file=self.store.blob_path(entry), start=start, length=length, counted=counted)


def _require_token(req: Request) -> None:
    if req.token is None:
        raise HubError(401, "Invalid username or password.")
