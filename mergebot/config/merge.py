"""Merge configs → typed, validated `MergeConfig`s, with the field names users know from mergekit YAML
(`merge_method`, `base_model`, `models`, `parameters`, `slices`, `dtype`, `tokenizer_source`, `tokenizer`,
`chat_template`, `out_shard_size`), either in TOML or in a mergekit YAML file. Every error names the file, the key
and, where known, the line.

A model is named by one string, `model` (see `mergebot.config.models`).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergebot.config.document import Located, parse_size, read_document
from mergebot.config.models import ModelSpec, Names, Reference, parse_reference
from mergebot.config.tokenizer import BASE, UNION, TokenizerSettings, parse_chat_template, parse_tokenizer
from mergebot.errors import ConfigError

MERGE_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "slices",
    "dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "out_shard_size",
}
MODEL_KEYS = {"model", "revision", "parameters"}
SLICE_KEYS = {"sources"}
SOURCE_KEYS = MODEL_KEYS | {"layer_range"}
CONDITION_KEYS = {"filter", "value"}
DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


@dataclass(frozen=True)
class SliceSource:
    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """What to merge and how; `models` lists every distinct input model (the base included)."""

    merge_method: str
    models: tuple[ModelSpec, ...]
    tokenizer_source: str
    """The model whose tokenizer files the output starts from (for a union: the base, or the first model)."""
    listed: tuple[str, ...] = ()
    """The models named under `models`, in order (empty for a slices config)."""
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    slices: tuple[tuple[SliceSource, ...], ...] | None = None
    dtype: str | None = None
    out_shard_size: int = 5 * 1000**3
    """Bytes per output shard at most: 5 GB, as `save_pretrained` writes."""
    tokenizer: TokenizerSettings | None = None
    """None when neither `tokenizer` nor `tokenizer_source` is given: rows follow `tokenizer_source`'s embedding."""
    chat_template: str | None = None
    """'auto', a template name or a Jinja template, as written."""
    source: str = "<config>"

    def spec(self, model: str) -> ModelSpec:
        return next(spec for spec in self.models if spec.model == model)

    @property
    def sources(self) -> set[str]:
        """The name of every checkpoint the merge reads files from (Hub repo ids, local paths)."""
        return {checkpoint.name for spec in self.models for checkpoint in spec.checkpoints}

    def pinned(self, revisions: Mapping[str, tuple[str | None, str | None]]) -> "MergeConfig":
        """The same merge with each model's revision (and its adapter's) fixed to the sha that was merged (for
        reproducibility); `revisions`: model → (its revision, its adapter's revision), None for a local one."""
        models = []
        for spec in self.models:
            base, adapter = revisions.get(spec.model, (None, None))
            lora = replace(spec.lora, revision=adapter or spec.lora.revision) if spec.lora else None
            models.append(replace(spec, revision=base or spec.revision, lora=lora))
        return replace(self, models=tuple(models))

    def as_dict(self) -> dict[str, Any]:
        """The merge config in mergekit's field names, for the model card and fingerprints."""
        result: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            base = self.spec(self.base_model)
            result["base_model"] = base.reference() if self.slices is not None else base.model
        if self.slices is not None:
            result["slices"] = [
                {
                    "sources": [
                        {"model": self.spec(s.model).reference(), "layer_range": list(s.layer_range)}
                        | ({"parameters": dict(s.parameters)} if s.parameters else {})
                        for s in sources
                    ]
                }
                for sources in self.slices
            ]
        else:
            result["models"] = [
                (
                    {"model": m.reference()}
                    if m.lora
                    else {"model": m.model} | ({"revision": m.revision} if m.revision else {})
                )
                | ({"parameters": dict(m.parameters)} if m.parameters else {})
                for m in self.models
            ]
        if self.parameters:
            result["parameters"] = dict(self.parameters)
        if self.dtype:
            result["dtype"] = self.dtype
        if self.tokenizer:
            result |= self.tokenizer.as_dict()
        if self.chat_template:
            result["chat_template"] = self.chat_template
        result["out_shard_size"] = self.out_shard_size
        return result


def parse_merge(raw: Mapping[str, Any], located: Located, prefix: str = "", names: Names | None = None) -> MergeConfig:
    """Check and type the merge fields of one target (mergekit names)."""

    def key(name: str) -> str:
        return f"{prefix}{name}"

    def reference(value: Any, where: str) -> ModelSpec | None:
        return parse_reference(value, located, where, names)

    located.check_keys(raw, MERGE_KEYS, prefix)
    method = raw.get("merge_method")
    if not isinstance(method, str) or not method:
        raise located.error(key("merge_method"), "required, e.g. 'linear', 'slerp', 'ties'")
    base = reference(raw.get("base_model"), key("base_model"))
    base_model = base.model if base else None
    parameters = _parameters(raw.get("parameters", {}), located, key("parameters"))
    specs: dict[str, ModelSpec] = {}
    slices = None
    listed: tuple[str, ...] = ()
    if "slices" in raw:
        slices = _slices(raw["slices"], located, key("slices"), specs, reference)
        if "models" in raw:
            raise located.error(key("models"), "give either models or slices, not both")
    else:
        models = raw.get("models")
        if not isinstance(models, list) or not models:
            raise located.error(key("models"), "required: a list of {model = ..., parameters = {...}}")
        for index, entry in enumerate(models):
            spec = _model_spec(entry, located, key(f"models[{index}]"), reference)
            if spec.model in specs:
                raise located.error(key(f"models[{index}].model"), f"{spec.model} is listed twice")
            specs[spec.model] = spec
        listed = tuple(specs)
    if base and base.model not in specs:
        specs = {base.model: base, **specs}
    elif base and (base.revision or (base.lora and base.lora.revision)):
        specs[base.model] = replace(base, parameters=specs[base.model].parameters)
    dtype = raw.get("dtype")
    if dtype is not None and DTYPE_ALIASES.get(str(dtype).lower()) is None:
        raise located.error(key("dtype"), f"{dtype!r} is not one of bfloat16, float16, float32")

    def model_name(value: Any, where: str) -> str:
        spec = reference(value, where) if isinstance(value, str) and value else None
        if spec is None or spec.model not in specs:
            raise located.error(where, f"{value!r} is not one of the models")
        return spec.model

    tokenizer = parse_tokenizer(raw, located, prefix, model_name)
    first = base_model or next(iter(specs))
    tokenizer_source = first if tokenizer is None or tokenizer.source in (BASE, UNION) else tokenizer.source
    shard_size = {}
    if "out_shard_size" in raw:
        shard_size["out_shard_size"] = parse_size(raw["out_shard_size"], key("out_shard_size"), located)
    return MergeConfig(
        merge_method=method,
        models=tuple(specs.values()),
        tokenizer_source=tokenizer_source,
        listed=listed,
        base_model=base_model,
        parameters=parameters,
        slices=slices,
        dtype=DTYPE_ALIASES[str(dtype).lower()] if dtype is not None else None,
        source=str(located.path),
        tokenizer=tokenizer,
        chat_template=parse_chat_template(raw.get("chat_template"), located, key("chat_template")),
        **shard_size,
    )


def _model_spec(entry: Any, located: Located, where: str, reference: Reference) -> ModelSpec:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict):
        raise located.error(where, "must be a table with a 'model' key")
    located.check_keys(entry, MODEL_KEYS, f"{where}.")
    spec = reference(entry.get("model"), f"{where}.model")
    if spec is None:
        raise located.error(f"{where}.model", "required")
    revision = entry.get("revision", spec.revision)
    if revision is not None and not isinstance(revision, str):
        raise located.error(f"{where}.revision", "must be a branch, tag or commit sha")
    parameters = _parameters(entry.get("parameters", {}), located, f"{where}.parameters")
    return replace(spec, revision=revision, parameters=parameters)


def _slices(
    value: Any, located: Located, where: str, specs: dict[str, ModelSpec], reference: Reference
) -> tuple[tuple[SliceSource, ...], ...]:
    if not isinstance(value, list) or not value:
        raise located.error(where, "must be a list of {sources = [...]}")
    slices = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise located.error(f"{where}[{index}]", "must be a table {sources = [...]}")
        located.check_keys(entry, SLICE_KEYS, f"{where}[{index}].")
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            raise located.error(f"{where}[{index}].sources", "required: a list of {model, layer_range}")
        parsed = []
        for number, source in enumerate(sources):
            at = f"{where}[{index}].sources[{number}]"
            if not isinstance(source, dict):
                raise located.error(at, "must be a table with model and layer_range")
            located.check_keys(source, SOURCE_KEYS, f"{at}.")
            spec = _model_spec({k: v for k, v in source.items() if k != "layer_range"}, located, at, reference)
            layer_range = source.get("layer_range")
            if not (
                isinstance(layer_range, list)
                and len(layer_range) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)
                and 0 <= layer_range[0] < layer_range[1]
            ):
                raise located.error(f"{at}.layer_range", "must be [first, end) with 0 <= first < end")
            specs.setdefault(spec.model, replace(spec, parameters={}))
            parsed.append(SliceSource(spec.model, (layer_range[0], layer_range[1]), spec.parameters))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in parsed}
        if len(lengths) > 1:
            raise located.error(f"{where}[{index}].sources", "all sources of a slice need the same number of layers")
        slices.append(tuple(parsed))
    return tuple(slices)


def _parameters(value: Any, located: Located, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise located.error(where, "must be a table of parameter values")
    for name, setting in value.items():
        _check_setting(setting, located, f"{where}.{name}")
    return dict(value)


def _check_setting(setting: Any, located: Located, where: str) -> None:
    """A number or bool; a list of numbers (a gradient across layers); or a list of {filter, value} conditions."""
    if isinstance(setting, bool | int | float):
        return
    if isinstance(setting, list) and setting and all(_is_number(v) for v in setting):
        return
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for index, condition in enumerate(setting):
            located.check_keys(condition, CONDITION_KEYS, f"{where}[{index}].")
            if "value" not in condition:
                raise located.error(f"{where}[{index}].value", "required: a condition is {filter = '...', value = ...}")
            if "filter" in condition and not isinstance(condition["filter"], str):
                raise located.error(f"{where}[{index}].filter", "must be a string found in tensor names")
            if isinstance(condition["value"], dict):
                raise located.error(f"{where}[{index}].value", "must be a number or a list of numbers")
            _check_setting(condition["value"], located, f"{where}[{index}].value")
        return
    raise located.error(where, "must be a number, a list of numbers, or a list of {filter, value}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_merge_config(path: Path, target: str | None = None, names: Names | None = None) -> MergeConfig:
    """A merge from a TOML target (top-level fields or one of [[targets]]) or a mergekit YAML file."""
    document, located = read_document(path)
    if "targets" in document:
        targets = document["targets"]
        if not isinstance(targets, list) or not targets:
            raise located.error("targets", "must be a list of [[targets]] tables")
        named = [t.get("name") for t in targets if isinstance(t, dict)]
        if target is None and len(targets) > 1:
            raise ConfigError(f"{path}: several targets ({', '.join(map(str, named))}); choose one with --target")
        index = 0 if target is None else named.index(target) if target in named else -1
        if index < 0:
            raise ConfigError(f"{path}: no target named {target!r} (targets: {', '.join(map(str, named))})")
        return target_merge(targets[index], located, f"targets[{index}].", names)
    if "mergekit_config" in document:
        located.check_keys(document, MERGE_KEYS | {"mergekit_config"}, "")
        return target_merge(document, located, "", names)
    return parse_merge(document, located, names=names)


def target_merge(raw: Mapping[str, Any], located: Located, prefix: str, names: Names | None = None) -> MergeConfig:
    """The merge part of a target: inline fields, or `mergekit_config` naming a YAML file beside the config."""
    merge_fields = {k: v for k, v in raw.items() if k in MERGE_KEYS}
    if "mergekit_config" in raw:
        yaml_path = located.path.parent / str(raw["mergekit_config"])
        if merge_fields:
            first = next(iter(merge_fields))
            raise located.error(f"{prefix}mergekit_config", f"give mergekit_config or inline {first}, not both")
        document, yaml_located = read_document(yaml_path)
        return parse_merge(document, yaml_located, names=names)
    return parse_merge(merge_fields, located, prefix, names)
