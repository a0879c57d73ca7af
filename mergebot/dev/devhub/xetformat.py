"""The Xet formats the local Hub reads and writes: hashes (keyed BLAKE3, the aggregated Merkle tree), xorbs, shards.

Written from the public Xet Protocol Specification; where the reference client (hf_xet) does more than the document
says, the client is followed: it compresses chunks as LZ4 *frames*; it appends a footer (`XETBLOB`, the chunk hashes
and boundaries) after a xorb's chunks; a shard it downloads (a global-dedupe answer) must end with lookup tables and
a footer naming them, where the specification shows reserved bytes. Everything here parses hostile bytes: every
length is checked against what is left, and a chunk may not inflate past the size its header declares.
"""

import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import blake3
import lz4.frame
import numpy as np

from mergebot.dev.devhub.store import HubError

DATA_KEY = bytes.fromhex("6697f5775b9550de3135cbaca597181c9de421109beb2b58b4d0b04b93adf229")
NODE_KEY = bytes.fromhex("017ec5c7a5472996fd946666b48a02e65ddd536f37c76dd2f86352e64a53713f")
VERIFICATION_KEY = bytes.fromhex("7f1857d6ce56ed66127ff913e7a5c3f3a4cd26d5b5db49e64124987f28fb94c3")
SHARD_TAG = bytes.fromhex("48465265706f4d6574614461746100556967456a7b815783a5bdd95ccdd14aa9")
MAX_CHUNK = 128 * 1024
MAX_XORB = 64 * 1024 * 1024
_BOOKEND = b"\xff" * 32
_XORB_FOOTER = b"XETBLOB"
_ENTRY = 48
WITH_VERIFICATION = 1 << 31
WITH_METADATA = 1 << 30
DEDUPE_MODULUS = 1024
_FOOTER = struct.Struct("<9Q32s2Q6Q4Q")  # version, section and lookup-table offsets and counts, HMAC key, times, sizes
_DEDUPE_DAYS = 7


def hash_hex(raw: bytes) -> str:
    """A hash as the API writes it: each 8-byte word as a little-endian integer, in hex."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def hash_raw(text: str) -> bytes:
    """The inverse of `hash_hex`; refuses anything but 64 hex digits."""
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise HubError(400, f"Invalid Xet hash {text[:80]!r}")
    return b"".join(bytes.fromhex(text[i : i + 16])[::-1] for i in range(0, 64, 16))


def chunk_hash(data: bytes) -> bytes:
    return blake3.blake3(data, key=DATA_KEY).digest()


def _merged(nodes: list[tuple[bytes, int]]) -> tuple[bytes, int]:
    text = "".join(f"{hash_hex(h)} : {size}\n" for h, size in nodes)
    return blake3.blake3(text.encode(), key=NODE_KEY).digest(), sum(size for _, size in nodes)


def _cut(nodes: list[tuple[bytes, int]], start: int) -> int:
    """Where the group starting at `start` ends: 2 to 9 nodes, cut after a node whose last word is 0 mod 4."""
    left = len(nodes) - start
    if left <= 2:
        return len(nodes)
    end = min(9, left)
    for i in range(2, end):
        if int.from_bytes(nodes[start + i][0][24:], "little") % 4 == 0:
            return start + i + 1
    return start + end


def merkle_root(chunks: Iterable[tuple[bytes, int]]) -> bytes:
    """The aggregated hash of (chunk hash, size) pairs: the xorb hash; all zeros for no chunks."""
    nodes = list(chunks)
    if not nodes:
        return bytes(32)
    while len(nodes) > 1:
        merged, start = [], 0
        while start < len(nodes):
            end = _cut(nodes, start)
            merged.append(_merged(nodes[start:end]))
            start = end
        nodes = merged
    return nodes[0][0]


def file_hash(chunks: Iterable[tuple[bytes, int]]) -> bytes:
    pairs = list(chunks)
    return blake3.blake3(merkle_root(pairs), key=bytes(32)).digest() if pairs else bytes(32)


def verification_hash(chunk_hashes: Iterable[bytes]) -> bytes:
    return blake3.blake3(b"".join(chunk_hashes), key=VERIFICATION_KEY).digest()


@dataclass(frozen=True)
class Chunk:
    """A chunk of a stored xorb: its bytes (header included) are `[start, end)` of the xorb."""

    hash: bytes
    size: int
    start: int
    end: int


def _inflate(scheme: int, data: bytes, size: int) -> bytes:
    if scheme == 0:
        return data
    if scheme not in (1, 2):
        raise HubError(400, f"Unknown chunk compression scheme {scheme}")
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        raw = decompressor.decompress(data, max_length=size + 1)
    except RuntimeError as err:
        raise HubError(400, f"Chunk does not decompress: {err}") from None
    if len(raw) != size or not decompressor.eof:
        raise HubError(400, "Chunk does not decompress to the size its header declares")
    if scheme == 1:
        return raw
    grouped, out = np.frombuffer(raw, np.uint8), np.empty(size, np.uint8)  # byte grouping 4: undo the split
    offset = 0
    for lane in range(4):
        count = len(out[lane::4])
        out[lane::4] = grouped[offset : offset + count]
        offset += count
    return out.tobytes()


def iter_chunks(xorb: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[Chunk, bytes]]:
    """Each chunk from byte `start` to `end` (default: up to the footer), with its decompressed content."""
    end = len(xorb) if end is None else end
    position = start
    while position < end and xorb[position : position + 7] != _XORB_FOOTER:
        header = xorb[position : position + 8]
        if len(header) < 8 or header[0] != 0:
            raise HubError(400, f"Malformed xorb chunk header at byte {position}")
        stored, scheme, size = int.from_bytes(header[1:4], "little"), header[4], int.from_bytes(header[5:8], "little")
        data = xorb[position + 8 : position + 8 + stored]
        if len(data) != stored or size > MAX_CHUNK or (scheme == 0 and stored != size):
            raise HubError(400, f"Malformed xorb chunk at byte {position}")
        raw = _inflate(scheme, data, size)
        yield Chunk(chunk_hash(raw), size, position, position + 8 + stored), raw
        position += 8 + stored


def parse_xorb(xorb: bytes, expected: bytes) -> list[Chunk]:
    """A xorb's chunks, once its hash is checked against what the upload URL names."""
    if len(xorb) > MAX_XORB:
        raise HubError(400, f"Xorb over {MAX_XORB} bytes")
    chunks = [chunk for chunk, _ in iter_chunks(xorb)]
    actual = merkle_root((c.hash, c.size) for c in chunks)
    if not chunks or actual != expected:
        raise HubError(400, f"Xorb content hashes to {hash_hex(actual)}, not {hash_hex(expected)}")
    footer = xorb[chunks[-1].end :]
    if footer and footer[8:40] != expected:
        raise HubError(400, "Xorb footer names another xorb")
    return chunks


@dataclass(frozen=True)
class Term:
    """A file's bytes from chunks `[start, end)` of a xorb, `size` bytes once decompressed."""

    xorb: bytes
    size: int
    start: int
    end: int


@dataclass(frozen=True)
class FileInfo:
    hash: bytes
    terms: tuple[Term, ...]
    verification: tuple[bytes, ...] | None
    sha256: bytes | None


@dataclass(frozen=True)
class XorbInfo:
    hash: bytes
    chunks: tuple[tuple[bytes, int, int], ...]  # (chunk hash, byte start, size)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def take(self, size: int) -> bytes:
        if self.position + size > len(self.data):
            raise HubError(400, "Shard ends early")
        self.position += size
        return self.data[self.position - size : self.position]

    def entries(self, count: int) -> list[bytes]:
        if count * _ENTRY > len(self.data) - self.position:
            raise HubError(400, "Shard counts more entries than it holds")
        return [self.take(_ENTRY) for _ in range(count)]


def parse_shard(data: bytes) -> tuple[list[FileInfo], list[XorbInfo]]:
    """The file reconstructions and xorb listings of an uploaded shard (header, two sections, optional footer)."""
    reader = _Reader(data)
    tag, version, footer_size = struct.unpack("<32sQQ", reader.take(48))
    if tag != SHARD_TAG or version != 2:
        raise HubError(400, "Not a Xet shard (wrong magic number or version)")
    files = []
    while (header := reader.take(_ENTRY))[:32] != _BOOKEND:
        flags, count = struct.unpack_from("<II", header, 32)
        terms = tuple(Term(e[:32], *struct.unpack_from("<III", e, 36)) for e in reader.entries(count))
        checks = tuple(e[:32] for e in reader.entries(count)) if flags & WITH_VERIFICATION else None
        sha256 = reader.take(_ENTRY)[:32] if flags & WITH_METADATA else None
        files.append(FileInfo(header[:32], terms, checks, sha256))
    xorbs = []
    while (header := reader.take(_ENTRY))[:32] != _BOOKEND:
        (count,) = struct.unpack_from("<I", header, 36)
        chunks = tuple((e[:32], *struct.unpack_from("<II", e, 32)) for e in reader.entries(count))
        xorbs.append(XorbInfo(header[:32], chunks))
    if len(data) - reader.position != footer_size:
        raise HubError(400, "Shard footer size does not match what follows its sections")
    return files, xorbs


def dedupe_eligible(chunk: bytes) -> bool:
    """Whether the client asks global dedupe about a chunk for its hash alone (its last word is 0 mod 1024); it also
    asks about the first chunk of each file."""
    return int.from_bytes(chunk[24:], "little") % DEDUPE_MODULUS == 0


def dedupe_shard(xorbs: list[tuple[bytes, list[Chunk], int]], key: bytes) -> bytes:
    """A global-dedupe answer: a shard with no files that lists each (xorb hash, chunks, bytes on disk), its chunk
    hashes keyed with `key` (so it tells a client only about chunks it already has), then the lookup tables the
    client reads through the footer: truncated hash (first word) → entry index, sorted; chunks → (xorb, chunk)."""
    bookend = _BOOKEND + bytes(16)
    section, xorb_lookup, chunk_lookup, index, total = bytearray(), [], [], 0, 0
    for xorb, chunks, on_disk in sorted(xorbs, key=lambda x: x[0]):
        size = sum(c.size for c in chunks)
        xorb_lookup.append((int.from_bytes(xorb[:8], "little"), index))
        section += struct.pack("<32sIIII", xorb, 0, len(chunks), size, on_disk)
        start = 0
        for position, chunk in enumerate(chunks):
            keyed = blake3.blake3(chunk.hash, key=key).digest()
            chunk_lookup.append((int.from_bytes(keyed[:8], "little"), index, position))
            section += struct.pack("<32sIIII", keyed, start, chunk.size, 0, 0)
            start += chunk.size
        index, total = index + 1 + len(chunks), total + size
    xorb_offset = 48 + len(bookend)
    xorb_table = xorb_offset + len(section) + len(bookend)
    chunk_table = xorb_table + 12 * len(xorb_lookup)
    footer_offset = chunk_table + 16 * len(chunk_lookup)
    now, disk = int(time.time()), sum(x[2] for x in xorbs)
    tables = (xorb_table, 0, xorb_table, len(xorb_lookup), chunk_table, len(chunk_lookup))  # files, xorbs, chunks
    times = (now, now + _DEDUPE_DAYS * 86400)  # created; expires (the client drops the shard, and its key, then)
    footer = _FOOTER.pack(1, 48, xorb_offset, *tables, key, *times, *[0] * 6, disk, total, total, footer_offset)
    return b"".join(
        [
            SHARD_TAG + struct.pack("<QQ", 2, _FOOTER.size) + bookend + section + bookend,
            *(struct.pack("<QI", *entry) for entry in sorted(xorb_lookup)),
            *(struct.pack("<QII", *entry) for entry in sorted(chunk_lookup)),
            footer,
        ]
    )
