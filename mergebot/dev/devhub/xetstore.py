"""The local Hub's Xet storage (CAS): xorbs as uploaded, the files their shards reconstruct, and reconstructions.

A xorb is kept only once its chunks hash to the name it was uploaded under. A shard's files are kept only once every
term points inside an uploaded xorb, its verification hash and sizes match those chunks, the chunks hash to the file
hash, and the bytes they reconstruct hash to the sha256 the shard names; those bytes are then also stored as the LFS
object of that sha256, so the plain resolve route (LFS-only clients, mirrors) serves a Xet file byte for byte, and a
commit names it by sha256 as the client does (`lfsFile`). Nothing here is visible in a repo before that commit.
"""

import json
import secrets
import threading
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

from mergebot.dev.devhub.messages import byte_range
from mergebot.dev.devhub.store import HubError, Store
from mergebot.dev.devhub.xetformat import (
    Chunk,
    FileInfo,
    dedupe_eligible,
    dedupe_shard,
    file_hash,
    hash_hex,
    hash_raw,
    iter_chunks,
    parse_shard,
    parse_xorb,
    verification_hash,
)
from mergebot.files import write_atomic

_READ = 1024 * 1024
_DEDUPE_XORBS = 8  # xorbs a global-dedupe answer lists for one chunk (up to 512 MB of what follows it)


class _Reassembled:
    """A file's bytes, decompressed term by term from the stored xorbs, read like a stream."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self._parts, self._buffer = parts, b""

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size and (part := next(self._parts, None)) is not None:
            self._buffer += part
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


class XetStore:
    """Xorbs, file reconstructions and the sha256 → file hash index, under `objects/xet` of the Hub's store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root / "objects" / "xet"
        self._lock = threading.Lock()
        self._indexes: dict[str, list[Chunk]] = {}

    def _path(self, kind: str, name: str) -> Path:
        return self.root / kind / name[:2] / name[2:]

    def xorb_path(self, xorb: str) -> Path:
        return self._path("xorbs", xorb)

    def chunks(self, xorb: str) -> list[Chunk] | None:
        """A stored xorb's chunks (hash, size, byte span), or None when it was never uploaded."""
        with self._lock:
            if xorb not in self._indexes:
                path = self._path("xorb-index", xorb)
                if not path.exists():
                    return None
                rows = json.loads(path.read_bytes())
                self._indexes[xorb] = [Chunk(hash_raw(h), size, start, end) for h, size, start, end in rows]
            return self._indexes[xorb]

    def put_xorb(self, xorb: str, body: bytes) -> bool:
        """Keep an uploaded xorb whose chunks hash to its name; False when it was already stored."""
        if self.chunks(xorb) is not None:
            return False
        chunks = parse_xorb(body, hash_raw(xorb))
        write_atomic(self.xorb_path(xorb), body)
        rows = [[hash_hex(c.hash), c.size, c.start, c.end] for c in chunks]
        write_atomic(self._path("xorb-index", xorb), json.dumps(rows).encode())  # written last: the xorb exists
        return True

    def put_shard(self, body: bytes) -> list[FileInfo]:
        """Check an uploaded shard against the stored xorbs and register its files; returns them."""
        files, xorbs = parse_shard(body)
        for listed in xorbs:  # each chunk's start counts decompressed bytes (the client's reading of the spec)
            stored = self.chunks(hash_hex(listed.hash)) or []
            starts = [0, *accumulate(c.size for c in stored)][: len(stored)]
            if [(c.hash, start, c.size) for c, start in zip(stored, starts, strict=True)] != list(listed.chunks):
                raise HubError(400, f"Shard lists xorb {hash_hex(listed.hash)} unlike the one uploaded")
        for info in files:
            self._check(info)
        for info in files:
            self._register(info)
        return files

    def _check(self, info: FileInfo) -> None:
        name = hash_hex(info.hash)
        if info.verification is None or info.sha256 is None:
            raise HubError(400, f"Shard entry of file {name} lacks verification entries or its sha256")
        pairs = []
        for term, check in zip(info.terms, info.verification, strict=True):
            chunks = self.chunks(hash_hex(term.xorb))
            if chunks is None:
                raise HubError(400, f"File {name} references xorb {hash_hex(term.xorb)}, which was not uploaded")
            if not 0 <= term.start < term.end <= len(chunks):
                raise HubError(400, f"File {name}: chunks {term.start}..{term.end} lie outside their xorb")
            span = chunks[term.start : term.end]
            if sum(c.size for c in span) != term.size or verification_hash(c.hash for c in span) != check:
                raise HubError(400, f"File {name}: a term's size or verification hash does not match its chunks")
            pairs += [(c.hash, c.size) for c in span]
        if file_hash(pairs) != info.hash:
            raise HubError(400, f"File {name}: its chunks hash to {hash_hex(file_hash(pairs))}")

    def _register(self, info: FileInfo) -> None:
        """Store the reconstructed bytes as the LFS object of the claimed sha256 (which checks it), then the file."""
        name, sha256 = hash_hex(info.hash), hash_hex(info.sha256 or bytes(32))  # sha256 words in hash order too
        terms = [[hash_hex(t.xorb), t.start, t.end, t.size] for t in info.terms]
        try:
            size = self.store.store_lfs(_Reassembled(self._content(terms)).read, sha256)
        except HubError:
            raise HubError(400, f"File {name}: its bytes do not hash to the sha256 {sha256} its shard names") from None
        write_atomic(self._path("files", name), json.dumps({"size": size, "sha256": sha256, "terms": terms}).encode())
        write_atomic(self._path("sha256", sha256), name.encode())
        self._index_for_dedupe(info)

    def _index_for_dedupe(self, info: FileInfo) -> None:
        """For each chunk of a kept file the client may ask global dedupe about (the file's first chunk, and those
        `dedupe_eligible` names), note the xorbs of the file from that chunk's on: the client dedupes the chunks
        that follow against them. Not a xorb whose size a shard cannot state (32 bits)."""
        order = [hash_hex(t.xorb) for t in info.terms]
        sizes = {x: sum(c.size for c in self.chunks(x) or []) for x in order}
        for number, (term, xorb) in enumerate(zip(info.terms, order, strict=True)):
            chunks = self.chunks(xorb) or []
            for index in range(term.start, term.end):
                if (number == 0 and index == term.start) or dedupe_eligible(chunks[index].hash):
                    following = [x for x in dict.fromkeys(order[number:]) if sizes[x] < 1 << 32]
                    self._note_dedupe(hash_hex(chunks[index].hash), following[:_DEDUPE_XORBS])

    def _note_dedupe(self, chunk: str, xorbs: list[str]) -> None:
        path = self._path("dedupe", chunk)
        with self._lock:
            known = json.loads(path.read_bytes()) if path.exists() else []
            noted = list(dict.fromkeys(known + xorbs))[:_DEDUPE_XORBS]
            if noted != known:
                write_atomic(path, json.dumps(noted).encode())

    def dedupe(self, chunk: str) -> bytes | None:
        """The global-dedupe answer for a chunk `_index_for_dedupe` noted (a shard listing the xorbs noted for it,
        chunk hashes keyed with a fresh key), or None for any other chunk."""
        path = self._path("dedupe", chunk)
        if not path.exists():
            return None
        xorbs = json.loads(path.read_bytes())
        listed = [(hash_raw(x), self.chunks(x) or [], self.xorb_path(x).stat().st_size) for x in xorbs]
        return dedupe_shard(listed, secrets.token_bytes(32))

    def _content(self, terms: list[list[Any]]) -> Iterator[bytes]:
        loaded, data = None, b""  # consecutive terms often read the same xorb
        for xorb, start, end, _ in terms:
            chunks = self.chunks(xorb) or []
            if xorb != loaded:
                loaded, data = xorb, self.xorb_path(xorb).read_bytes()
            for _, raw in iter_chunks(data, chunks[start].start, chunks[end - 1].end):
                yield raw

    def file_by_sha256(self, sha256: str) -> str | None:
        """The Xet hash of a file uploaded through Xet with this sha256, if any."""
        path = self._path("sha256", sha256)
        return path.read_text() if path.exists() else None

    def file(self, name: str) -> dict[str, Any]:
        path = self._path("files", name)
        if not path.exists():
            hash_raw(name)
            raise HubError(404, f"File {name} not found")
        return json.loads(path.read_bytes())

    def reconstruction(self, name: str, range_header: str | None, url: str) -> dict[str, Any]:
        """The v1 reconstruction of a file or of a byte range of it, trimmed to whole chunks; `url` + xorb hash
        is where a xorb's bytes are fetched."""
        record = self.file(name)
        first, length = byte_range(range_header, record["size"]) or (0, record["size"])
        last, position, skip = first + length, 0, None
        terms: list[dict[str, Any]] = []
        fetch: dict[str, list[dict[str, Any]]] = {}
        for xorb, start, end, _ in record["terms"]:
            chunks = self.chunks(xorb) or []
            kept = []
            for index in range(start, end):
                if position + chunks[index].size > first and position < last:
                    skip = first - position if skip is None else skip
                    kept.append(index)
                position += chunks[index].size
            if not kept:
                continue
            span = {"start": kept[0], "end": kept[-1] + 1}
            size = sum(chunks[i].size for i in kept)
            terms.append({"hash": xorb, "unpacked_length": size, "range": span})
            bytes_span = {"start": chunks[kept[0]].start, "end": chunks[kept[-1]].end - 1}
            entries = fetch.setdefault(xorb, [])
            if not any(e["range"]["start"] <= span["start"] and span["end"] <= e["range"]["end"] for e in entries):
                entries.append({"range": span, "url": url + xorb, "url_range": bytes_span})
        return {"offset_into_first_range": skip or 0, "terms": terms, "fetch_info": fetch}
