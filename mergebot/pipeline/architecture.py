"""Which transformers class a checkpoint is built with, and how its tensor names become that class's parameter
names.

A vision-language model (LLaVA, Qwen2-VL) is not a causal LM to transformers: `AutoModelForCausalLM` refuses its
config, so it is built with its image-text class. Such checkpoints are saved under older names (LLaVA's
`language_model.model.*`, Qwen2-VL's `model.*`) than the loaded model's (`model.language_model.*`); transformers
renames them while loading, and the gate's tensor check must rename them the same way, with transformers' own
mapping, or every tensor would look both missing and extra.
"""

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
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
