"""Which transformers class a checkpoint is built with, and how its tensor names become that class's parameter
names.

A vision-language model (LLaVA, Qwen2-VL) is not a causal LM to transformers: `AutoModelForCausalLM` refuses its
config, so it is built with its image-text class. Such checkpoints are saved under older names (LLaVA's
`language_model.model.*`, Qwen2-VL's `model.*`) than the loaded model's (`model.language_model.*`); transformers
renames them while loading, and the gate's tensor check must rename them the same way, with transformers' own
mapping, or every tensor would look both missing and extra.
"""

import re
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def model_class(config: PretrainedConfig) -> type:
    """The image-text auto class for a config only it knows, the causal-LM one otherwise (whose error then says
    why an unknown architecture cannot be built)."""
    kind = type(config)
    image_text = kind not in MODEL_FOR_CAUSAL_LM_MAPPING and kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    return AutoModelForImageTextToText if image_text else AutoModelForCausalLM


def build_on_meta(config: PretrainedConfig) -> torch.nn.Module:
    """The architecture `config` describes, with no memory behind its parameters (no remote code)."""
    with torch.device("meta"):
        return model_class(config).from_config(config)


def parameter_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Each checkpoint tensor name → the parameter name `model` loads it into, by transformers' renamings (as
    `from_pretrained` applies them, base-model prefix included). Converters that fuse several tensors into one
    (MoE experts) are not applied: their tensors keep their names."""
    expected = model.state_dict(keep_vars=True)
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", None)
    mapped = {}
    for name in names:
        renamed = rename_source_key(name, renamings, [], prefix, expected)[0]
        if renamed not in expected and name in expected:  # as transformers does: a name already right stays
            renamed = name
        mapped[name] = renamed
    return mapped


@dataclass(frozen=True)
class Fused:
    """Checkpoint tensors that transformers fuses into one parameter while loading (an MoE's experts saved one by
    one, as mergekit-moe writes a Qwen MoE)."""

    parameter: str
    sources: tuple[str, ...]
    shape: tuple[int, ...] | None
    """The parameter's shape the sources make; None where they cannot make one (an expert missing, shapes that
    disagree) or an operation is not one whose shape is known here."""


def fused_parameters(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[Fused]:
    """The parameters of `model` that transformers' converters build from several checkpoint tensors (of
    `shapes`, by name): experts stacked (MergeModulelist), then gate and up concatenated (Concatenate)."""
    expected = model.state_dict(keep_vars=True)
    found = []
    renamed = _Renamed(model)
    for converter in get_model_conversion_mapping(model):
        if not isinstance(converter, WeightConverter) or len(converter.target_patterns) != 1:
            continue
        target = converter.target_patterns[0]
        if not all(_GLOB.fullmatch(p) for p in (*converter.source_patterns, target)):
            continue
        groups: dict[str, list[dict[int, tuple[int, ...]]]] = {}
        sources: dict[str, list[str]] = {}
        for position, pattern in enumerate(converter.source_patterns):
            regex = re.compile(r"(.*?)" + re.escape(pattern).replace(r"\*", r"(\d+)"))
            for name, shape in shapes.items():
                match = regex.fullmatch(name)
                if match and renamed(match.group(1) + target) in expected:
                    parts = groups.setdefault(match.group(1), [{} for _ in converter.source_patterns])
                    parts[position][int(match.group(2))] = shape
                    sources.setdefault(match.group(1), []).append(name)
        found += [
            Fused(renamed(prefix + target), tuple(sources[prefix]), _fused_shape(converter, parts))
            for prefix, parts in groups.items()
        ]
    return found


_GLOB = re.compile(r"[\w.*]+")


class _Renamed:
    """A checkpoint name → the parameter name transformers' renamings give it (Mixtral's `block_sparse_moe` is
    `mlp`), remembered."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.names: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if name not in self.names:
            self.names[name] = parameter_names(self.model, [name])[name]
        return self.names[name]


def _fused_shape(converter: WeightConverter, parts: list[dict[int, tuple[int, ...]]]) -> tuple[int, ...] | None:
    """Stack each source's experts (they must be 0..n-1, one shape), then concatenate the stacks."""
    operations = [type(op).__name__ for op in converter.operations]
    if operations not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]):
        return None
    if converter.operations[0].dim != 0:
        return None
    stacks = []
    for experts in parts:
        if sorted(experts) != list(range(len(experts))) or not experts or len(set(experts.values())) != 1:
            return None
        stacks.append((len(experts), *experts[0]))
    if len(stacks) == 1:
        return stacks[0]
    dim = converter.operations[1].dim
    if any(
        len(s) != len(stacks[0]) or s[:dim] + s[dim + 1 :] != stacks[0][:dim] + stacks[0][dim + 1 :] for s in stacks
    ):
        return None
    return (*stacks[0][:dim], sum(s[dim] for s in stacks), *stacks[0][dim + 1 :])
