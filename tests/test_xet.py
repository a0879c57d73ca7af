"""The local Hub's Xet storage, through the real huggingface_hub client and hf_xet (the path every publish to the
Hub takes), and through raw HTTP where a hostile client would go: uploads checked against their hashes, files served
byte for byte through Xet and through the plain resolve route, repos without Xet storage, faults on the CAS routes."""

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
import requests
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

from mergebot.dev.devhub import DevHub
from mergebot.dev.devhub.xetformat import (
    SHARD_TAG,
    WITH_METADATA,
    WITH_VERIFICATION,
    chunk_hash,
    file_hash,
    hash_hex,
    hash_raw,
    iter_chunks,
    merkle_root,
    verification_hash,
)
from mergebot.errors import HubError
from mergebot.hub.client import HubClient, RetryPolicy

REPO = "org/model"
TOKEN = "test-token"


def content(size: int, seed: int = 0) -> bytes:
    """Incompressible bytes, then zeros: several chunks, some compressed, some repeated."""
    return random.Random(seed).randbytes(size) + bytes(size // 2)


def api(hub: DevHub) -> HfApi:
    return HfApi(endpoint=hub.url, token=TOKEN)


def upload(hub: DevHub, files: dict[str, bytes], repo: str = REPO) -> str:
    client = api(hub)
    client.create_repo(repo, exist_ok=True)
    operations = [CommitOperationAdd(name, data) for name, data in files.items()]
    return client.create_commit(repo, operations, commit_message="add").oid


def download(hub: DevHub, cache: Path, name: str, repo: str = REPO) -> bytes:
    return Path(hf_hub_download(repo, name, endpoint=hub.url, token=TOKEN, cache_dir=cache)).read_bytes()


def xet_served(hub: DevHub, repo: str = REPO) -> dict[str, int]:
    return hub.stats()["xorb_bytes_served"].get(repo, {})


def test_upload_and_download_through_xet_are_byte_identical(devhub, tmp_path):
    weights, small = content(3_000_000), content(20_000, seed=1)
    upload(devhub, {"model.safetensors": weights, "small.bin": small, "config.json": b"{}"})
    stats = devhub.stats()["requests"]
    assert stats["xorb_upload"] >= 1 and stats["shard_upload"] == 1 and "lfs_batch" not in stats
    entries = {e.path: e for e in api(devhub).list_repo_tree(REPO)}
    assert entries["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert len(entries["model.safetensors"].xet_hash) == 64 and entries["config.json"].xet_hash is None
    head = requests.head(f"{devhub.url}/{REPO}/resolve/main/model.safetensors")
    assert head.headers["X-Xet-Hash"] == entries["model.safetensors"].xet_hash
    assert "/xet-read-token/" in head.links["xet-auth"]["url"]
    devhub.reset_stats()
    assert download(devhub, tmp_path / "cache", "model.safetensors") == weights
    assert download(devhub, tmp_path / "cache", "small.bin") == small
    stats = devhub.stats()
    assert "GET resolve" not in stats["requests_by_method"] and stats["requests"]["reconstruction"] >= 2
    assert 0 < sum(xet_served(devhub).values()) < len(weights) + len(small)  # the zeros travel compressed
    plain = requests.get(f"{devhub.url}/{REPO}/resolve/main/model.safetensors")  # an LFS-only client, a mirror
    assert plain.content == weights
    ranged = requests.get(f"{devhub.url}/{REPO}/resolve/main/model.safetensors", headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == weights[10:20]


def test_a_repo_without_xet_storage_lists_and_serves_lfs(devhub, tmp_path):
    devhub.create_repo(REPO, xet=False)
    weights = content(500_000)
    upload(devhub, {"model.safetensors": weights})  # the client still uploads through Xet, as to the Hub
    (entry,) = [e for e in api(devhub).list_repo_tree(REPO) if e.path == "model.safetensors"]
    assert entry.xet_hash is None and entry.lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert "X-Xet-Hash" not in requests.head(f"{devhub.url}/{REPO}/resolve/main/model.safetensors").headers
    devhub.reset_stats()
    assert download(devhub, tmp_path / "cache", "model.safetensors") == weights
    assert devhub.stats()["bytes_served"] == {REPO: {"model.safetensors": len(weights)}}


def test_with_xet_disabled_the_client_takes_lfs_and_reads_through_resolve(devhub, tmp_path):
    weights = content(400_000)
    (tmp_path / "model.safetensors").write_bytes(weights)
    script = (
        "import sys; from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download\n"
        "url, folder = sys.argv[1], sys.argv[2]\n"
        f"api = HfApi(endpoint=url, token={TOKEN!r}); api.create_repo({REPO!r})\n"
        f"api.upload_file(path_or_fileobj=folder + '/model.safetensors', path_in_repo='model.safetensors', "
        f"repo_id={REPO!r})\n"
        f"print(open(hf_hub_download({REPO!r}, 'model.safetensors', endpoint=url, token={TOKEN!r}, "
        "cache_dir=folder + '/cache'), 'rb').read() == open(folder + '/model.safetensors', 'rb').read())\n"
    )
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, devhub.url, tmp_path], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
    stats = devhub.stats()
    assert stats["requests"]["lfs_upload"] == 1 and "xorb_upload" not in stats["requests"]
    assert stats["bytes_served"][REPO] == {"model.safetensors": len(weights)}  # no Xet hash: resolve serves it


# --- hostile clients: what the CAS routes refuse ------------------------------------------------------------------


def xorb(chunks: list[bytes]) -> tuple[str, bytes]:
    """A xorb of uncompressed chunks, and its hash as the API writes it."""
    body = b"".join(b"\0" + len(c).to_bytes(3, "little") + b"\0" + len(c).to_bytes(3, "little") + c for c in chunks)
    return hash_hex(merkle_root((chunk_hash(c), len(c)) for c in chunks)), body


def shard(
    xorb_hash: str, chunks: list[bytes], start: int, end: int, sha256: bytes, check: bytes | None = None
) -> bytes:
    """A shard naming one file made of chunks [start, end) of one xorb, and listing that xorb."""
    span = chunks[start:end]
    pairs = [(chunk_hash(c), len(c)) for c in span]
    terms = struct.pack("<32sIIII", hash_raw(xorb_hash), 0, sum(len(c) for c in span), start, end)
    check = verification_hash(h for h, _ in pairs) if check is None else check
    header = struct.pack("<32sII8x", file_hash(pairs), WITH_VERIFICATION | WITH_METADATA, 1)
    info = header + terms + check + bytes(16) + hash_raw(sha256.hex()) + bytes(16)
    listing = struct.pack("<32sIIII", hash_raw(xorb_hash), 0, len(chunks), sum(map(len, chunks)), 0)
    offsets = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    listing += b"".join(struct.pack("<32sII8x", chunk_hash(c), o, len(c)) for c, o in zip(chunks, offsets, strict=True))
    bookend = b"\xff" * 32 + bytes(16)
    return SHARD_TAG + struct.pack("<QQ", 2, 0) + info + bookend + listing + bookend


def test_hostile_xorbs_and_shards_are_refused(devhub):
    api(devhub).create_repo(REPO)
    write = requests.get(f"{devhub.url}/api/models/{REPO}/xet-write-token/main", headers={"Authorization": "Bearer t"})
    read = requests.get(f"{devhub.url}/api/models/{REPO}/xet-read-token/main", headers={"Authorization": "Bearer t"})
    assert write.json()["casUrl"] == devhub.url and write.headers["X-Xet-Access-Token"] == write.json()["accessToken"]
    auth = {"Authorization": f"Bearer {write.json()['accessToken']}"}
    chunks = [random.Random(i).randbytes(9000) for i in range(3)]
    name, body = xorb(chunks)

    def post(path: str, data: bytes, headers: dict[str, str] = auth) -> requests.Response:
        return requests.post(f"{devhub.url}{path}", data=data, headers=headers)

    assert post(f"/v1/xorbs/default/{name}", body, {}).status_code == 401
    assert (
        post(f"/v1/xorbs/default/{name}", body, {"Authorization": f"Bearer {read.json()['accessToken']}"}).status_code
        == 403
    )
    wrong = post(f"/v1/xorbs/default/{name}", body[:-1] + b"x")  # a hash that does not match its bytes
    assert wrong.status_code == 400 and "hashes to" in wrong.json()["error"]
    bomb = b"\0" + (100).to_bytes(3, "little") + b"\1" + (10).to_bytes(3, "little") + bytes(100)
    assert post(f"/v1/xorbs/default/{name}", bomb).status_code == 400
    assert post(f"/v1/xorbs/default/{name}", body).json() == {"was_inserted": True}
    assert post(f"/v1/xorbs/default/{name}", body).json() == {"was_inserted": False}
    data = b"".join(chunks[1:3])
    sha256 = hashlib.sha256(data).digest()
    outside = post("/v1/shards", shard(name, chunks, 1, 5, sha256))  # a reconstruction past its xorb's end
    assert outside.status_code == 400 and "outside" in outside.json()["error"]
    lying = post("/v1/shards", shard(name, chunks, 1, 3, hashlib.sha256(b"other").digest()))
    assert lying.status_code == 400 and "sha256" in lying.json()["error"]
    assert post("/v1/shards", shard(name, chunks, 1, 3, sha256, check=bytes(32))).status_code == 400
    assert post("/v1/shards", shard(name, chunks, 1, 3, sha256)[:-40]).status_code == 400  # cut short
    assert post("/v1/shards", shard(name, chunks, 1, 3, sha256)).json() == {"result": 1}
    assert [e.path for e in api(devhub).list_repo_tree(REPO)] == [".gitattributes"]  # a shard alone commits nothing
    line = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": sha256.hex(), "size": len(data)}}
    header = {"key": "header", "value": {"summary": "by sha256"}}
    ndjson = "\n".join(json.dumps(item) for item in (header, line))
    assert post(f"/api/models/{REPO}/commit/main", ndjson.encode(), {"Authorization": "Bearer t"}).ok
    assert requests.get(f"{devhub.url}/{REPO}/resolve/main/w.bin").content == data
    recon = requests.get(f"{devhub.url}/v1/reconstructions/{'0' * 64}", headers=auth)
    assert recon.status_code == 404


# --- faults and hostile answers on the CAS routes -------------------------------------------------------------------


def test_faults_on_the_cas_routes_are_retried(devhub, tmp_path):
    weights = content(300_000)
    api(devhub).create_repo(REPO)
    devhub.inject("xorb_upload", "500", times=2)
    devhub.inject("xorb_upload", "drop")  # stored, but the answer is cut: the retry finds it there
    devhub.inject("shard_upload", "429", retry_after=0)
    devhub.inject("xet_token", "500")
    upload(devhub, {"model.safetensors": weights})
    requests_by_method = devhub.stats()["requests_by_method"]
    assert requests_by_method["POST xorb_upload"] == 4 and requests_by_method["POST shard_upload"] == 2
    devhub.reset_stats()
    devhub.inject("reconstruction", "500")
    devhub.inject("xorb_download", "drop", method="GET")  # the range cut short mid-body
    assert download(devhub, tmp_path / "cache", "model.safetensors") == weights
    requests_by_method = devhub.stats()["requests_by_method"]
    assert requests_by_method["GET reconstruction"] >= 2 and requests_by_method["GET xorb_download"] >= 2


def test_a_publish_the_xet_storage_keeps_failing_changes_nothing(devhub):
    client = HubClient(endpoint=devhub.url, token=TOKEN, retry=RetryPolicy(attempts=2, base_delay=0.01))
    client.create_repo(REPO, private=False)
    head = api(devhub).model_info(REPO).sha
    devhub.inject("xorb_upload", "500", times=100)
    with pytest.raises(HubError, match=r"commit failed after 2 attempts \(Xet storage: HTTP 500 on /v1/xorbs/"):
        client.commit(REPO, {"model.safetensors": content(100_000)}, [], "publish", head)
    assert api(devhub).model_info(REPO).sha == head and "commit" not in devhub.stats()["requests"]


@pytest.mark.parametrize("route", ["reconstruction", "xorb_download"])
def test_mergebot_never_reads_through_a_reconstruction(devhub, tmp_path, route):
    """mergebot downloads through the resolve route with its own bounded GET (hub/download.py), checked against the
    listing: a reconstruction pointing past its xorbs, or xorb bytes that are not the ones stored, never reach it."""
    upload(devhub, {"model.safetensors": content(300_000), "config.json": b"{}"})
    client = HubClient(endpoint=devhub.url, token=TOKEN, cache_dir=tmp_path / "cache", retry=RetryPolicy(attempts=2))
    remote = client.list_files(REPO, api(devhub).model_info(REPO).sha)
    devhub.inject(route, "garble", times=1000)
    assert (client.fetch(remote) / "model.safetensors").read_bytes() == content(300_000)
    assert route not in str(devhub.stats()["requests_by_method"])


def test_hashes_read_as_the_specification_writes_them():
    # The specification's example drops the "10" of the third word (62 digits); this is its procedure's result.
    assert hash_hex(bytes(range(32))) == "07060504030201000f0e0d0c0b0a090817161514131211101f1e1d1c1b1a1918"
    assert hash_raw(hash_hex(bytes(range(32)))) == bytes(range(32))


def test_a_reconstruction_of_a_byte_range_names_whole_chunks_and_where_to_start(devhub):
    weights = content(1_000_000)
    upload(devhub, {"model.safetensors": weights})
    (entry,) = [e for e in api(devhub).list_repo_tree(REPO) if e.path == "model.safetensors"]
    token = requests.get(f"{devhub.url}/api/models/{REPO}/xet-read-token/main", headers={"Authorization": "Bearer t"})
    auth = {"Authorization": f"Bearer {token.json()['accessToken']}"}
    url = f"{devhub.url}/v1/reconstructions/{entry.xet_hash}"
    answer = requests.get(url, headers=auth | {"Range": "bytes=700000-700009"}).json()
    data = b""
    for term in answer["terms"]:
        (fetch,) = [f for f in answer["fetch_info"][term["hash"]] if f["range"] == term["range"]]
        span = fetch["url_range"]
        body = requests.get(fetch["url"], headers={"Range": f"bytes={span['start']}-{span['end']}"}).content
        data += b"".join(raw for _, raw in iter_chunks(body))
    start = answer["offset_into_first_range"]
    assert data[start : start + 10] == weights[700_000:700_010] and len(data) < len(weights) // 4
    assert requests.get(url, headers=auth | {"Range": f"bytes={len(weights) * 2}-"}).status_code == 416
    assert requests.get(url).status_code == 401


# --- global dedupe: a client with an empty cache finds the Hub's chunks -----------------------------------------------


def fresh_client_upload(hub: DevHub, folder: Path, name: str, data: bytes) -> None:
    """Upload from another process with its own, empty HF_HOME (its shard cache knows nothing of the Hub)."""
    (folder / name).write_bytes(data)
    script = (
        "import sys; from huggingface_hub import HfApi\n"
        f"HfApi(endpoint=sys.argv[1], token={TOKEN!r}).upload_file(path_or_fileobj=sys.argv[2], "
        f"path_in_repo={name!r}, repo_id={REPO!r})\n"
    )
    env = {**os.environ, "HF_HOME": str(folder / "home")}
    done = subprocess.run(
        [sys.executable, "-c", script, hub.url, folder / name], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_client_with_an_empty_cache_sends_only_what_the_hub_lacks(devhub, tmp_path):
    weights = content(3_000_000)
    upload(devhub, {"model.safetensors": weights})
    changed = bytearray(weights)
    changed[1_500_000:1_500_400] = random.Random(7).randbytes(400)  # one region differs
    devhub.reset_stats()
    fresh_client_upload(devhub, tmp_path, "model.safetensors", bytes(changed))
    stats = devhub.stats()
    assert stats["requests"]["chunk_dedupe"] >= 1
    assert 0 < stats["xorb_bytes_received"][REPO] < len(weights) // 10, stats["xorb_bytes_received"]
    assert requests.get(f"{devhub.url}/{REPO}/resolve/main/model.safetensors").content == changed


def test_a_dedupe_answer_lists_what_the_store_holds_behind_lookup_tables(devhub):
    weights = content(600_000)
    upload(devhub, {"model.safetensors": weights})
    token = requests.get(f"{devhub.url}/api/models/{REPO}/xet-read-token/main", headers={"Authorization": "Bearer t"})
    auth = {"Authorization": f"Bearer {token.json()['accessToken']}"}
    [path] = (devhub.root / "objects" / "xet" / "xorbs").glob("*/*")  # one xorb holds the file
    stored = [hash_hex(chunk.hash) for chunk, _ in iter_chunks(path.read_bytes())]
    unknown = requests.get(f"{devhub.url}/v1/chunks/default/{stored[1]}", headers=auth)  # not a dedupe chunk
    assert unknown.status_code == 404
    answer = requests.get(f"{devhub.url}/v1/chunks/default/{stored[0]}", headers=auth)  # the file's first chunk
    assert answer.status_code == 200 and answer.content[:32] == SHARD_TAG
    data = answer.content
    footer = struct.unpack("<9Q32s2Q6Q4Q", data[-200:])
    version, _, xorbs_at, _, files, xorb_table, xorb_count, chunk_table, chunk_count, key = footer[:10]
    assert version == 1 and files == 0 and xorb_count == 1 and chunk_count == len(stored)
    assert footer[-1] == len(data) - 200 and struct.unpack_from("<Q", data, 40) == (200,)
    xorb_hash, _, count = struct.unpack_from("<32sII", data, xorbs_at)
    assert hash_hex(xorb_hash) == path.parent.name + path.name and count == len(stored)
    assert struct.unpack_from("<QI", data, xorb_table) == (int.from_bytes(xorb_hash[:8], "little"), 0)
    lookup = [struct.unpack_from("<QII", data, chunk_table + 16 * i) for i in range(chunk_count)]
    assert lookup == sorted(lookup)
    for truncated, xorb_index, position in lookup:
        listed = data[xorbs_at + 48 * (xorb_index + 1 + position) :][:32]
        keyed = blake3.blake3(hash_raw(stored[position]), key=key).digest()
        assert listed == keyed and truncated == int.from_bytes(keyed[:8], "little")


def test_dedupe_answers_a_kept_files_first_chunk_and_chunks_0_mod_1024_only(devhub):
    api(devhub).create_repo(REPO)
    tokens = {
        scope: requests.get(
            f"{devhub.url}/api/models/{REPO}/xet-{scope}-token/main", headers={"Authorization": "Bearer t"}
        ).json()["accessToken"]
        for scope in ("read", "write")
    }
    seeds = (
        s
        for s in range(100_000)
        if int.from_bytes(chunk_hash(random.Random(s).randbytes(9000))[24:], "little") % 1024 == 0
    )
    chunks = [random.Random(-i).randbytes(9000) for i in range(1, 4)]
    chunks.insert(2, random.Random(next(seeds)).randbytes(9000))  # an eligible chunk, third of four
    name, body = xorb(chunks)
    write = {"Authorization": f"Bearer {tokens['write']}"}
    assert requests.post(f"{devhub.url}/v1/xorbs/default/{name}", data=body, headers=write).ok

    def answered(index: int) -> int:
        url = f"{devhub.url}/v1/chunks/default/{hash_hex(chunk_hash(chunks[index]))}"
        return requests.get(url, headers={"Authorization": f"Bearer {tokens['read']}"}).status_code

    assert [answered(i) for i in range(4)] == [404] * 4  # a xorb alone is no kept file
    sha256 = hashlib.sha256(b"".join(chunks[1:4])).digest()
    assert requests.post(f"{devhub.url}/v1/shards", data=shard(name, chunks, 1, 4, sha256), headers=write).ok
    assert [answered(i) for i in range(4)] == [404, 200, 200, 404]
