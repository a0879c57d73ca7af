"""The model families mergebot writes as GGUF, and what each needs beyond the gguf package's tensor-name maps: the
hyperparameters llama.cpp reads, and the changes to tensor values its converter makes (facts from llama.cpp's
convert_hf_to_gguf.py): Llama and Mistral store q/k rows permuted for llama.cpp's rotary layout; Gemma stores its
RMS norm weights plus one and shares its output with the embeddings.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from mergebot.errors import GgufError, GgufUnsupportedError


@dataclass(frozen=True)
class Family:
    """How one transformers architecture becomes a GGUF model."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    """q/k projections (weights and biases) permuted per head, as llama.cpp's llama graph expects."""
    norm_plus_one: bool = False
    """Gemma's RMS norm multiplies by (1 + w); llama.cpp's by the stored weight, so w + 1 is stored."""
    tied_output: bool = False
    """The output projection is always the embedding: an lm_head tensor is left out."""
    extra: Callable[[dict, gguf.GGUFWriter], None] | None = None
    """Hyperparameters of this family beyond the common ones."""

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _gemma2(config: dict, writer: gguf.GGUFWriter) -> None:
    """Soft-capping and the sliding window; llama.cpp scales queries by 1/sqrt(head_dim), so a config scaling by
    another `query_pre_attn_scalar` is refused rather than written to compute otherwise."""
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and scalar != shape_of(config).head_dim:
        raise GgufUnsupportedError(
            f"config.json: no GGUF for Gemma 2 with query_pre_attn_scalar {str(scalar)[:20]} (llama.cpp uses head_dim)"
        )
    for key, add in (
        ("attn_logit_softcapping", writer.add_attn_logit_softcapping),
        ("final_logit_softcapping", writer.add_final_logit_softcapping),
    ):
        if config.get(key) is not None:
            add(_number(config, key))
    if config.get("sliding_window") is not None:
        writer.add_sliding_window(_positive(config, "sliding_window"))


FAMILIES = {
    "LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Family(gguf.MODEL_ARCH.QWEN3),
    "GemmaForCausalLM": Family(gguf.MODEL_ARCH.GEMMA, norm_plus_one=True, tied_output=True),
    "Gemma2ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True, tied_output=True, extra=_gemma2),
}
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some checkpoints save that llama.cpp computes itself."""


def family_of(config: dict, where: str) -> Family:
    """The family of a config.json, refused in one line naming the architecture when mergebot does not convert it."""
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1 and isinstance(architectures[0], str)):
        raise GgufUnsupportedError(f"{where}: config.json names no single architecture; no GGUF is written")
    family = FAMILIES.get(architectures[0])
    if family is None:
        shown = architectures[0][:80]
        raise GgufUnsupportedError(
            f"{where}: no GGUF for architecture {shown} (mergebot converts {', '.join(sorted(FAMILIES))})"
        )
    return family


@dataclass(frozen=True)
class Shape:
    """The attention shape the tensor changes need, read once from config.json."""

    heads: int
    kv_heads: int
    head_dim: int


def shape_of(config: dict) -> Shape:
    heads = _positive(config, "num_attention_heads")
    kv_heads = _positive(config, "num_key_value_heads") if config.get("num_key_value_heads") is not None else heads
    hidden = _positive(config, "hidden_size")
    head_dim = _positive(config, "head_dim") if config.get("head_dim") is not None else hidden // heads
    if heads % kv_heads or head_dim % 2:
        raise GgufError(f"config.json: {heads} heads, {kv_heads} kv heads, head_dim {head_dim} do not fit together")
    return Shape(heads, kv_heads, head_dim)


def add_hyperparameters(family: Family, config: dict, vocab_size: int, writer: gguf.GGUFWriter) -> None:
    """What llama.cpp reads of the architecture: sizes, heads, norm epsilon, rotary base and scaling."""
    shape = shape_of(config)
    writer.add_context_length(_positive(config, "max_position_embeddings"))
    writer.add_embedding_length(_positive(config, "hidden_size"))
    writer.add_block_count(_positive(config, "num_hidden_layers"))
    writer.add_feed_forward_length(_positive(config, "intermediate_size"))
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_layer_norm_rms_eps(_number(config, "rms_norm_eps"))
    writer.add_vocab_size(vocab_size)
    rope = rope_of(config)
    writer.add_rope_freq_base(_number(rope, "rope_theta") if "rope_theta" in rope else 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(_number(rope, "factor"))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(_number(rope, "factor"))
        writer.add_rope_scaling_orig_ctx_len(_positive(rope, "original_max_position_embeddings"))
    elif kind == "llama3" and family.arch == gguf.MODEL_ARCH.LLAMA:
        pass  # carried by the rope_freqs tensor (llama3_rope_factors)
    elif kind not in ("default", None):
        raise GgufUnsupportedError(f"config.json: no GGUF for rotary scaling {str(kind)[:40]!r} in {family.name}")
    if family.extra is not None:
        family.extra(config, writer)


def rope_of(config: dict) -> dict:
    """The rotary settings wherever the config keeps them: transformers 5's `rope_parameters`, or the older
    top-level `rope_theta` with `rope_scaling`."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        return rope
    merged = dict(config.get("rope_scaling") or {})
    if "rope_theta" in config:
        merged["rope_theta"] = config["rope_theta"]
    return merged


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Llama 3.1's frequency-dependent rotary scaling as the per-frequency divisors llama.cpp reads from its
    `rope_freqs` tensor, or None when the config has no such scaling."""
    rope = rope_of(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base = _number(rope, "rope_theta") if "rope_theta" in rope else 10000.0
    dim = shape_of(config).head_dim
    factor, low, high = (_number(rope, key) for key in ("factor", "low_freq_factor", "high_freq_factor"))
    old_context = _positive(rope, "original_max_position_embeddings")
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def permute_rows(block: np.ndarray, head_dim: int) -> np.ndarray:
    """q/k rows of whole heads reordered as llama.cpp's converter does: within each head, the two halves of the
    rotary pairs interleaved (rows i and i + head_dim/2 become neighbours)."""
    heads = block.shape[0] // head_dim
    return block.reshape(heads, 2, head_dim // 2, *block.shape[1:]).swapaxes(1, 2).reshape(block.shape)


def _number(config: dict, key: str) -> float:
    value = config.get(key)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise GgufError(f"config.json: {key} is {str(value)[:40]!r}, not a finite number")
    return float(value)


def _positive(config: dict, key: str) -> int:
    value = config.get(key)
    if type(value) is not int or value <= 0 or value >= 1 << 31:
        raise GgufError(f"config.json: {key} is {str(value)[:40]!r}, not a positive integer")
    return value
