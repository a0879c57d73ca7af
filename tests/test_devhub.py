"""The local Hub, checked only through the real huggingface_hub client (plus raw HTTP where the client hides it)."""

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mergebot.dev.devhub import DevHub

REPO = "org/model"
CONFIG = b'{"hidden_size": 8}'
WEIGHTS = bytes(range(256)) * 8  # 2 KiB: LFS because of the suffix, not the size


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def client(hub: DevHub, token: str = "test-token") -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def upload_model(hub: DevHub, tmp_path: Path, repo_id: str = REPO) -> str:
    """Create a repo holding config.json, model.safetensors and notes/readme.txt; returns the commit id."""
    folder = tmp_path / "upload"
    (folder / "notes").mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    (folder / "notes" / "readme.txt").write_text("small text")
    api = client(hub)
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add model").oid


def download(hub: DevHub, tmp_path: Path, filename: str, **kwargs) -> Path:
    cache = tmp_path / "cache"
    return Path(hf_hub_download(REPO, filename, endpoint=hub.url, cache_dir=cache, token="test-token", **kwargs))


def test_create_repo_exist_ok_and_conflict(devhub: DevHub) -> None:
    api = client(devhub)
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url == f"{devhub.url}/{REPO}"
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert [f.path for f in api.list_repo_tree(REPO)] == [".gitattributes"]  # the Hub's initial commit


def test_tree_reports_git_oids_and_lfs_sha256(devhub: DevHub, tmp_path: Path) -> None:
    upload_model(devhub, tmp_path)
    api = client(devhub)
    entries = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert set(entries) == {".gitattributes", "config.json", "model.safetensors", "notes", "notes/readme.txt"}
    assert entries["config.json"].blob_id == git_oid(CONFIG) and entries["config.json"].lfs is None
    weights = entries["model.safetensors"]
    assert weights.size == len(WEIGHTS) and len(weights.xet_hash) == 64  # uploaded through Xet, the default
    assert weights.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{weights.lfs.sha256}\nsize {len(WEIGHTS)}\n"
    assert weights.blob_id == git_oid(pointer.encode()) and weights.lfs.pointer_size == len(pointer)
    assert {e.path for e in api.list_repo_tree(REPO)} == {".gitattributes", "config.json", "model.safetensors", "notes"}
    assert [e.path for e in api.list_repo_tree(REPO, "notes")] == ["notes/readme.txt"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, "missing"))
    infos = api.get_paths_info(REPO, ["config.json", "notes", "missing"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "config.json"), ("RepoFolder", "notes")]


def test_model_info_sha_and_sibling_metadata(devhub: DevHub, tmp_path: Path) -> None:
    sha = upload_model(devhub, tmp_path)
    api = client(devhub)
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == sha == api.list_repo_refs(REPO).branches[0].target_commit
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert siblings["model.safetensors"].size == len(WEIGHTS)
    assert siblings["config.json"].blob_id == git_oid(CONFIG) and siblings["config.json"].lfs is None
    first = api.list_repo_commits(REPO)[-1].commit_id
    assert [s.rfilename for s in api.model_info(REPO, revision=first).siblings] == [".gitattributes"]


def test_create_commit_adds_deletes_and_checks_parent(devhub: DevHub, tmp_path: Path) -> None:
    first = upload_model(devhub, tmp_path)
    api = client(devhub)
    ops = [CommitOperationAdd("extra.json", b"{}"), CommitOperationDelete("notes/readme.txt")]
    second = api.create_commit(REPO, ops, commit_message="tweak", parent_commit=first).oid
    assert {f.path for f in api.list_repo_tree(REPO, recursive=True)} == {
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "extra.json",
    }
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second, first]
    with pytest.raises(HfHubHTTPError) as err:  # someone committed since `first`
        api.create_commit(REPO, [CommitOperationAdd("x.txt", b"x")], commit_message="stale", parent_commit=first)
    assert err.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("nope.txt")], commit_message="delete a missing file")


def test_unchanged_files_are_not_uploaded_again(devhub: DevHub, tmp_path: Path) -> None:
    sha = upload_model(devhub, tmp_path)
    assert devhub.stats()["bytes_received"][REPO] == {
        "config.json": len(CONFIG),
        "model.safetensors": len(WEIGHTS),
        "notes/readme.txt": 10,
    }
    assert upload_model(devhub, tmp_path) == sha  # preupload's oids let the client skip an empty commit
    devhub.reset_stats()
    api = client(devhub)
    api.upload_file(path_or_fileobj=WEIGHTS, path_in_repo="copy.safetensors", repo_id=REPO)
    stats = devhub.stats()
    assert stats["bytes_received"][REPO] == {"copy.safetensors": 0}  # every chunk was already stored
    assert "lfs_upload" not in stats["requests"] and "xorb_upload" not in stats["requests"]


def test_branches_and_tags(devhub: DevHub, tmp_path: Path) -> None:
    first = upload_model(devhub, tmp_path)
    api = client(devhub)
    api.create_branch(REPO, branch="dev", revision=first)
    api.create_branch(REPO, branch="dev", exist_ok=True)
    api.create_tag(REPO, tag="v1", revision=first)
    with pytest.raises(HfHubHTTPError):
        api.create_tag(REPO, tag="v1")
    dev = api.create_commit(REPO, [CommitOperationAdd("config.json", b"{}")], commit_message="dev", revision="dev").oid
    refs = api.list_repo_refs(REPO)
    assert {(b.name, b.ref, b.target_commit) for b in refs.branches} == {
        ("main", "refs/heads/main", first),
        ("dev", "refs/heads/dev", dev),
    }
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first)] and refs.converts == []
    assert download(devhub, tmp_path, "config.json", revision="dev").read_bytes() == b"{}"
    assert download(devhub, tmp_path, "config.json", revision="v1").read_bytes() == CONFIG
    api.delete_branch(REPO, branch="dev")
    api.delete_tag(REPO, tag="v1")
    refs = api.list_repo_refs(REPO)
    assert [b.name for b in refs.branches] == ["main"] and refs.tags == []


def test_download_counts_bytes_and_cached_file_is_not_fetched_again(devhub: DevHub, tmp_path: Path) -> None:
    devhub.create_repo(REPO, xet=False)  # an LFS repo: downloads take the resolve route (test_xet: the Xet way)
    sha = upload_model(devhub, tmp_path)
    devhub.reset_stats()
    path = download(devhub, tmp_path, "model.safetensors")
    assert path.read_bytes() == WEIGHTS and path.parent.name == sha
    assert path.resolve().name == hashlib.sha256(WEIGHTS).hexdigest()  # the cache names LFS blobs by sha256
    stats = devhub.stats()
    assert stats["bytes_served"] == {REPO: {"model.safetensors": len(WEIGHTS)}}
    assert stats["requests_by_method"] == {"HEAD resolve": 1, "GET resolve": 1}
    assert download(devhub, tmp_path, "model.safetensors") == path
    stats = devhub.stats()
    assert stats["requests_by_method"] == {"HEAD resolve": 2, "GET resolve": 1}
    assert stats["bytes_served_total"] == len(WEIGHTS)


def test_snapshot_download_at_an_older_revision(devhub: DevHub, tmp_path: Path) -> None:
    first = upload_model(devhub, tmp_path)
    api = client(devhub)
    api.create_commit(
        REPO,
        [CommitOperationAdd("config.json", b"{}"), CommitOperationAdd("new.txt", b"new")],
        commit_message="second",
    )
    snapshot = Path(
        snapshot_download(REPO, revision=first, endpoint=devhub.url, cache_dir=tmp_path / "cache", token="t")
    )
    assert snapshot.name == first
    files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    assert files == [".gitattributes", "config.json", "model.safetensors", "notes/readme.txt"]
    assert (snapshot / "config.json").read_bytes() == CONFIG


def test_missing_repo_revision_and_file_raise_the_client_errors(devhub: DevHub, tmp_path: Path) -> None:
    upload_model(devhub, tmp_path)
    api = client(devhub)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", endpoint=devhub.url, cache_dir=tmp_path / "c", token="t")
    with pytest.raises(RepositoryNotFoundError):  # anonymous: 401 + RepoNotFound, as the Hub answers
        HfApi(endpoint=devhub.url, token=False).model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        download(devhub, tmp_path, "config.json", revision="nope")
    with pytest.raises(EntryNotFoundError):
        download(devhub, tmp_path, "missing.json")
    api.delete_repo(REPO)
    api.delete_repo(REPO, missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(REPO)


def test_unicode_paths_round_trip(devhub: DevHub, tmp_path: Path) -> None:
    client(devhub).create_repo(REPO)
    client(devhub).upload_file(path_or_fileobj=b"ok", path_in_repo="données/été 1.txt", repo_id=REPO)
    assert download(devhub, tmp_path, "données/été 1.txt").read_bytes() == b"ok"
    missing = requests.head(f"{devhub.url}/{REPO}/resolve/main/donn%C3%A9es/hiver%0A.txt")
    assert missing.headers["X-Error-Code"] == "EntryNotFound"  # the file name did not break the header block
    assert missing.headers["X-Error-Message"] == "Entry not found: donn\\u00e9es/hiver\\n.txt"


def test_resolve_headers_and_ranges(devhub: DevHub, tmp_path: Path) -> None:
    sha = upload_model(devhub, tmp_path)
    url = f"{devhub.url}/{REPO}/resolve/main/model.safetensors"
    head = requests.head(url)
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    assert head.headers["X-Repo-Commit"] == sha
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{sha256}"'
    assert int(head.headers["X-Linked-Size"]) == int(head.headers["Content-Length"]) == len(WEIGHTS)
    regular = requests.head(f"{devhub.url}/models/{REPO}/resolve/{sha}/config.json")
    assert regular.headers["ETag"] == f'"{git_oid(CONFIG)}"' and "X-Linked-Etag" not in regular.headers
    part = requests.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == WEIGHTS[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(WEIGHTS)}"
    assert requests.get(url, headers={"Range": "bytes=-5"}).content == WEIGHTS[-5:]
    assert requests.get(url, headers={"Range": f"bytes={len(WEIGHTS)}-"}).status_code == 416
    assert devhub.stats()["bytes_served"][REPO]["model.safetensors"] == 15


def test_token_restrictions_and_private_repos(tmp_path: Path) -> None:
    with DevHub(tmp_path / "hub", tokens={"good"}).start() as hub:
        api = client(hub, "good")
        api.create_repo("org/secret", private=True)
        assert api.model_info("org/secret").private is True
        with pytest.raises(HfHubHTTPError) as err:
            client(hub, "revoked").model_info("org/secret")
        assert err.value.response.status_code == 401
        with pytest.raises(RepositoryNotFoundError):  # private repos are hidden from anonymous callers
            HfApi(endpoint=hub.url, token=False).model_info("org/secret")
        hub.set_tokens({"other"})
        with pytest.raises(HfHubHTTPError) as err:
            api.whoami()
        assert err.value.response.status_code == 401


def test_fault_500_then_success(devhub: DevHub, tmp_path: Path) -> None:
    upload_model(devhub, tmp_path)
    devhub.inject("repo_info", "500", times=2)
    url = f"{devhub.url}/api/models/{REPO}"
    assert [requests.get(url).status_code for _ in range(3)] == [500, 500, 200]
    devhub.inject(r"/resolve/.*config\.json$", "500", method="HEAD")
    assert download(devhub, tmp_path, "config.json").read_bytes() == CONFIG  # the client retries the HEAD
    assert devhub.stats()["requests_by_method"]["HEAD resolve"] == 2


def test_fault_429_retry_after_is_honoured(devhub: DevHub, tmp_path: Path) -> None:
    devhub.create_repo(REPO, xet=False)
    upload_model(devhub, tmp_path)
    devhub.inject("resolve", "429", retry_after=7)
    response = requests.get(f"{devhub.url}/{REPO}/resolve/main/config.json")
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    devhub.inject("resolve", "429", method="GET", retry_after=0)
    started = time.monotonic()
    assert download(devhub, tmp_path, "model.safetensors").read_bytes() == WEIGHTS
    assert time.monotonic() - started >= 1  # the client waits Retry-After + 1 s


def test_fault_dropped_connection_is_retried(devhub: DevHub, tmp_path: Path) -> None:
    devhub.create_repo(REPO, xet=False)
    upload_model(devhub, tmp_path)
    devhub.inject("resolve", "drop", method="GET")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(f"{devhub.url}/{REPO}/resolve/main/model.safetensors")
    devhub.reset_stats()
    devhub.inject("resolve", "drop", method="GET")
    assert download(devhub, tmp_path, "model.safetensors").read_bytes() == WEIGHTS
    stats = devhub.stats()
    assert stats["requests_by_method"]["GET resolve"] == 2
    # Half the file, then all of it: the client discards a partial read shorter than its 10 MB chunk.
    assert stats["bytes_served"][REPO]["model.safetensors"] == len(WEIGHTS) // 2 + len(WEIGHTS)


def test_fault_slow_response(devhub: DevHub, tmp_path: Path) -> None:
    upload_model(devhub, tmp_path)
    devhub.inject("refs", "slow", seconds=0.5)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{devhub.url}/api/models/{REPO}/refs", timeout=0.2)
    devhub.inject("refs", "slow", seconds=0.3)
    started = time.monotonic()
    client(devhub).list_repo_refs(REPO)
    assert time.monotonic() - started >= 0.3


def test_control_routes_for_other_processes(devhub: DevHub, tmp_path: Path) -> None:
    upload_model(devhub, tmp_path)
    fault = {"match": "refs", "fault": "500", "times": 1}
    assert requests.post(f"{devhub.url}/_devhub/faults", json=fault).status_code == 200
    assert requests.get(f"{devhub.url}/api/models/{REPO}/refs").status_code == 500
    stats = requests.get(f"{devhub.url}/_devhub/stats").json()
    assert stats == devhub.stats() and stats["requests"]["refs"] == 1
    requests.delete(f"{devhub.url}/_devhub/stats")
    assert devhub.stats()["requests"] == {}
    assert requests.post(f"{devhub.url}/_devhub/faults", json=fault | {"fault": "boom"}).status_code == 400


def test_state_survives_a_restart(tmp_path: Path) -> None:
    with DevHub(tmp_path / "hub").start() as hub:
        sha = upload_model(hub, tmp_path)
        client(hub).create_tag(REPO, tag="v1")
        history = [c.commit_id for c in client(hub).list_repo_commits(REPO)]
    with DevHub(tmp_path / "hub").start() as hub:
        api = client(hub)
        assert api.model_info(REPO).sha == sha
        assert [t.target_commit for t in api.list_repo_refs(REPO).tags] == [sha]
        assert [c.commit_id for c in api.list_repo_commits(REPO)] == history
        assert download(hub, tmp_path, "model.safetensors", revision="v1").read_bytes() == WEIGHTS


class _Receiver(BaseHTTPRequestHandler):
    events: "queue.Queue[tuple[str | None, dict]]" = queue.Queue()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.events.put((self.headers.get("X-Webhook-Secret"), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_after_each_commit(devhub: DevHub, tmp_path: Path) -> None:
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        client(devhub).create_repo(REPO)
        old = client(devhub).model_info(REPO).sha
        devhub.add_webhook(f"http://127.0.0.1:{receiver.server_port}/hook", "s3cret")
        sha = upload_model(devhub, tmp_path)
        secret, payload = _Receiver.events.get(timeout=5)
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert secret == "s3cret"
    assert payload["event"] == {"action": "update", "scope": "repo.content"}
    assert payload["repo"]["name"] == REPO and payload["repo"]["type"] == "model"
    assert payload["repo"]["headSha"] == sha
    assert payload["updatedRefs"] == [{"ref": "refs/heads/main", "oldSha": old, "newSha": sha}]


def test_commit_files_plants_paths_that_http_commits_refuse(devhub: DevHub) -> None:
    sha = devhub.commit_files("org/evil", {"../evil.safetensors": WEIGHTS, "/abs.json": b"{}"})
    tree = {f.path: f for f in client(devhub).list_repo_tree("org/evil", revision=sha, recursive=True)}
    assert tree["../evil.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert "/abs.json" in tree
    ndjson = b"\n".join(
        json.dumps(line).encode()
        for line in [
            {"key": "header", "value": {"summary": "escape"}},
            {"key": "file", "value": {"path": "../x.json", "content": "e30=", "encoding": "base64"}},
        ]
    )
    response = requests.post(
        f"{devhub.url}/api/models/org/evil/commit/main",
        data=ndjson,
        headers={"Authorization": "Bearer t", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 400 and "Invalid path" in response.json()["error"]


def test_lfs_upload_streams_chunked_bodies_and_checks_sha256(devhub: DevHub) -> None:
    client(devhub).create_repo(REPO)
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    batch = requests.post(
        f"{devhub.url}/{REPO}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": sha256, "size": len(WEIGHTS)}]},
        headers={"Authorization": "Bearer t"},
    ).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert requests.put(href, data=iter([WEIGHTS[:100], WEIGHTS[100:]])).status_code == 200  # chunked encoding
    bad = requests.put(href, data=b"not the content")
    assert bad.status_code == 400
    again = requests.post(
        f"{devhub.url}/{REPO}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": sha256, "size": len(WEIGHTS)}]},
        headers={"Authorization": "Bearer t"},
    ).json()
    assert "actions" not in again["objects"][0]


def test_serve_runs_in_the_foreground_until_sigterm(tmp_path: Path) -> None:
    code = f"from mergebot.dev.devhub import serve; serve({str(tmp_path / 'hub')!r}, port=0)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        url = proc.stdout.readline().split()[-1]
        assert requests.get(f"{url}/api/whoami-v2", headers={"Authorization": "Bearer t"}).json()["name"] == "devhub"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
