"""Runs a merge plan shard by shard, in bounded memory, resuming from finished shards.

Work happens in a hidden sibling directory of OUT_DIR; shards get their final names only when complete, and the
directory takes OUT_DIR's name only when every file is in place.
"""

import ctypes
import errno
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import yaml

from mergebot.config.merge import MergeConfig
from mergebot.config.moe import MoeConfig
from mergebot.errors import ConfigError, DiskFullError
from mergebot.files import (
    DROPPED_KEY,
    INDEX_FILE,
    default_cache_dir,
    drop_remote_code,
    fsync_dir,
    read_small,
    write_atomic,
    write_json_atomic,
)
from mergebot.merge.checkpoint import FINGERPRINT_KEY, finished_with, shard_fingerprint
from mergebot.merge.io import OutputTensor, ShardWriter, TensorReader
from mergebot.merge.layout import with_layer_count
from mergebot.merge.methods import Block, MergeMethod, RawBlocks, available_methods, method_named
from mergebot.merge.plan import Plan, ShardPlan, TensorPlan, build_plan
from mergebot.merge.source import InputModel
from mergebot.merge.threads import thread_count, use_torch_threads
from mergebot.merge.tokenizer_files import write_tokenizer_files
from mergebot.progress import ShardProgress

MERGE_CONFIG_FILE = "mergebot_config.yml"
"""The merge as run, each model pinned to the revision merged: enough to reproduce it."""
BLOCK_ELEMENTS = 1 << 20
"""Rows are read in blocks of about this many elements per input (4 MiB in float32): small enough that a
method's temporaries stay near the cache and peak memory stays flat."""
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
RAW_BITS = {"BF16": np.uint16, "F32": np.uint32}
RAW_KEPT_BYTES = 64 << 20
"""A tensor read by a multi-pass method (slerp's angle, TIES's cut, DARE's rescale) is kept in memory up to this
size, so the passes after the first read nothing; the largest (embeddings) are read again each pass."""
_READ_AHEAD = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
"""Reads the next block of a tensor while the merge's threads compute the current one."""


@cache
def _readers() -> ThreadPoolExecutor:
    """The read-ahead's helpers: as many as the merge computes on."""
    return ThreadPoolExecutor(thread_count(), thread_name_prefix="read")


@dataclass
class MergeResult:
    out_dir: Path
    shards: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)


def resolve_method(name: str, source: str) -> MergeMethod:
    method = method_named(name)
    if method is None:
        known = ", ".join(sorted(available_methods()))
        raise ConfigError(f"{source}: merge_method: unknown method {name!r} (known: {known})")
    return method


def _keep_freed_memory() -> None:
    """Let glibc keep freed blocks for reuse instead of returning each to the kernel: every block then lands in
    memory that is already mapped, instead of costing page faults and zeroing (about 10x faster per block)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def run_merge(
    config: MergeConfig, models: dict[str, InputModel], out_dir: Path, progress: ShardProgress | None = None
) -> MergeResult:
    """Merge into OUT_DIR; shards already finished (here or in a killed run) with the same fingerprint are kept."""
    plan = build_plan(config, models, resolve_method(config.merge_method, config.source))
    _keep_freed_memory()
    thread_count()  # a bad MERGEBOT_THREADS is reported before any work
    os.environ.setdefault("NUMBA_CACHE_DIR", str(default_cache_dir() / "numba"))
    progress = progress or ShardProgress(enabled_bar=False)
    return build_output(
        out_dir,
        plan.shards,
        lambda shard: shard_fingerprint(plan, shard, models),
        lambda shard, reader, target, fingerprint: _compute_shard(
            plan, shard, models, reader, target, fingerprint, progress
        ),
        lambda work: _write_metadata(config, plan, models, work),
        progress,
    )


class _Tensor(Protocol):
    @property
    def output(self) -> OutputTensor: ...


class _Shard(Protocol):
    @property
    def file_name(self) -> str: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def tensors(self) -> Sequence[_Tensor]: ...


ShardT = TypeVar("ShardT", bound=_Shard)


def build_output(
    out_dir: Path,
    shards: Sequence[ShardT],
    fingerprint_of: Callable[[ShardT], str],
    compute: Callable[[ShardT, TensorReader, Path, str], None],
    write_metadata: Callable[[Path], None],
    progress: ShardProgress,
) -> MergeResult:
    """OUT_DIR built in a `.partial` directory beside it and moved into place whole: a directory mergebot did not
    write is refused, what a killed run left is resumed from, and files no longer part of the output are dropped."""
    out_dir = out_dir.absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MERGE_CONFIG_FILE).exists():
        raise ConfigError(f"{out_dir}: exists and is not a mergebot output; refusing to replace it")
    work = out_dir.parent / f".{out_dir.name}.partial"
    with _full_disk_reported(work):
        work.mkdir(parents=True, exist_ok=True)
        for leftover in work.glob("*.tmp"):
            leftover.unlink()
        result = _build_shards(shards, fingerprint_of, compute, work, out_dir, progress)
        write_metadata(work)
        expected = set(result.shards) | {p.name for p in work.iterdir() if not p.name.endswith(".safetensors")}
        for stale in work.iterdir():
            if stale.name not in expected:
                stale.unlink()
        _move_into_place(work, out_dir)
    return result


def _build_shards(
    shards: Sequence[ShardT],
    fingerprint_of: Callable[[ShardT], str],
    compute: Callable[[ShardT, TensorReader, Path, str], None],
    work: Path,
    out_dir: Path,
    progress: ShardProgress,
) -> MergeResult:
    """Each shard into `work`: kept when already finished there, linked from the previous OUT_DIR when it was made
    from the same inputs (its fingerprint), computed otherwise."""
    result = MergeResult(out_dir)
    progress.begin(len(shards), sum(shard.nbytes for shard in shards))
    with TensorReader() as reader, closing(progress):
        for shard in shards:
            fingerprint = fingerprint_of(shard)
            result.shards.append(shard.file_name)
            result.fingerprints[shard.file_name] = fingerprint
            target = work / shard.file_name
            progress.start(shard.file_name, shard.nbytes)
            if finished_with(target, fingerprint):
                outcome = "resumed"
            elif finished_with(out_dir / shard.file_name, fingerprint):
                _link_or_copy(out_dir / shard.file_name, target)
                outcome = "reused"
            else:
                compute(shard, reader, target, fingerprint)
                outcome = "computed"
            (result.computed if outcome == "computed" else result.reused).append(shard.file_name)
            progress.done(shard.file_name, outcome, shard.nbytes)
    return result


@contextmanager
def _full_disk_reported(work: Path) -> Iterator[None]:
    """A full disk is the machine's trouble, not the merge's: say so in one line, as worth retrying (finished
    shards stay in `work`, so the retry resumes from them)."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(
            f"{work}: no space left on the device; finished shards are kept and a rerun resumes from them"
        ) from error


def _compute_shard(
    plan: Plan,
    shard: ShardPlan,
    models: dict[str, InputModel],
    reader: TensorReader,
    target: Path,
    fingerprint: str,
    progress: ShardProgress,
) -> None:
    writer = ShardWriter(target, [t.output for t in shard.tensors], {"format": "pt", FINGERPRINT_KEY: fingerprint})
    try:
        for number, tensor in enumerate(shard.tensors):
            if number + 1 < len(shard.tensors):
                for ref in shard.tensors[number + 1].inputs:
                    reader.will_need(models[ref.model].tensors[ref.tensor])
            writer.begin(tensor.output.name)
            blocks = _BlockSource(plan, tensor, models, reader)
            fused = plan.method.fused
            raw = blocks.raw() if fused else None
            if fused and raw is not None:
                for bits in fused(raw, tensor.params):
                    writer.write_bits(bits)
                    progress.advance(bits.nbytes)
                continue
            use_torch_threads()
            for block in plan.method.merge(blocks, tensor.params):
                writer.write(block)
                progress.advance(block.numel() * tensor.output.dtype.itemsize)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


class _BlockSource:
    """The inputs of one output tensor as row blocks in float32, vocabulary rows aligned and gaps filled.

    A tensor that fits in one block is read once and served from memory on every pass.
    """

    def __init__(self, plan: Plan, tensor: TensorPlan, models: dict[str, InputModel], reader: TensorReader):
        self.reader = reader
        self.output = tensor.output
        self.infos = [models[ref.model].tensors[ref.tensor] for ref in tensor.inputs]
        self.rows = tensor.output.shape[0] if tensor.output.shape else 1
        row_elements = max(1, tensor.output.nbytes // tensor.output.dtype.itemsize // max(1, self.rows))
        self.block_rows = max(1, BLOCK_ELEMENTS // row_elements)
        maps = plan.aligned_maps(tensor, self.infos)
        self.aligned = None
        if maps is not None:
            from mergebot.merge.align import AlignedRows  # torch's; a merge that aligns no rows never imports it

            self.aligned = AlignedRows(plan, tensor, self.infos, maps, reader, self.block_rows)
        self._cached: list[tuple[int, Block]] | None = None

    def __call__(self) -> Iterator[tuple[int, Block]]:
        if self._cached is not None:
            return iter(self._cached)
        if self.rows <= self.block_rows:
            self._cached = [(0, self._block(0, self.rows))]
            return iter(self._cached)
        return (
            (start, self._block(start, min(start + self.block_rows, self.rows)))
            for start in range(0, self.rows, self.block_rows)
        )

    def _block(self, start: int, stop: int) -> Block:
        if self.aligned is None:
            return [self.reader.rows(info, start, stop) for info in self.infos]
        return self.aligned.block(start, stop)

    def raw(self) -> RawBlocks | None:
        """The same blocks as raw bits, when the tensor is plain: a matrix, or a vector in one block; no vocabulary
        rows to align, no LoRA, every input and the output of one shape in bfloat16 or float32 (one kind for all
        inputs)."""
        shape, dtypes = self.output.shape, {info.dtype.name for info in self.infos}
        if (
            self.aligned is not None
            or len(dtypes) != 1
            or not dtypes <= RAW_BITS.keys()
            or self.output.dtype.name not in RAW_BITS
            or any(info.lora is not None or info.shape != shape for info in self.infos)
            or not (len(shape) == 2 or (len(shape) == 1 and self.rows <= self.block_rows))
        ):
            return None
        bits = RAW_BITS[dtypes.pop()]
        return RawBlocks(_RawPasses(self, bits), shape, bits, RAW_BITS[self.output.dtype.name])


class _RawPasses:
    """Passes over a plain tensor's raw blocks: the next block is read (by the I/O thread) while the current one is
    computed; a tensor whose inputs hold at most RAW_KEPT_BYTES is read once, in its first pass, and kept."""

    def __init__(self, source: _BlockSource, bits: type) -> None:
        self.source = source
        self.bits = bits
        self._cached: list[tuple[int, np.ndarray]] | None = None

    def __call__(self) -> Iterator[tuple[int, np.ndarray]]:
        if self._cached is not None:
            return iter(self._cached)
        rows, step = self.source.rows, self.source.block_rows
        if sum(info.nbytes for info in self.source.infos) <= RAW_KEPT_BYTES:
            self._cached = list(self._stream(rows, step))
            return iter(self._cached)
        return self._stream(rows, step)

    def _stream(self, rows: int, step: int) -> Iterator[tuple[int, np.ndarray]]:
        pending = _READ_AHEAD.submit(self._read, 0, min(step, rows))
        for start in range(0, rows, step):
            block = pending.result()
            if start + step < rows:
                pending = _READ_AHEAD.submit(self._read, start + step, min(start + 2 * step, rows))
            yield start, block

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Every input's rows at once, one input per reader thread: a single thread copying out of the page cache
        is slower than the merge's loops."""
        infos = self.source.infos
        block = np.empty((len(infos), (stop - start) * infos[0].row_bytes // infos[0].dtype.itemsize), self.bits)
        reads = [
            _readers().submit(self.source.reader.raw_rows, info, start, stop, row)
            for row, info in zip(block, infos, strict=True)
        ]
        for read in reads:
            read.result()
        return block


def _link_or_copy(source: Path, target: Path) -> None:
    temp = target.with_name(target.name + ".tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        shutil.copyfile(source, temp)
    os.replace(temp, target)


def _write_metadata(config: MergeConfig, plan: Plan, models: dict[str, InputModel], work: Path) -> None:
    """Config.json (vocab size, dtype, layer count right), the tokenizer files, and the rest `write_model_files`
    writes."""
    template = models[plan.template]
    model_config = dict(template.config)
    outputs = {t.output.name: t.output for shard in plan.shards for t in shard.tensors}
    embedding = next((o for name, o in outputs.items() if name.endswith("embed_tokens.weight")), None)
    if embedding is not None:
        model_config["vocab_size"] = embedding.shape[0]
    model_config = with_layer_count(model_config, plan.layers, {name: model.config for name, model in models.items()})
    dtype = next(iter(outputs.values())).dtype
    dtype_name = dtype.torch_name if dtype.name in ("BF16", "F16", "F32") else None
    if dtype_name:
        for key in [k for k in ("torch_dtype", "dtype") if k in model_config] or ["torch_dtype"]:
            model_config[key] = dtype_name
    pinned = config.pinned({name: model.pins for name, model in models.items()})
    tokenizer_dropped = write_tokenizer_files(config, plan.vocab.output, models, work)
    write_model_files(work, plan.shards, model_config, template, pinned, tokenizer_dropped)


def write_model_files(
    work: Path,
    shards: Sequence[_Shard],
    model_config: dict,
    template: InputModel,
    pinned: MergeConfig | MoeConfig,
    tokenizer_dropped: list[str],
) -> None:
    """What an output holds beside its shards and tokenizer files: config.json without remote-code pointers, the
    template's generation config, the config as run (revisions pinned), and the index, whose metadata lists the
    remote-code pointers left out of config.json and of the tokenizer files."""
    model_config, dropped = drop_remote_code(model_config, "config.json")
    write_json_atomic(work / "config.json", model_config)
    if (template.path / "generation_config.json").exists():
        generation = read_small(template.path / "generation_config.json", f"model {template.label}")
        write_atomic(work / "generation_config.json", generation)
    write_atomic(work / MERGE_CONFIG_FILE, yaml.safe_dump(pinned.as_dict(), sort_keys=False).encode())
    dropped += tokenizer_dropped
    weight_map = {t.output.name: shard.file_name for shard in shards for t in shard.tensors}
    metadata: dict[str, object] = {"total_size": sum(shard.nbytes for shard in shards)}
    if dropped:
        metadata[DROPPED_KEY] = dropped
    write_json_atomic(work / INDEX_FILE, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Swap the finished directory in; a previous result is removed only after the new one has its name."""
    fsync_dir(work)
    if out_dir.exists():
        previous = out_dir.parent / f".{out_dir.name}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(out_dir, previous)
        os.rename(work, out_dir)
        fsync_dir(out_dir.parent)
        shutil.rmtree(previous)
    else:
        os.rename(work, out_dir)
        fsync_dir(out_dir.parent)
