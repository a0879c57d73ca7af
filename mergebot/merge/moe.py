"""Builds a mixture of experts from dense models, shard by shard, in bounded memory, resuming from finished shards.

The same machinery as a merge (`mergebot.merge.engine`): a hidden work directory, shards written by ShardWriter
under a temporary name, each carrying its fingerprint, reused when it matches. A shard's fingerprint covers exactly
the input tensors it holds (each by its file's sha256) and the scales applied to them; the router shard's covers the
base, the prompts and the gate mode, and the routers are computed only when that shard is not already finished.
"""

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from mergebot.config.merge import MergeConfig
from mergebot.config.moe import MoeConfig
from mergebot.errors import ConfigError
from mergebot.merge.checkpoint import FINGERPRINT_KEY
from mergebot.merge.engine import (
    BLOCK_ELEMENTS,
    MergeResult,
    build_output,
    write_model_files,
)
from mergebot.merge.io import ShardWriter, TensorReader
from mergebot.merge.moe_config import moe_model_config
from mergebot.merge.moe_layout import MoeLayout, MoeShard, MoeTensor, Piece, plan_moe
from mergebot.merge.moe_router import (
    ROUTERS,
    SEED,
    RouterFunction,
    RouterInputs,
    router_fingerprint,
    router_weights,
)
from mergebot.merge.source import InputModel
from mergebot.merge.tokenizer_files import write_tokenizer_files
from mergebot.progress import ShardProgress

FORMAT_VERSION = 1


def run_moe(
    config: MoeConfig,
    models: dict[str, InputModel],
    out_dir: Path,
    progress: ShardProgress | None = None,
    routers: Mapping[str, RouterFunction] = ROUTERS,
) -> MergeResult:
    """Build the MoE into OUT_DIR; shards already finished (here or in a killed run) with the same fingerprint are
    kept. `routers` computes the gate modes: those needing the base model run come from the pipeline."""
    layout = plan_moe(config, models)
    if config.gate_mode not in routers:
        raise ConfigError(f"{config.source}: gate_mode: {config.gate_mode} is not computed by this mergebot")
    base = models[config.base_model]
    inputs = RouterInputs(base, config.gated, layout.layers, layout.hidden)
    router = _Routers(config.gate_mode, inputs, routers)
    progress = progress or ShardProgress(enabled_bar=False)
    return build_output(
        out_dir,
        layout.shards,
        lambda shard: shard_fingerprint(config, shard, models, lambda: router.fingerprint),
        lambda shard, reader, target, fingerprint: _write_shard(
            config, shard, models, router, reader, target, fingerprint, progress
        ),
        lambda work: _write_metadata(config, layout, models, work),
        progress,
    )


class _Routers:
    """The router weights, computed on first use only (a finished router shard needs none)."""

    def __init__(self, mode: str, inputs: RouterInputs, routers: Mapping[str, RouterFunction]):
        self.mode = mode
        self.inputs = inputs
        self._routers = routers
        self.fingerprint = router_fingerprint(mode, inputs)
        self._weights: dict[int, np.ndarray] | None = None

    def rows(self, layer: int, first: int, count: int) -> np.ndarray:
        if self._weights is None:
            self._weights = router_weights(self.mode, self.inputs, self._routers)
        return self._weights[layer][first : first + count]


def shard_fingerprint(
    config: MoeConfig, shard: MoeShard, models: dict[str, InputModel], router: Callable[[], str]
) -> str:
    """hash(per output tensor: name, dtype, shape; per piece: the input tensor, its file's sha256 and the expert's
    noise and residual scale; for a router: the routers' fingerprint)."""
    everyone = config.experts + config.shared_experts
    tensors = []
    for tensor in shard.tensors:
        pieces = []
        for piece in tensor.pieces:
            model = models[piece.model]
            entry: dict[str, object] = {"tensor": piece.tensor, "sha256": model.sha256_of(model.tensors[piece.tensor])}
            if piece.expert is not None:
                expert = everyone[piece.expert]
                entry |= {"noise": expert.noise_scale, "seed": _noise_seed(piece) if expert.noise_scale else None}
                entry["scale"] = expert.residual_scale if piece.residual else None
            pieces.append(entry)
        entry = {"name": tensor.output.name, "dtype": tensor.output.dtype.name, "shape": list(tensor.output.shape)}
        tensors.append(entry | {"pieces": pieces, "router": router() if tensor.router else None})
    document = {"format": FORMAT_VERSION, "kind": "moe", "shard": shard.file_name, "tensors": tensors}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _write_shard(
    config: MoeConfig,
    shard: MoeShard,
    models: dict[str, InputModel],
    routers: _Routers,
    reader: TensorReader,
    target: Path,
    fingerprint: str,
    progress: ShardProgress,
) -> None:
    writer = ShardWriter(target, [t.output for t in shard.tensors], {"format": "pt", FINGERPRINT_KEY: fingerprint})
    try:
        for tensor in shard.tensors:
            writer.begin(tensor.output.name)
            for block in _blocks(config, tensor, models, routers, reader):
                if isinstance(block, np.ndarray):
                    writer.write_bits(block)
                    progress.advance(block.nbytes)
                else:
                    writer.write(block)
                    progress.advance(block.numel() * tensor.output.dtype.itemsize)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def _blocks(
    config: MoeConfig, tensor: MoeTensor, models: dict[str, InputModel], routers: _Routers, reader: TensorReader
) -> Iterator[torch.Tensor | np.ndarray]:
    """The output tensor's values in row blocks: its pieces one after another, a router's rows, or zeros; float32
    blocks, or a piece's raw bytes where it is copied as it is (its dtype the output's, nothing added or scaled)."""
    if tensor.router is not None:
        yield torch.from_numpy(np.ascontiguousarray(routers.rows(*tensor.router)))
        return
    if not tensor.pieces:
        yield torch.zeros(tensor.output.shape, dtype=torch.float32)
        return
    everyone = config.experts + config.shared_experts
    for piece in tensor.pieces:
        info = models[piece.model].tensors[piece.tensor]
        expert = everyone[piece.expert] if piece.expert is not None else None
        noise = expert.noise_scale if expert else None
        scale = expert.residual_scale if expert and piece.residual else None
        generator = np.random.Generator(np.random.PCG64([SEED, _noise_seed(piece)])) if noise else None
        row_elements = max(1, info.nbytes // info.dtype.itemsize // max(1, info.rows))
        step = max(1, BLOCK_ELEMENTS // row_elements)
        if info.dtype == tensor.output.dtype and info.lora is None and not noise and scale is None:
            for start in range(0, info.rows, step):
                stop = min(start + step, info.rows)
                raw = np.empty((stop - start) * info.row_bytes, np.uint8)
                reader.raw_rows(info, start, stop, raw)
                yield raw
            continue
        for start in range(0, info.rows, step):
            block = reader.rows(info, start, min(start + step, info.rows))
            if generator is not None:
                drawn = generator.standard_normal(tuple(block.shape), dtype=np.float32) * np.float32(noise)
                block += torch.from_numpy(drawn)
            if scale is not None:
                block *= scale
            yield block


def _noise_seed(piece: Piece) -> int:
    """A noise stream of its own per expert and tensor, the same in every run."""
    return int.from_bytes(hashlib.sha256(f"{piece.expert}:{piece.tensor}".encode()).digest()[:8], "little")


def _write_metadata(config: MoeConfig, layout: MoeLayout, models: dict[str, InputModel], work: Path) -> None:
    """config.json, and the base's generation config and tokenizer files (with the rest `write_model_files` writes)."""
    base = models[config.base_model]
    model_config = moe_model_config(layout.architecture, config, base, layout.dtype)
    pinned = config.pinned({name: model.pins for name, model in models.items()})
    tokenizer = MergeConfig("passthrough", (config.spec(config.base_model),), tokenizer_source=config.base_model)
    tokenizer_dropped = write_tokenizer_files(tokenizer, None, {config.base_model: base}, work)
    write_model_files(work, layout.shards, model_config, base, pinned, tokenizer_dropped)
