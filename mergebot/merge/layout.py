"""Where a checkpoint's layers are, and which output tensor each layer tensor of a merge becomes.

A stack is the tensors named PREFIX.N.SUFFIX for N = 0 .. depth-1, as a ModuleList saves them (`model.layers.`,
`transformer.h.`, `gpt_neox.layers.`, `vision_tower.encoder.layers.`); the first number in a name decides, so the
experts numbered inside a layer stay in their layer. The decoder is the stack as deep as config.json says
(`num_hidden_layers`, `n_layer`, ..., under `text_config` for a vision-language model) that sits nearest the token
embeddings; any other stack (a vision tower's layers) is merged layer by layer over its own depth.

This is read from config.json and the tensor names, not from the model transformers builds on the meta device:
that build (import and construction, about 2.5 s) would double a small `mergebot merge`, its module names differ
from the checkpoint's tensor names wherever transformers converts weights on load (vision-language models, MoE
experts), and it cannot describe an architecture newer than the installed transformers.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

from mergebot.config.merge import MergeConfig, SliceSource
from mergebot.errors import ConfigError, ModelError
from mergebot.merge.source import InputModel

NUMBERED = re.compile(r"^(?P<prefix>(?:[^.]+\.)+?)(?P<index>0|[1-9]\d*)(?P<suffix>\..+)$")
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
"""What decoder configs call their layer count: the names transformers' config classes map num_hidden_layers to."""
TEXT_SECTIONS = ("text_config", "language_config", "llm_config")
"""Where a multimodal config keeps its language model's settings."""
PER_LAYER_KEYS = ("layer_types",)
"""config.json lists with one entry per decoder layer (transformers refuses one whose length is not the depth)."""


@dataclass(frozen=True)
class Stack:
    prefix: str
    depth: int

    def name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}{index}{suffix}"


@dataclass(frozen=True)
class Layout:
    """One checkpoint's layers."""

    decoder: Stack | None
    others: tuple[Stack, ...]
    """Stacks besides the decoder, e.g. a vision tower's layers."""
    depth_key: tuple[str, ...] | None
    """The path in config.json of the decoder's layer count, e.g. ("text_config", "num_hidden_layers")."""
    loose: tuple[str, ...]
    """The tensors in no stack (embeddings, final norm, lm_head, projectors), sorted."""
    suffixes: Mapping[tuple[str, int], tuple[str, ...]]
    """(stack prefix, layer index) → the sorted name suffixes of that layer's tensors (layers may differ)."""

    @property
    def depth(self) -> int:
        return self.decoder.depth if self.decoder else 0

    def layer(self, stack: Stack, index: int) -> tuple[str, ...]:
        return self.suffixes[(stack.prefix, index)]


@dataclass(frozen=True)
class LayerTensor:
    """One output tensor of a layer; each source's input is prefix + (its layer_range[0] + offset) + suffix."""

    output: str
    prefix: str
    suffix: str
    sources: tuple[SliceSource, ...]
    t: float
    offset: int


@dataclass(frozen=True)
class OutputLayers:
    """The output's decoder layers: the config.json key that counts them, and where each one came from."""

    depth_key: tuple[str, ...] | None
    sources: tuple[tuple[str, int], ...]
    """(model, its layer index) of each output layer, in order."""


def find_layout(model: InputModel) -> Layout:
    """The stacks of `model` and which one is its decoder; raises when config.json's depth fits none of them."""
    groups: dict[str, dict[int, list[str]]] = {}
    sizes: dict[str, int] = {}
    loose = []
    for name, info in model.tensors.items():
        if match := NUMBERED.match(name):
            groups.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(match["suffix"])
            sizes[match["prefix"]] = sizes.get(match["prefix"], 0) + prod(info.shape)
        else:
            loose.append(name)
    stacks = []
    for prefix, layers in groups.items():
        if set(layers) == set(range(len(layers))):
            stacks.append(Stack(prefix, len(layers)))
        else:  # numbered but not 0..n-1 (e.g. an nn.Sequential of linear, activation, linear): plain tensors
            loose.extend(f"{prefix}{index}{suffix}" for index, suffixes in layers.items() for suffix in suffixes)
    depth_key, depth = _depth_setting(model.config)
    candidates = [s for s in stacks if depth is None or s.depth == depth]
    if depth and not candidates:
        found = ", ".join(f"{s.prefix}N ({s.depth})" for s in sorted(stacks, key=lambda s: s.prefix)) or "none"
        raise ModelError(
            f"model {model.label}: config.json {'.'.join(depth_key or ())} is {depth}, but no stack of numbered "
            f"layers in its tensors has {depth} layers (stacks: {found})"
        )
    vocab_names = _vocab_tensor_names(model, depth_key)
    decoder = max(
        candidates,
        key=lambda s: (max((_shared_parts(s.prefix, n) for n in vocab_names), default=0), sizes[s.prefix], s.prefix),
        default=None,
    )
    return Layout(
        decoder=decoder,
        others=tuple(sorted((s for s in stacks if s != decoder), key=lambda s: s.prefix)),
        depth_key=depth_key,
        loose=tuple(sorted(loose)),
        suffixes={
            (stack.prefix, index): tuple(sorted(suffixes))
            for stack in stacks
            for index, suffixes in groups[stack.prefix].items()
        },
    )


def whole_model_slice(config: MergeConfig, layout: Layout, uses_base: bool) -> tuple[SliceSource, ...]:
    """What a `models:` config means: every model (the base first when it is not listed) over all its layers."""
    participants = list(config.listed)
    if uses_base and config.base_model not in participants:
        participants.insert(0, config.base_model)
    return tuple(SliceSource(name, (0, layout.depth), config.spec(name).parameters) for name in participants)


def layer_tensors(
    config: MergeConfig,
    layouts: Mapping[str, Layout],
    template: str,
    slices: tuple[tuple[SliceSource, ...], ...],
) -> tuple[list[LayerTensor], OutputLayers]:
    """Every layer tensor of the output in order: the other stacks' layers (a models: config only), then the decoder
    layers the slices stack up, renumbered from 0; with t = layer / (layers − 1) within each stack or slice."""
    layout = layouts[template]
    if config.slices is not None and layout.others:
        stacks = ", ".join(f"{s.prefix}N" for s in layout.others)
        raise ConfigError(
            f"{config.source}: slices: {template} has layer stacks besides its decoder {_prefix(layout)}N ({stacks}, "
            "e.g. a vision tower); slices select the layers of single-stack models only: use models instead"
        )
    tensors = [
        LayerTensor(stack.name(index, suffix), stack.prefix, suffix, slices[0], _t(index, stack.depth), index)
        for stack in layout.others
        for index in range(stack.depth)
        for suffix in layout.layer(stack, index)
    ]
    placed: list[tuple[str, int]] = []
    for sources in slices:
        _check_sources(config, layouts, template, sources)
        first, end = sources[0].layer_range
        source = layouts[sources[0].model]
        for offset in range(end - first):
            stack = source.decoder  # a range within its depth: _check_sources saw to that
            t = _t(offset, end - first)
            for suffix in source.layer(stack, first + offset):
                tensors.append(LayerTensor(stack.name(len(placed), suffix), stack.prefix, suffix, sources, t, offset))
            placed.append((sources[0].model, first + offset))
    return tensors, OutputLayers(layout.depth_key, tuple(placed))


def with_layer_count(config: dict[str, Any], layers: OutputLayers, configs: Mapping[str, Mapping]) -> dict[str, Any]:
    """The output's config.json: its decoder's layer count under the template's own key, and each per-layer
    setting (layer_types) taken from the source layer each output layer came from."""
    if layers.depth_key is None:
        return config
    *path, key = layers.depth_key
    result = dict(config)
    table = result
    for name in path:
        table[name] = dict(table[name])
        table = table[name]
    table[key] = len(layers.sources)
    for setting in PER_LAYER_KEYS:
        if not isinstance(table.get(setting), list):
            continue
        picked = []
        for model, index in layers.sources:
            values = _section(configs[model], path).get(setting)
            picked.append(values[index] if isinstance(values, list) and index < len(values) else None)
        if None not in picked:
            table[setting] = picked
    return result


def _check_sources(
    config: MergeConfig, layouts: Mapping[str, Layout], template: str, sources: tuple[SliceSource, ...]
) -> None:
    """Each source's decoder has the template's names and at least the layers its range asks for."""
    expected = _prefix(layouts[template])
    for source in sources:
        layout = layouts[source.model]
        if layout.decoder and _prefix(layout) != expected:
            raise ModelError(
                f"model {source.model}: its layers are named {_prefix(layout)}N, not {expected}N as in {template}"
            )
        if source.layer_range[1] <= layout.depth:
            continue
        if config.slices is None:
            raise ModelError(
                f"model {source.model} has {layout.depth} layers where {template} has {source.layer_range[1]}"
            )
        raise ConfigError(
            f"{config.source}: slices: layer_range {list(source.layer_range)} of {source.model} goes past its "
            f"{layout.depth} layers"
        )


def _depth_setting(config: Mapping[str, Any]) -> tuple[tuple[str, ...] | None, int | None]:
    """The key path and value of the decoder's layer count: in the text section of a multimodal config, else at the
    top level."""
    for path in [(s,) for s in TEXT_SECTIONS if isinstance(config.get(s), dict)] + [()]:
        table = _section(config, path)
        for key in DEPTH_KEYS:
            value = table.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return (*path, key), value
    return None, None


def _section(config: Mapping[str, Any], path: list[str] | tuple[str, ...]) -> Mapping[str, Any]:
    for name in path:
        config = config.get(name) or {}
    return config


def _vocab_tensor_names(model: InputModel, depth_key: tuple[str, ...] | None) -> list[str]:
    """Tensors with one row per token of the language model's vocabulary (its embeddings and lm_head)."""
    vocab = _section(model.config, (depth_key or ())[:-1]).get("vocab_size") or model.config.get("vocab_size")
    return [name for name, info in model.tensors.items() if len(info.shape) == 2 and info.shape[0] == vocab]


def _shared_parts(prefix: str, name: str) -> int:
    """How many leading dotted parts of a tensor name lie in the same module as the stack."""
    count = 0
    for a, b in zip(prefix.split(".")[:-2], name.split("."), strict=False):
        if a != b:
            break
        count += 1
    return count


def _prefix(layout: Layout) -> str:
    return layout.decoder.prefix if layout.decoder else ""


def _t(index: int, depth: int) -> float:
    return index / (depth - 1) if depth > 1 else 1.0
