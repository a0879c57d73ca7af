"""Merge configs → typed, validated `MergeConfig`s, with the field names users know from mergekit YAML
(`merge_method`, `base_model`, `models`, `parameters`, `slices`, `modules`, `dtype`, `out_dtype`,
`tokenizer_source`, `tokenizer`, `chat_template`, `out_shard_size`), either in TOML or in a mergekit YAML file. Every
problem is reported at once, each naming the file, the key and, where known, the line; what mergekit 0.1.5 ignores
is ignored with one warning line each (`MergeConfig.warnings`).

A model is named by one string, `model` (see `mergebot.config.models`).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergebot.config.document import Findings, Located, did_you_mean, parse_size, read_document
from mergebot.config.merge_inputs import SliceSource, known_keys, parse_models, parse_slices
from mergebot.config.methods import INTERFACES, MethodInterface, plugin_names
from mergebot.config.models import ModelSpec, Names, parse_reference
from mergebot.config.modules import ModuleSettings, read_modules, split_modules
from mergebot.config.moe import MoeConfig, is_moe_document, parse_moe
from mergebot.config.parameters import Scope, check_parameters, read_parameters
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
    "out_dtype",
    "modules",
}
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
    """mergekit's compute dtype; mergebot computes in float32 (float64 for sums), so it only names the output's
    dtype when out_dtype does not."""
    out_dtype: str | None = None
    out_shard_size: int = 5 * 1000**3
    """Bytes per output shard at most: 5 GB, as `save_pretrained` writes."""
    tokenizer: TokenizerSettings | None = None
    """None when neither `tokenizer` nor `tokenizer_source` is given: rows follow `tokenizer_source`'s embedding."""
    chat_template: str | None = None
    """'auto', a template name or a Jinja template, as written."""
    source: str = "<config>"
    modules: Mapping[str, ModuleSettings] = field(default_factory=dict)
    """mergekit's `modules:`, by name; empty for a merge written without them."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """One line per thing the config sets that is ignored, as mergekit ignores it (file:line: key: ...)."""

    @property
    def output_dtype(self) -> str | None:
        """The dtype the output is written in (None: the models'), as mergekit decides it."""
        return self.out_dtype or self.dtype

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
            result["base_model"] = base.reference() if self.slices is not None or self.modules else base.model
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
            for name, module in self.modules.items():  # slices are for a model of one module
                own = {"parameters": dict(module.parameters)} if module.parameters else {}
                result["modules"] = {name: {"slices": result.pop("slices")} | own}
        elif self.modules:
            result["modules"] = {name: self._module_dict(module) for name, module in self.modules.items()}
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
        if self.out_dtype:
            result["out_dtype"] = self.out_dtype
        if self.tokenizer:
            result |= self.tokenizer.as_dict()
        if self.chat_template:
            result["chat_template"] = self.chat_template
        result["out_shard_size"] = self.out_shard_size
        return result

    def _module_dict(self, module: ModuleSettings) -> dict[str, Any]:
        """One module as mergekit writes it: its models, with their parameters in it, and its own parameters."""
        models = [
            {"model": spec.reference()}
            | ({"parameters": dict(own)} if (own := module.model_parameters.get(name)) else {})
            for name in self.listed
            for spec in (self.spec(name),)
        ]
        return {"models": models} | ({"parameters": dict(module.parameters)} if module.parameters else {})


def parse_merge(
    raw: Mapping[str, Any], located: Located, prefix: str = "", names: Names | None = None, strict: bool = False
) -> MergeConfig:
    """Check and type the merge fields of one target (mergekit names); every problem is reported at once. `strict`
    refuses what mergekit ignores (see `Findings.strict`)."""
    findings = Findings(located, strict)
    merge = _parse_merge(raw, findings, prefix, names)  # raises every problem found
    return replace(merge, warnings=tuple(dict.fromkeys(findings.warnings)))


def _parse_merge(raw: Mapping[str, Any], findings: Findings, prefix: str, names: Names | None) -> MergeConfig:
    located = findings.located

    def key(name: str) -> str:
        return f"{prefix}{name}"

    def reference(value: Any, where: str) -> ModelSpec | None:
        return parse_reference(value, located, where, names)

    raw = known_keys(raw, MERGE_KEYS, prefix, findings)
    for name in [name for name, value in raw.items() if value is None]:
        findings.ignored(key(name), "empty (null), so it is not set")
        raw = {k: v for k, v in raw.items() if k != name}
    method, interface = findings.attempt(_method, raw.get("merge_method"), located, key("merge_method")) or (None, None)
    base = findings.attempt(reference, raw.get("base_model"), key("base_model"))
    parameters = findings.attempt(read_parameters, raw.get("parameters", {}), located, key("parameters"), findings)
    scopes = [Scope(key("parameters"), parameters or {})]
    tables: dict[str, Any] = {}
    if "modules" in raw:
        raw, tables = findings.attempt(split_modules, raw, findings, prefix) or (raw, {})
    specs: dict[str, ModelSpec] = {}
    slices = None
    listed: tuple[str, ...] = ()
    inputs_at = f"{prefix}modules.{next(iter(tables))}." if tables else prefix
    module_scopes: list[list[Scope]] = []
    if len([name for name in ("models", "slices") if name in raw]) != 1:
        findings.add(located.error(key("models"), "give exactly one of models, slices or modules"))
    elif "slices" in raw:
        module_scopes.append([])
        at = f"{inputs_at}slices"
        slices = findings.attempt(parse_slices, raw["slices"], findings, at, specs, reference, module_scopes[0])
    else:
        module_scopes.append([])
        at = f"{inputs_at}models"
        specs = findings.attempt(parse_models, raw["models"], findings, at, reference, module_scopes[0]) or {}
        listed = tuple(specs)
    modules = read_modules(tables, module_scopes, set(specs), findings, prefix, reference) if module_scopes else {}
    if base and base.model not in specs:
        specs = {base.model: base, **specs}
    elif base and (base.revision or (base.lora and base.lora.revision)):
        specs[base.model] = replace(base, parameters=specs[base.model].parameters)
    dtypes = findings.attempt(_dtypes, raw, located, prefix) or (None, None)

    def model_name(value: Any, where: str) -> str:
        spec = findings.attempt(reference, value, where) if isinstance(value, str) and value else None
        if spec is None or spec.model not in specs:
            raise located.error(where, f"{value!r} is not one of the models", value if isinstance(value, str) else None)
        return spec.model

    def check_keys(table: Mapping[str, Any], known: set[str], at: str) -> None:
        known_keys(table, known, at, findings)

    tokenizer = findings.attempt(parse_tokenizer, raw, located, prefix, model_name, check_keys)
    chat_template = findings.attempt(parse_chat_template, raw.get("chat_template"), located, key("chat_template"))
    shard_size = {}
    if "out_shard_size" in raw:
        size = findings.attempt(parse_size, raw["out_shard_size"], key("out_shard_size"), located)
        shard_size = {"out_shard_size": size} if size else {}
    if interface is not None:
        findings.attempt(_check_inputs, interface, base, listed, slices, findings, prefix)
        based = base.model if base and interface.uses_base else None
        if modules:
            check_parameters(interface, scopes, based, findings, required=False)
            for module_scope in module_scopes:
                check_parameters(interface, module_scope, based, findings, inherited=scopes[0].values)
        else:
            check_parameters(interface, scopes + (module_scopes[0] if module_scopes else []), based, findings)
    findings.raise_problems()
    assert method is not None and specs
    first = base.model if base else next(iter(specs))
    tokenizer_source = first if tokenizer is None or tokenizer.source in (BASE, UNION) else tokenizer.source
    return MergeConfig(
        merge_method=method,
        models=tuple(specs.values()),
        tokenizer_source=tokenizer_source,
        listed=listed,
        base_model=base.model if base else None,
        parameters=scopes[0].values,
        slices=slices,
        modules=modules,
        dtype=dtypes[0],
        out_dtype=dtypes[1],
        source=str(located.path),
        tokenizer=tokenizer,
        chat_template=chat_template,
        **shard_size,
    )


def _method(value: Any, located: Located, where: str) -> tuple[str, MethodInterface | None]:
    """The method's name and its interface (None for a plug-in method, which the merge checks)."""
    if not isinstance(value, str) or not value:
        raise located.error(where, "required, e.g. 'linear', 'slerp', 'ties'")
    if value in INTERFACES:
        return value, INTERFACES[value]
    plugins = plugin_names()
    if value in plugins:
        return value, None
    known = set(INTERFACES) | plugins
    raise located.error(
        where, f"{value!r} is not a merge method{did_you_mean(value, known)} (known: {', '.join(sorted(known))})"
    )


def _dtypes(raw: Mapping[str, Any], located: Located, prefix: str) -> tuple[str | None, str | None]:
    """(dtype, out_dtype), as mergekit names them: the output is out_dtype, else dtype, else the models'."""
    found = {}
    for name in ("dtype", "out_dtype"):
        value = raw.get(name)
        written = str(value).lower().removeprefix("torch.")
        # float64 as mergekit's compute dtype only: mergebot computes in float32 and writes out_dtype
        computed = written == "float64" and name == "dtype" and raw.get("out_dtype") is not None
        canonical = "float64" if computed else DTYPE_ALIASES.get(written) if value is not None else None
        if value is not None and canonical is None:
            raise located.error(f"{prefix}{name}", f"{value!r} is not one of bfloat16, float16, float32")
        found[name] = canonical
    return found["dtype"], found["out_dtype"]


def _check_inputs(
    interface: MethodInterface,
    base: ModelSpec | None,
    listed: tuple[str, ...],
    slices: "tuple[tuple[SliceSource, ...], ...] | None",
    findings: Findings,
    prefix: str,
) -> None:
    """A base model where the method needs one, and as many models besides it as the method takes."""
    located = findings.located
    if interface.uses_base and not interface.optional_base and base is None:
        findings.add(
            located.error(
                f"{prefix}base_model", f"required by merge_method {interface.name}", at=f"{prefix}merge_method"
            )
        )
    with_base = interface.uses_base and base is not None
    groups = (
        [(f"{prefix}models", listed)]
        if slices is None
        else [
            (f"{prefix}slices[{index}].sources", tuple(source.model for source in sources))
            for index, sources in enumerate(slices)
        ]
    )
    for where, models in groups:
        count = len([model for model in models if not (with_base and model == base.model)])
        low, high = interface.min_models, interface.max_models
        if models and (count < low or (high is not None and count > high)):
            wanted = f"exactly {low}" if high == low else f"at least {low}" if high is None else f"{low} to {high}"
            besides = " besides the base" if with_base else ""
            findings.add(located.error(where, f"{interface.name} takes {wanted} model(s){besides}, got {count}"))


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


def target_merge(
    raw: Mapping[str, Any], located: Located, prefix: str, names: Names | None = None
) -> MergeConfig | MoeConfig:
    """The merge part of a target: inline fields, or `mergekit_config` naming a YAML file beside the config (a
    mergekit-yaml merge, or a mergekit-moe mixture of experts)."""
    merge_fields = {k: v for k, v in raw.items() if k in MERGE_KEYS}
    if "mergekit_config" in raw:
        yaml_path = located.path.parent / str(raw["mergekit_config"])
        if merge_fields:
            first = next(iter(merge_fields))
            raise located.error(f"{prefix}mergekit_config", f"give mergekit_config or inline {first}, not both")
        document, yaml_located = read_document(yaml_path)
        if is_moe_document(document):
            return parse_moe(document, yaml_located, names=names)
        return parse_merge(document, yaml_located, names=names)
    return parse_merge(merge_fields, located, prefix, names)
