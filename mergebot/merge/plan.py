"""The merge plan: which input tensors feed each output tensor, with what parameters, in which output shard.

Everything here is decided from names, shapes, dtypes and the config, never from tensor values, so an upstream
update that changes values keeps every output tensor in the same shard.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mergebot.config.merge import MergeConfig, SliceSource
from mergebot.config.methods import INTERFACES
from mergebot.config.modules import ModuleSettings
from mergebot.config.parameters import normalized
from mergebot.errors import ConfigError, ModelError
from mergebot.merge.io import BY_TORCH_NAME, OutputTensor, TensorInfo
from mergebot.merge.layout import OutputLayers, find_layout, layer_tensors, whole_model_slice
from mergebot.merge.methods import MergeMethod, TensorParams
from mergebot.merge.modules import module_of
from mergebot.merge.source import InputModel
from mergebot.merge.vocab import is_vocab_tensor
from mergebot.merge.vocab_plan import VocabPlan


@dataclass(frozen=True)
class InputRef:
    model: str
    tensor: str


@dataclass(frozen=True)
class TensorPlan:
    output: OutputTensor
    inputs: tuple[InputRef, ...]
    """The base model first when the method uses one."""
    params: TensorParams


@dataclass(frozen=True)
class ShardPlan:
    file_name: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.output.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    method: MergeMethod
    shards: tuple[ShardPlan, ...]
    row_maps: dict[tuple[str, int], np.ndarray | None]
    """(model, rows of its vocab tensor) → output row → its row or -1; None for the identity."""
    template: str
    """The model whose config.json and layout the output follows."""
    layers: OutputLayers
    vocab: VocabPlan

    def aligned_maps(self, tensor: TensorPlan, infos: list[TensorInfo]) -> list[np.ndarray | None] | None:
        """Each input's row map when the tensor's rows are to be aligned (`mergebot.merge.align`); None when its
        input rows are used as they are (not a vocabulary tensor, or nothing to align)."""
        if not is_vocab_tensor(tensor.output.name):
            return None
        maps = [self.row_map(tensor, ref.model, info) for ref, info in zip(tensor.inputs, infos, strict=True)]
        rows = tensor.output.shape[0]
        if all(m is None for m in maps) and not self.vocab.overrides and (self.vocab.token_rows or rows) >= rows:
            return None
        return maps

    def row_map(self, tensor: TensorPlan, model: str, info: TensorInfo) -> np.ndarray | None:
        """How the output rows of a vocabulary tensor map to this input's rows (None: the same rows)."""
        if not is_vocab_tensor(tensor.output.name):
            return None
        return self.row_maps.get((model, info.rows))


def evaluate_setting(tensor_name: str, setting: Any, t: float) -> Any:
    """One tensor's value of a parameter: a scalar as is, a number list interpolated at t, the first matching filter."""
    setting = normalized(setting)
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for condition in setting:
            pattern = condition.get("filter")
            if pattern in (None, "*") or pattern in tensor_name:
                return evaluate_setting(tensor_name, condition["value"], t)
        return None
    if isinstance(setting, list):
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    return setting


def build_plan(config: MergeConfig, models: dict[str, InputModel], method: MergeMethod) -> Plan:
    """Check that the models fit together and lay out every output tensor; raises before any tensor is read."""
    if method.name not in INTERFACES:  # a plug-in: the config knew only its name
        _check_parameter_names(config, method)
    if method.optional_base:
        method = replace(method, uses_base=bool(config.base_model))
    if method.uses_base and not config.base_model:
        raise ConfigError(f"{config.source}: base_model: required by merge_method {method.name}")
    template = config.base_model or (config.listed[0] if config.listed else config.slices[0][0].model)
    layouts = {name: find_layout(model) for name, model in models.items()}
    non_layer = layouts[template].loose
    slices = config.slices or (whole_model_slice(config, layouts[template], method.uses_base),)
    layer_plan, layers = layer_tensors(config, layouts, template, slices)
    builder = _Builder(config, models, method, template, module_of(config, models[template], layouts[template]))
    ordered: list[TensorPlan] = []
    first, last = slices[0], slices[-1]
    for name in (n for n in non_layer if "embed" in n):
        ordered.append(builder.tensor(name, name, first, t=0.0))
    for item in layer_plan:
        ordered.append(builder.tensor(item.output, (item.prefix, item.suffix), item.sources, item.t, item.offset))
    for name in (n for n in non_layer if "embed" not in n):
        ordered.append(builder.tensor(name, name, last, t=0.0))
    if config.slices is None:
        _check_no_extra_tensors(models, ordered, output_tied="lm_head.weight" not in non_layer)
    return Plan(method, _pack(ordered, config.out_shard_size), builder.row_maps, template, layers, builder.vocab)


def _check_parameter_names(config: MergeConfig, method: MergeMethod) -> None:
    """A plug-in method's parameters (mergebot's own: an unknown name is a mistake, not mergekit's to ignore)."""
    known = set(method.parameters) | set(method.model_parameters)
    for name in config.parameters:
        if name not in known:
            raise ConfigError(
                f"{config.source}: parameters.{name}: unknown parameter for {method.name} "
                f"(known: {', '.join(sorted(known)) or 'none'})"
            )
    sources = [(s.model, s.parameters) for sl in config.slices or () for s in sl] or [
        (m.model, m.parameters) for m in config.models
    ]
    for model, parameters in sources:
        for name in parameters:
            if name not in method.model_parameters:
                raise ConfigError(
                    f"{config.source}: {model}.parameters.{name}: unknown per-model parameter for {method.name} "
                    f"(known: {', '.join(sorted(method.model_parameters)) or 'none'})"
                )


class _Builder:
    """Resolves one output tensor at a time: its inputs, shapes, dtype and parameters."""

    def __init__(
        self,
        config: MergeConfig,
        models: dict[str, InputModel],
        method: MergeMethod,
        template: str,
        modules: Callable[[str], ModuleSettings] | None,
    ):
        self.config = config
        self.modules = modules
        self.models = models
        self.method = method
        self.template = template
        self.vocab = VocabPlan(config, models)
        self.row_maps = self.vocab.row_maps

    def tensor(
        self,
        output_name: str,
        name_or_suffix: str | tuple[str, str],
        sources: tuple[SliceSource, ...],
        t: float,
        layer_offset: int = 0,
    ) -> TensorPlan:
        ordered = list(sources)
        if self.method.uses_base:
            base = [s for s in ordered if s.model == self.config.base_model]
            if not base:
                raise ConfigError(
                    f"{self.config.source}: slices: the base model {self.config.base_model} must be a source "
                    f"of every slice for {self.method.name}"
                )
            ordered = base + [s for s in ordered if s.model != self.config.base_model]
        count = len(ordered) - (1 if self.method.uses_base else 0)
        if count < self.method.min_models or (self.method.max_models and count > self.method.max_models):
            wanted = self.method.max_models if self.method.max_models == self.method.min_models else None
            raise ConfigError(
                f"{self.config.source}: models: {self.method.name} needs "
                + (f"exactly {wanted}" if wanted else f"at least {self.method.min_models}")
                + f" model(s) besides the base, got {count}"
            )
        inputs = []
        for source in ordered:
            if isinstance(name_or_suffix, tuple):
                name = f"{name_or_suffix[0]}{source.layer_range[0] + layer_offset}{name_or_suffix[1]}"
            else:
                name = name_or_suffix
            inputs.append(InputRef(source.model, self._existing_name(source.model, name)))
        output = self._output(output_name, inputs)
        params = self._params(output_name, ordered, t)
        return TensorPlan(output, tuple(inputs), params)

    def _existing_name(self, model: str, name: str) -> str:
        tensors = self.models[model].tensors
        if name in tensors:
            return name
        if name == "lm_head.weight" and self.models[model].config.get("tie_word_embeddings", False):
            return "model.embed_tokens.weight"
        holder = next((m for m, im in self.models.items() if name in im.tensors), self.template)
        raise ModelError(f"model {model} lacks tensor {name} that {holder} has")

    def _output(self, output_name: str, inputs: list[InputRef]) -> OutputTensor:
        infos = [self.models[ref.model].tensors[ref.tensor] for ref in inputs]
        first = infos[0]
        vocab = is_vocab_tensor(output_name)
        for ref, info in zip(inputs[1:], infos[1:], strict=True):
            if vocab and info.shape[1:] == first.shape[1:]:
                continue
            if info.shape != first.shape:
                raise ModelError(
                    f"tensor {ref.tensor}: shape {list(info.shape)} in model {ref.model} does not match "
                    f"{list(first.shape)} in model {inputs[0].model}"
                )
        if not first.dtype.floating:
            raise ModelError(f"tensor {inputs[0].tensor} in model {inputs[0].model} is not floating point")
        shape = first.shape
        if vocab:
            rows = self._vocab_rows(output_name)
            shape = (rows, *first.shape[1:])
            sizes = [(ref.model, info.shape[0]) for ref, info in zip(inputs, infos, strict=True)]
            for model, model_rows in sizes:
                self.vocab.add_row_map(model, model_rows, rows)
            self.vocab.check_inputs(output_name, sizes)
        dtype = BY_TORCH_NAME[self.config.output_dtype] if self.config.output_dtype else first.dtype
        return OutputTensor(output_name, dtype, shape)

    def _vocab_rows(self, output_name: str) -> int:
        source = self.models[self.config.tokenizer_source]
        name = self._existing_name(self.config.tokenizer_source, output_name)
        return self.vocab.rows(source.tensors[name].shape[0])

    def _params(self, tensor_name: str, ordered: list[SliceSource], t: float) -> TensorParams:
        """mergekit's order: the model's own setting, then its module's, then the top-level one, then the default."""
        module = self.modules(tensor_name) if self.modules else None
        shared = {**self.config.parameters, **module.parameters} if module else self.config.parameters
        values = {}
        for name, default in self.method.parameters.items():
            value = evaluate_setting(tensor_name, shared.get(name), t)
            if value is None:
                value = default
            if value is None:
                raise ConfigError(f"{self.config.source}: parameters.{name}: required by {self.method.name}")
            values[name] = value
        per_model = []
        for source in ordered[1:] if self.method.uses_base else ordered:
            resolved = {}
            own = source.parameters
            if module and self.config.slices is None:
                own = module.model_parameters.get(source.model, {})
            for name, default in self.method.model_parameters.items():
                value = evaluate_setting(tensor_name, own.get(name), t)
                if value is None:
                    value = evaluate_setting(tensor_name, shared.get(name), t)
                if value is None:
                    value = default
                if value is None:
                    raise ConfigError(
                        f"{self.config.source}: {source.model}.parameters.{name}: required by {self.method.name}"
                    )
                resolved[name] = value
            per_model.append(resolved)
        weights = [float(p["weight"]) for p in per_model if "weight" in p]
        if weights and all(w == 0.0 for w in weights):
            raise ConfigError(
                f"{self.config.source}: parameters.weight: every model's weight is zero for tensor {tensor_name}"
            )
        if weights and self.method.name == "linear" and values.get("normalize") and abs(sum(weights)) < 1e-8:
            raise ConfigError(
                f"{self.config.source}: parameters.weight: the weights sum to zero for tensor {tensor_name}, "
                "so normalize cannot divide by them"
            )
        for source, resolved in zip(ordered[1:] if self.method.uses_base else ordered, per_model, strict=True):
            density = resolved.get("density")
            if density is not None and not 0.0 < float(density) <= 1.0:
                raise ConfigError(
                    f"{self.config.source}: {source.model}.parameters.density: {density} is outside (0, 1]"
                )
        params = TensorParams(tensor_name, values, tuple(per_model))
        if self.method.check and (problem := self.method.check(params)):
            raise ConfigError(f"{self.config.source}: {problem}")
        return params


def _check_no_extra_tensors(models: dict[str, InputModel], plans: list[TensorPlan], output_tied: bool) -> None:
    """Every tensor of every input is used (an untied lm_head is dropped when the output ties it)."""
    read = {(ref.model, ref.tensor) for plan in plans for ref in plan.inputs}
    for model in sorted({model for model, _ in read}):
        extra = sorted(
            name
            for name in models[model].tensors
            if (model, name) not in read and not (output_tied and name == "lm_head.weight")
        )
        if extra:
            raise ModelError(f"model {model} has tensor {extra[0]} that the other models lack")


def _pack(tensors: list[TensorPlan], shard_size: int) -> tuple[ShardPlan, ...]:
    """Greedy, in layout order: a new shard starts when the next tensor would overflow the size."""
    groups: list[list[TensorPlan]] = []
    size = 0
    for plan in tensors:
        if not groups or (size + plan.output.nbytes > shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(plan)
        size += plan.output.nbytes
    total = len(groups)
    return tuple(
        ShardPlan(f"model-{number:05d}-of-{total:05d}.safetensors", tuple(group))
        for number, group in enumerate(groups, 1)
    )
