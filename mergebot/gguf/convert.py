"""A merge's safetensors checkpoint as one GGUF file, streamed: the header, metadata and tensor table first (every
tensor's type and size are known from its shape), then each tensor's bytes, a block of rows at a time, read from
the shards, changed as llama.cpp's converter changes them, converted and appended. Memory stays at one block.

The file is written under a temporary name, fsynced and renamed: a reader never sees a torn GGUF.
"""

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from mergebot.config.gguf import QUANTIZER_TYPES, llama_cpp_installed
from mergebot.errors import DiskFullError, GgufError, GgufUnsupportedError
from mergebot.files import fsync_dir, parse_json, read_small
from mergebot.gguf.families import (
    SKIPPED_SUFFIXES,
    Family,
    add_hyperparameters,
    family_of,
    llama3_rope_factors,
    permute_rows,
    shape_of,
)
from mergebot.gguf.quantize import quantize
from mergebot.gguf.shards import RowReader, Tensor, list_tensors
from mergebot.gguf.vocab import Vocab, read_vocab

FILE_TYPES = {
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
"""The types written here, in numpy: F16/BF16 are conversions, Q8_0 the gguf package's quantizer (bit-exact with
ggml's). The k-quants come from llama.cpp's own quantizer (quantize.py)."""
SUPPORTED_FILE_TYPES = (*FILE_TYPES, *(QUANTIZER_TYPES if llama_cpp_installed() else ()))
"""What `write_gguf` makes on this install."""
BLOCK_BYTES = 16 << 20
"""About how many float32 bytes of one tensor are converted at a time."""


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file written and closed: where it is, its type, and what a publish and a card need of it."""

    path: Path
    file_type: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Planned:
    """One tensor of the GGUF: its source, its GGUF name and type, and how its values change."""

    source: Tensor | None
    name: str
    qtype: gguf.GGMLQuantizationType
    permute_head_dim: int = 0
    plus_one: bool = False
    values: np.ndarray | None = None
    """A tensor computed here rather than read (Llama 3's rotary factors)."""

    @property
    def as_stored(self) -> bool:
        """Whether the file holds the source's own values: its bytes are copied (rows reordered where permuted)."""
        return self.source is not None and self.source.dtype == self.qtype.name and not self.plus_one

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape if self.source is not None else self.values.shape

    @property
    def nbytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return rows * _row_nbytes(self.shape, self.qtype)


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise GgufError(f"{model_dir}: no config.json to convert")
    value = parse_json(read_small(path, str(model_dir), GgufError), str(model_dir), path.name, GgufError)
    if not isinstance(value, dict):
        raise GgufError(f"{path}: not a JSON object")
    return value


def write_gguf(model_dir: Path, out_path: Path, file_type: str) -> GgufFile:
    """Convert the checkpoint in `model_dir` into `out_path` as one GGUF file of `file_type`, one of
    SUPPORTED_FILE_TYPES; a k-quant is llama.cpp's quantization of a BF16 file written first beside it."""
    if file_type not in SUPPORTED_FILE_TYPES:
        raise GgufUnsupportedError(f"GGUF type {file_type}: mergebot writes {', '.join(SUPPORTED_FILE_TYPES)}")
    config = read_config(model_dir)
    family = family_of(config, str(model_dir))
    written_type = file_type if file_type in FILE_TYPES else "BF16"
    plan = plan_tensors(family, config, list_tensors(model_dir), written_type, str(model_dir))
    embedding = next(item for item in plan if item.name == "token_embd.weight")
    vocab = read_vocab(model_dir, config, embedding.shape[0])
    with _temporary(out_path) as temp:
        writer = gguf.GGUFWriter(temp, family.name)
        try:
            name = re.sub(rf"[-.]{file_type}$", "", out_path.stem, flags=re.IGNORECASE)
            _add_metadata(writer, family, config, vocab, written_type, name, embedding.shape[0])
            for item in plan:
                writer.add_tensor_info(item.name, _byte_shape(item), _numpy_dtype(item.qtype), item.nbytes, item.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_data(writer, plan)
        finally:
            writer.close()
        if written_type != file_type:
            with _temporary(out_path) as quantized:
                quantize(temp, quantized, file_type)
                _fsync(quantized)
                os.replace(quantized, out_path)
        else:
            os.replace(temp, out_path)
    fsync_dir(out_path.parent)
    return GgufFile(out_path, file_type, out_path.stat().st_size, _sha256(out_path))


@contextlib.contextmanager
def _temporary(out_path: Path) -> Iterator[Path]:
    """A hidden temporary file beside `out_path`, removed unless renamed; OS errors as one line."""
    temp = None
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
        os.close(descriptor)
        temp = Path(name)
        yield temp
    except OSError as failure:
        if failure.errno == errno.ENOSPC:
            raise DiskFullError(f"{out_path}: the disk filled up while writing the GGUF file") from failure
        raise GgufError(f"{out_path}: cannot write ({failure.strerror})") from failure
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def plan_tensors(family: Family, config: dict, tensors: dict[str, Tensor], file_type: str, where: str) -> list[Planned]:
    """Every tensor the GGUF holds, in order (embeddings, then layer by layer, then the output), with its type:
    norms and other vectors stay float32, as llama.cpp keeps them; matrices take the file's type, and a matrix whose
    rows do not split into Q8_0 blocks falls back to F16."""
    layers = config.get("num_hidden_layers")
    found = {int(match.group(1)) for name in tensors if (match := re.search(r"\.layers\.(\d+)\.", name))}
    if found != set(range(layers if type(layers) is int and 0 < layers <= len(found) else -1)):
        raise GgufError(f"{where}: config.json's num_hidden_layers is {str(layers)[:20]}, the shards hold {len(found)}")
    names = gguf.get_tensor_name_map(family.arch, layers)
    shape = shape_of(config)
    matrix_type = FILE_TYPES[file_type][0]
    plan = []
    for name in sorted(tensors, key=_order):
        if name.endswith(SKIPPED_SUFFIXES) or (family.tied_output and name == "lm_head.weight"):
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise GgufUnsupportedError(f"{where}: tensor {name} has no GGUF name in {family.name}")
        tensor = tensors[name]
        qtype = gguf.GGMLQuantizationType.F32
        if len(tensor.shape) == 2 and not mapped.endswith("_norm.weight"):
            qtype = matrix_type
            if qtype == gguf.GGMLQuantizationType.Q8_0 and tensor.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = gguf.GGMLQuantizationType.F16
        elif len(tensor.shape) > 2:
            raise GgufUnsupportedError(f"{where}: tensor {name} has {len(tensor.shape)} dimensions")
        permute = 0
        if family.permute_qk and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            heads = shape.heads if ".q_proj." in name else shape.kv_heads
            if tensor.shape[0] != heads * shape.head_dim:
                raise GgufError(f"{where}: tensor {name} has {tensor.shape[0]} rows, not {heads} heads' worth")
            permute = shape.head_dim
        plus_one = family.norm_plus_one and name.endswith("norm.weight")
        plan.append(Planned(tensor, mapped, qtype, permute, plus_one))
    if not any(item.name == "token_embd.weight" for item in plan):
        raise GgufError(f"{where}: no token embeddings to convert")
    factors = llama3_rope_factors(config) if family.arch == gguf.MODEL_ARCH.LLAMA else None
    if factors is not None:
        rope_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(Planned(None, rope_name, gguf.GGMLQuantizationType.F32, values=factors))
    return plan


def _order(name: str) -> tuple[int, int, str]:
    """Embeddings first, then the layers in order, then the final norm and the output."""
    layer = re.search(r"\.layers\.(\d+)\.", name)
    if layer:
        return (1, int(layer.group(1)), name)
    return (0 if "embed" in name else 2, 0, name)


def _add_metadata(
    writer: gguf.GGUFWriter, family: Family, config: dict, vocab: Vocab, file_type: str, name: str, rows: int
) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[file_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(family, config, rows, writer)
    vocab.add_to(writer)


def _write_data(writer: gguf.GGUFWriter, plan: list[Planned]) -> None:
    """Each tensor's bytes at its aligned offset, block by block, then the file fsynced."""
    handle = writer.fout[0]
    writer.write_padding(handle, handle.tell())
    with RowReader() as reader:
        for item in plan:
            written = 0
            for block in _blocks(reader, item):
                data = block if item.as_stored else _encode(block, item.qtype)
                handle.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                written += data.nbytes
            if written != item.nbytes:
                raise GgufError(f"{item.name}: wrote {written} bytes where its shape holds {item.nbytes}")
            writer.write_padding(handle, written)
    handle.flush()
    os.fsync(handle.fileno())


def _blocks(reader: RowReader, item: Planned) -> Iterator[np.ndarray]:
    """The tensor's values in blocks of whole rows (whole heads where rows are permuted): as stored where the file
    holds them so, else as float32."""
    if item.source is None:
        yield item.values
        return
    tensor = item.source
    row_bytes = max(tensor.row_items * 4, 1)
    step = max(BLOCK_BYTES // row_bytes, 1)
    if item.permute_head_dim:
        step = max(step // item.permute_head_dim, 1) * item.permute_head_dim
    for start in range(0, tensor.rows, step):
        read = reader.raw_rows if item.as_stored else reader.rows
        block = read(tensor, start, min(start + step, tensor.rows))
        if item.permute_head_dim:
            block = permute_rows(block, item.permute_head_dim)
        if item.plus_one:
            block = block + 1
        yield block


def _encode(block: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return block.astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        return block.astype(np.float16)
    return gguf.quants.quantize(block, qtype)


def _row_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    items = 1
    for dim in shape[1:]:
        items *= dim
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return items // block_size * type_size


def _byte_shape(item: Planned) -> tuple[int, ...]:
    """The shape gguf's writer takes for a type: the values' shape, or for a block type, bytes per row."""
    if item.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return item.shape
    return gguf.quants.quant_shape_to_byte_shape(item.shape, item.qtype)


def _numpy_dtype(qtype: gguf.GGMLQuantizationType) -> type:
    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
