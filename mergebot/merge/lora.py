"""mergekit's `model+lora` inputs: a PEFT LoRA adapter applied to its base's weights while merging, never as a
model of its own. Each weight W the adapter targets reads as W + scale · B @ A, one row block at a time, in float32
(the rows of B @ A that the block needs), with scale = lora_alpha / r, or lora_alpha / √r for rsLoRA (`use_rslora`),
`alpha_pattern` overriding lora_alpha per module as in PEFT, r the rank of the module's A.

Weights the adapter saves whole (`modules_to_save`) replace the base's tensor of the same name and shape. Anything
else an adapter can hold (DoRA, biases, embedding LoRA, ...) changes the result in ways this does not compute, so
such an adapter is refused, naming it, rather than merged without its effect.
"""

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from mergebot.errors import ModelError
from mergebot.files import ADAPTER_CONFIG, PICKLE_SUFFIXES, read_json
from mergebot.merge.io import TensorInfo, TensorReader, read_header
from mergebot.merge.source import AdapterSource, InputModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""PEFT saves each tensor under the wrapped model's module name, behind this prefix."""
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trained token rows (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens), which acts only after its invocation tokens",
    "arrow_config": "Arrow routing (arrow_config)",
}
"""adapter_config.json settings that, when set, make the adapter something other than W + scale · B @ A."""


@dataclass(frozen=True)
class LoraDelta:
    """scale · B @ A for one weight of shape (out, in): B is (out, r), A is (r, in)."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    """A and B live in one file, the adapter's."""

    def rows(self, reader: TensorReader, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the update, in float32."""
        return self.scale * (reader.rows(self.b, start, stop) @ reader.rows(self.a, 0, self.a.rows))


def apply_lora(model: InputModel, adapter: AdapterSource) -> InputModel:
    """`model` as it reads with the adapter in `adapter.path` applied; refuses an adapter it cannot apply exactly."""
    label = f"adapter {adapter.label}"
    if not (adapter.path / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{label}: no {ADAPTER_CONFIG} in {adapter.path} (mergebot applies PEFT LoRA adapters)")
    settings = read_json(adapter.path / ADAPTER_CONFIG, adapter.label, required=True)
    _check_supported(settings, label)
    weights = adapter.path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in adapter.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle weights ({', '.join(pickles)}); mergebot reads safetensors only" if pickles else None
        raise ModelError(f"{label}: {found or f'no {ADAPTER_WEIGHTS} in {adapter.path}'}")
    pairs: dict[str, dict[str, TensorInfo]] = {}
    tensors = dict(model.tensors)
    for key, info in read_header(weights)[0].items():
        name = key.removeprefix(PEFT_PREFIX)
        module, lora, part = name.rpartition(".lora_")
        if lora and part in ("A.weight", "B.weight"):
            pairs.setdefault(module, {})[part[0]] = info
        elif lora or not _saved_whole(name, settings):
            raise ModelError(
                f"{label}: tensor {key} is not a LoRA A/B weight or one of modules_to_save (not supported)"
            )
        else:
            tensors[_target(model, label, name, info.shape)] = info
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise ModelError(f"{label}: {module} has lora_{next(iter(parts))} but not its pair")
        target = _target(model, label, f"{module}.weight")
        tensors[target] = replace(
            tensors[target], lora=_delta(tensors[target], parts["A"], parts["B"], settings, label)
        )
    return replace(model, tensors=tensors, adapter=adapter)


def adapted_tensors(model: InputModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model that its adapter changes, whole, in float32 (for loading the model as merged)."""
    with TensorReader() as reader:
        for name, info in model.tensors.items():
            if info.lora is not None or info.file.name == ADAPTER_WEIGHTS:
                yield name, reader.rows(info, 0, info.rows).reshape(info.shape)


def _check_supported(settings: dict[str, Any], label: str) -> None:
    peft_type = str(settings.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ModelError(f"{label}: a {peft_type} adapter; mergebot applies LoRA adapters only")
    problems = [what for key, what in UNSUPPORTED.items() if settings.get(key)]
    if settings.get("bias", "none") != "none":
        problems.append(f"trained biases (bias = {settings['bias']!r})")
    if problems:
        raise ModelError(
            f"{label}: {problems[0]} is not supported; merge the adapter into its base with peft's merge_and_unload "
            "and name that model instead"
        )
    if not _is_number(settings.get("lora_alpha")):
        raise ModelError(f"{label}: {ADAPTER_CONFIG} has no numeric lora_alpha")


def _saved_whole(name: str, settings: dict[str, Any]) -> bool:
    """A tensor of a module the adapter saves whole (`modules_to_save`, matched on the end of the module name)."""
    module = name.rpartition(".")[0]
    return any(module == saved or module.endswith(f".{saved}") for saved in settings.get("modules_to_save") or [])


def _target(model: InputModel, label: str, name: str, shape: tuple[int, ...] | None = None) -> str:
    """The checkpoint tensor `name` stands for, which must exist (with `shape`, for a tensor saved whole)."""
    info = model.tensors.get(name)
    if info is None:
        raise ModelError(f"{label}: it changes {name}, which model {model.label} does not have")
    if shape is not None and info.shape != shape:
        raise ModelError(
            f"{label}: its {name} has shape {list(shape)}, model {model.label}'s {list(info.shape)} (not supported)"
        )
    return name


def _delta(weight: TensorInfo, a: TensorInfo, b: TensorInfo, settings: dict[str, Any], label: str) -> LoraDelta:
    module = weight.name.removesuffix(".weight")
    if not all(t.dtype.floating for t in (a, b)) or len(weight.shape) != 2:
        raise ModelError(f"{label}: {module} is not a floating-point linear weight with floating-point A and B")
    rank = a.shape[0] if len(a.shape) == 2 else 0
    if rank == 0 or a.shape != (rank, weight.shape[1]) or b.shape != (weight.shape[0], rank):
        raise ModelError(
            f"{label}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit its weight "
            f"{list(weight.shape)}"
        )
    alpha = settings["lora_alpha"]
    for pattern, value in (settings.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    scale = float(alpha) / (math.sqrt(rank) if settings.get("use_rslora") else rank)
    return LoraDelta(a, b, scale)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
