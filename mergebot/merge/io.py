"""safetensors on disk: checked headers, row ranges read from a memory map, shards written as a stream.

Only safetensors are ever read; the header is checked against the file size before anything is mapped. Rows are
read through a shared memory map whose pages are handed back after each read, so resident memory stays at a
few blocks however large the model.
"""

import contextlib
import json
import mmap
import os
import queue
import struct
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mergebot.errors import ModelError
from mergebot.files import SAFETENSORS_HEADER_LIMIT, fsync_dir, parse_json

if TYPE_CHECKING:
    import torch

    from mergebot.merge.lora import LoraDelta


@dataclass(frozen=True)
class DType:
    """A tensor dtype by its safetensors name; torch's own only where a torch path asks for it (`torch`), so a
    merge that needs no torch never imports it."""

    name: str
    itemsize: int
    torch_name: str
    floating: bool = False

    @property
    def torch(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, DType] = {
    "F64": DType("F64", 8, "float64", floating=True),
    "F32": DType("F32", 4, "float32", floating=True),
    "F16": DType("F16", 2, "float16", floating=True),
    "BF16": DType("BF16", 2, "bfloat16", floating=True),
    "I64": DType("I64", 8, "int64"),
    "I32": DType("I32", 4, "int32"),
    "I16": DType("I16", 2, "int16"),
    "I8": DType("I8", 1, "int8"),
    "U8": DType("U8", 1, "uint8"),
    "BOOL": DType("BOOL", 1, "bool"),
}
BY_TORCH_NAME = {dtype.torch_name: dtype for dtype in DTYPES.values()}
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and the absolute byte range of its data."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    lora: "LoraDelta | None" = None
    """A LoRA adapter's low-rank update of this weight, added to every row read (a `model+lora` input)."""

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.shape else ()

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: every tensor's range must lie inside the file, contiguously."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > SAFETENSORS_HEADER_LIMIT or 8 + header_len > size:
                raise ModelError(
                    f"{path}: safetensors header length {header_len} is larger than the file ({size} bytes)"
                )
            raw = handle.read(header_len)
    except OSError as error:
        raise ModelError(f"{path}: cannot read ({error.strerror})") from error
    header = parse_json(raw, str(path), "safetensors header")
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: safetensors __metadata__ is not a JSON object")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    end_of_data = 0
    for name, entry in sorted(header.items(), key=lambda item: _offsets(path, item)[0]):
        begin, end = _offsets(path, (name, entry))
        dtype_name = entry.get("dtype")
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {dtype_name!r}")
        shape = entry.get("shape", [])
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ModelError(f"{path}: tensor {name} has an invalid shape {shape!r}")
        shape = tuple(shape)
        if end - begin != _numel(shape) * dtype.itemsize or begin != end_of_data:
            raise ModelError(f"{path}: tensor {name} has inconsistent data offsets [{begin}, {end}]")
        if data_start + end > size:
            raise ModelError(f"{path}: truncated safetensors file: tensor {name} ends past the file's {size} bytes")
        end_of_data = end
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return tensors, {str(key): str(value) for key, value in metadata.items()}


def _offsets(path: Path, item: tuple[str, object]) -> tuple[int, int]:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
        raise ModelError(f"{path}: tensor {name} has no valid data_offsets")
    return offsets[0], offsets[1]


class TensorReader:
    """Reads row ranges of tensors: as float32 from memory-mapped files, giving the pages back after each read, or
    as raw bits with pread into a caller's buffer."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._files: dict[Path, int] = {}
        self._opening = threading.Lock()

    def raw_rows(self, info: TensorInfo, start: int, stop: int, out: np.ndarray) -> None:
        """The bytes of rows [start, stop) into `out`, a contiguous array of exactly that many bytes."""
        view = memoryview(out).cast("B")
        done, first = 0, info.offset + start * info.row_bytes
        while done < len(view):
            count = os.preadv(self._file(info.file), [view[done:]], first + done)
            if count == 0:
                raise ModelError(f"{info.file}: truncated while reading tensor {info.name}")
            done += count

    def will_need(self, info: TensorInfo) -> None:
        """Ask the kernel to start reading a tensor that is coming next, while the current one is computed."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._file(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)

    def _file(self, path: Path) -> int:
        with self._opening:  # reader threads share the descriptors
            descriptor = self._files.get(path)
            if descriptor is None:
                descriptor = self._files[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return descriptor

    def rows(self, info: TensorInfo, start: int, stop: int) -> "torch.Tensor":
        """Rows [start, stop) as float32 (a copy, so the mapping can be released)."""
        import torch

        mapping = self._map(info.file)
        first = info.offset + start * info.row_bytes
        length = (stop - start) * info.row_bytes
        count = length // info.dtype.itemsize
        if count == 0:
            return torch.zeros((stop - start, *info.row_shape), dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the map is read-only; the view is only read
            view = torch.frombuffer(mapping, dtype=info.dtype.torch, count=count, offset=first)
        block = view.to(torch.float32, copy=True).reshape((stop - start, *info.row_shape) if info.shape else ())
        del view
        page_start = first - first % PAGE
        mapping.madvise(mmap.MADV_DONTNEED, page_start, first + length - page_start)
        if info.lora is not None:
            block += info.lora.rows(self, start, stop)
        return block

    def _map(self, path: Path) -> mmap.mmap:
        mapping = self._maps.get(path)
        if mapping is None:
            with path.open("rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = mapping
        return mapping

    def close(self) -> None:
        for mapping in self._maps.values():
            mapping.close()
        self._maps.clear()
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of the output checkpoint as the shard layout sees it: name, dtype, shape only."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def encode_header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """A deterministic safetensors header (8-byte length + JSON padded with spaces to 8 bytes)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype.name,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


class ShardWriter:
    """Streams tensors, in layout order, into a temporary file that becomes the shard only when complete.

    Bytes are written behind, by a thread of their own, while the next block is computed; a write error (a full
    disk) comes back from the next call."""

    QUEUED_BLOCKS = 4

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str]) -> None:
        self.path = path
        self.temp_path = path.with_name(path.name + ".tmp")
        self._expected = iter(tensors)
        self._current: OutputTensor | None = None
        self._left = 0
        self._handle = self.temp_path.open("wb")
        self._handle.write(encode_header(tensors, metadata))
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(self.QUEUED_BLOCKS)
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._write_behind, name="shard-writer", daemon=True)
        self._thread.start()

    def begin(self, name: str) -> None:
        """Start the next tensor of the layout; its bytes follow through `write`."""
        if self._left:
            raise RuntimeError(f"{self._current.name if self._current else '?'} was not written completely")
        self._current = next(self._expected)
        if self._current.name != name:
            raise RuntimeError(f"layout expects {self._current.name}, got {name}")
        self._left = self._current.nbytes

    def write(self, block: "torch.Tensor") -> None:
        """Append rows of the current tensor, converted to its output dtype."""
        import torch

        assert self._current is not None
        converted = block.to(self._current.dtype.torch, copy=True).contiguous().reshape(-1)
        self.write_bits(converted.view(torch.uint8).numpy())

    def write_bits(self, data: np.ndarray) -> None:
        """Append the current tensor's next bytes, already in its output dtype; `data` is not touched afterwards."""
        if self._error is not None:
            raise self._error
        if data.nbytes > self._left:
            raise RuntimeError(f"{self._current.name if self._current else '?'}: more data than its shape holds")
        self._left -= data.nbytes
        self._queue.put(data)

    def _write_behind(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._handle.write(memoryview(data).cast("B"))
                except OSError as error:
                    self._error = error

    def _drain(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> Path:
        """fsync and rename: after this the shard exists under its final name, complete."""
        self._drain()
        if self._error is not None:
            raise self._error
        if self._left or next(self._expected, None) is not None:
            raise RuntimeError(f"{self.path.name}: not every tensor was written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.temp_path, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        self._drain()
        with contextlib.suppress(OSError):  # closing flushes, and on a full disk that fails again
            self._handle.close()
        self.temp_path.unlink(missing_ok=True)
