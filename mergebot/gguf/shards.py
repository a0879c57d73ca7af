"""A merge's safetensors shards as the converter reads them: every header checked against its file before any
tensor is read, then rows of one tensor at a time as float32, read with pread into a buffer of their own, so
resident memory stays at one block however large the model.

The merge engine has its own reader (merge/io.py); this layer sits beside it and may not import it, and needs only
this small part: checked headers and row blocks, as stored or as float32.
"""

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergebot.errors import GgufError
from mergebot.files import INDEX_FILE, SAFETENSORS_HEADER_LIMIT, SINGLE_FILE, parse_json, read_small

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
"""The dtypes a merge writes (a converted model's weights are floating point)."""


@dataclass(frozen=True)
class Tensor:
    """Where one tensor's bytes lie: its file and the absolute byte range of its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_items(self) -> int:
        items = 1
        for dim in self.shape[1:]:
            items *= dim
        return items


def list_tensors(model_dir: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory (sharded with an index, or one model.safetensors), headers checked."""
    index = model_dir / INDEX_FILE
    if index.exists():
        value = parse_json(read_small(index, str(model_dir), GgufError), str(model_dir), INDEX_FILE, GgufError)
        weight_map = value.get("weight_map") if isinstance(value, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise GgufError(f"{index}: no weight_map of tensor names to file names")
        files = sorted(set(weight_map.values()))
    elif (model_dir / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        raise GgufError(f"{model_dir}: no {INDEX_FILE} or {SINGLE_FILE} to convert")
    tensors: dict[str, Tensor] = {}
    for name in files:
        if "/" in name or name.startswith(".") or not name.endswith(".safetensors"):
            raise GgufError(f"{index}: refusing the shard name {name!r}")
        for tensor in read_header(model_dir / name):
            if tensor.name in tensors:
                raise GgufError(f"{model_dir}: tensor {tensor.name} is in two shards")
            tensors[tensor.name] = tensor
    return tensors


def read_header(path: Path) -> list[Tensor]:
    """A shard's tensors; each must lie inside the file, back to back, with as many bytes as its shape says."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
            if length > SAFETENSORS_HEADER_LIMIT or 8 + length > size:
                raise GgufError(f"{path}: safetensors header of {length} bytes does not fit the file ({size} bytes)")
            raw = handle.read(length)
    except OSError as failure:
        raise GgufError(f"{path}: cannot read ({failure.strerror})") from failure
    header = parse_json(raw, str(path), "safetensors header", GgufError)
    if not isinstance(header, dict):
        raise GgufError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    tensors, end_of_data = [], 0
    for name, entry in sorted(header.items(), key=lambda item: _begin(path, item)):
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if dtype not in ITEMSIZE:
            raise GgufError(f"{path}: tensor {name} has dtype {dtype!r}; a GGUF is written from F32, F16 or BF16")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise GgufError(f"{path}: tensor {name} has an invalid shape {shape!r}")
        begin, end = entry["data_offsets"]
        items = 1
        for dim in shape:
            items *= dim
        if begin != end_of_data or end - begin != items * ITEMSIZE[dtype] or 8 + length + end > size:
            raise GgufError(f"{path}: tensor {name} has inconsistent data offsets [{begin}, {end}]")
        end_of_data = end
        tensors.append(Tensor(name, dtype, tuple(shape), path, 8 + length + begin))
    return tensors


def _begin(path: Path, item: tuple[str, object]) -> int:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
        raise GgufError(f"{path}: tensor {name} has no valid data_offsets")
    return offsets[0]


class RowReader:
    """Rows of tensors as float32, each block read with pread into its own buffer (no mapping stays resident)."""

    def __init__(self) -> None:
        self._files: dict[Path, int] = {}

    def rows(self, tensor: Tensor, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of `tensor` as a float32 array of shape (stop - start, *row shape)."""
        raw = self.raw_rows(tensor, start, stop)
        if tensor.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False)

    def raw_rows(self, tensor: Tensor, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored: float32, float16, or bfloat16's bits as uint16."""
        itemsize = ITEMSIZE[tensor.dtype]
        raw = np.empty((stop - start) * tensor.row_items * itemsize, dtype=np.uint8)
        view, done = memoryview(raw), 0
        first = tensor.offset + start * tensor.row_items * itemsize
        while done < len(view):
            count = os.preadv(self._file(tensor.file), [view[done:]], first + done)
            if count == 0:
                raise GgufError(f"{tensor.file}: truncated while reading tensor {tensor.name}")
            done += count
        stored = raw.view({"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[tensor.dtype])
        return stored.reshape((stop - start, *tensor.shape[1:]) if tensor.shape else ())

    def _file(self, path: Path) -> int:
        descriptor = self._files.get(path)
        if descriptor is None:
            try:
                descriptor = self._files[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as failure:
                raise GgufError(f"{path}: cannot read ({failure.strerror})") from failure
        return descriptor

    def close(self) -> None:
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files.clear()

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
