"""Which of mergekit's modules each tensor belongs to, for a merge written with `modules:`.

mergekit 0.1.5 names the modules of an architecture in its definitions: a model of one stack of layers has one
module, `default`; Qwen2-VL and Qwen2.5-VL have `text_decoder` (model.*, lm_head), `vision_tower` (visual.blocks,
visual.patch_embed) and `multi_modal_projector` (visual.merger). mergebot maps those; a module name it cannot map
to tensor names (another architecture's modules, a typo) is refused with the line that names it, as is a merge that
leaves a module out (mergekit would write none of its tensors, which is no model).
"""

from collections.abc import Callable

from mergebot.config.document import did_you_mean
from mergebot.config.merge import MergeConfig
from mergebot.config.modules import ModuleSettings
from mergebot.errors import ConfigError, ModelError
from mergebot.merge.layout import Layout
from mergebot.merge.source import InputModel

DEFAULT = "default"
_QWEN_VL = {
    "text_decoder": ("model.", "lm_head."),
    "vision_tower": ("visual.patch_embed.", "visual.blocks."),
    "multi_modal_projector": ("visual.merger.",),
}
MODULE_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,
}
"""architecture → module → the tensor name prefixes of its tensors, as mergekit's definitions name them."""
UNNUMBERED = {"multi_modal_projector"}
"""Modules whose tensors mergekit numbers as layers (t = layer / (layers − 1)) where mergebot sees no stack and
takes t = 0: a gradient there would differ from mergekit's, so it is refused."""


def module_of(config: MergeConfig, template: InputModel, layout: Layout) -> Callable[[str], ModuleSettings] | None:
    """tensor name → the settings of its module; None for a merge written without modules."""
    if not config.modules:
        return None
    architecture = str((template.config.get("architectures") or ["?"])[0])
    first = next(iter(config.modules.values()))
    prefixes = MODULE_PREFIXES.get(architecture)
    if prefixes is None and layout.others:
        raise ConfigError(
            f"{first.where}: mergebot cannot map mergekit's modules of {architecture} ({template.label}) to its "
            "tensors; write the merge with models instead"
        )
    prefixes = prefixes or {DEFAULT: ("",)}
    for name, module in config.modules.items():
        if name not in prefixes:
            raise ConfigError(
                f"{module.where}: {architecture} has no module {name!r}{did_you_mean(name, prefixes)} "
                f"(its modules: {', '.join(sorted(prefixes))})"
            )
    missing = sorted(set(prefixes) - set(config.modules))
    if missing:
        raise ConfigError(
            f"{first.where}: the merge leaves out module(s) {', '.join(missing)} of {architecture}, whose tensors "
            "mergekit would not write; give every module"
        )
    for name in UNNUMBERED & set(config.modules):
        module = config.modules[name]
        settings = [{**config.parameters, **module.parameters}, *module.model_parameters.values()]
        graded = sorted(key for values in settings for key, value in values.items() if _is_gradient(value))
        if graded:
            raise ConfigError(
                f"{module.where}: {graded[0]} is a list, interpolated by mergekit over {name}'s own layers, which "
                "mergebot does not number; give this module a single value"
            )
    ordered = sorted(((p, name) for name, names in prefixes.items() for p in names), key=lambda item: -len(item[0]))

    def settings(tensor: str) -> ModuleSettings:
        name = next((name for prefix, name in ordered if tensor.startswith(prefix)), None)
        if name is None:
            raise ModelError(f"model {template.label}: tensor {tensor} is in none of {architecture}'s modules")
        return config.modules[name]

    return settings


def _is_gradient(setting: object) -> bool:
    """A list of numbers, or a condition whose value is one."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and any(isinstance(item, dict) for item in setting):
        return any(isinstance(item, dict) and _is_gradient(item.get("value")) for item in setting)
    return isinstance(setting, list)
