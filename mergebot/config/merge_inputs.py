"""The inputs of a merge as mergekit 0.1.5 reads them: `models` entries, `slices` and their sources, each model's
`parameters` becoming a scope the method's declaration is checked against (`mergebot.config.parameters`)."""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mergebot.config.document import Findings, did_you_mean
from mergebot.config.models import ModelSpec, Reference
from mergebot.config.parameters import Scope, read_parameters

MODEL_KEYS = {"model", "revision", "parameters"}
SLICE_KEYS = {"sources"}
SLICE_APPLIED = {"base_model": "a base model for this slice", "parameters": "parameters for this slice"}
"""Slice keys mergekit applies and mergebot does not have: refused."""
SOURCE_KEYS = MODEL_KEYS | {"layer_range"}


@dataclass(frozen=True)
class SliceSource:
    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any] = field(default_factory=dict)


def known_keys(
    table: Mapping[str, Any], known: set[str], prefix: str, findings: Findings, applied: Mapping[str, str] = {}
) -> dict[str, Any]:
    """The table without the keys mergekit ignores: in a mergekit YAML file an unknown key is ignored with a
    warning, as mergekit does; in mergebot's TOML it is refused. `applied`: keys mergekit applies that mergebot
    does not have (key → what it does), refused in both."""
    mergekit_file = findings.located.path.suffix.lower() in (".yml", ".yaml")
    kept = {}
    for name, value in table.items():
        if name in applied:
            findings.add(
                findings.located.error(f"{prefix}{name}", f"mergekit applies it ({applied[name]}); mergebot does not")
            )
        elif name in known:
            kept[name] = value
        elif mergekit_file:
            findings.ignored(f"{prefix}{name}", f"mergekit reads no such key here{did_you_mean(str(name), known)}")
        else:
            findings.add(findings.located.unknown_keys({name: value}, known, prefix)[0])
    return kept


def written(entry: Any) -> str:
    """A model entry's model as the config writes it."""
    return str(entry.get("model") if isinstance(entry, dict) else entry)


def model_spec(entry: Any, findings: Findings, where: str, reference: Reference, scopes: list[Scope]) -> ModelSpec:
    """One entry of `models` (or a slice source without its layer_range); its parameters become a scope, whose
    dict the spec shares, so a parameter the method ignores leaves both."""
    located = findings.located
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict):
        raise located.error(where, "must be a table with a 'model' key")
    entry = known_keys(entry, MODEL_KEYS, f"{where}.", findings)
    spec = reference(entry.get("model"), f"{where}.model")
    if spec is None:
        raise located.error(f"{where}.model", "required")
    revision = entry.get("revision", spec.revision)
    if revision is not None and not isinstance(revision, str):
        raise located.error(f"{where}.revision", "must be a branch, tag or commit sha")
    parameters = read_parameters(entry.get("parameters", {}), located, f"{where}.parameters", findings)
    scopes.append(Scope(f"{where}.parameters", parameters, spec.model, written(entry), f"{where}.model"))
    return replace(spec, revision=revision, parameters=parameters)


def parse_slices(
    value: Any, findings: Findings, where: str, specs: dict[str, ModelSpec], reference: Reference, scopes: list[Scope]
) -> tuple[tuple[SliceSource, ...], ...]:
    located = findings.located
    if not isinstance(value, list) or not value:
        raise located.error(where, "must be a list of {sources = [...]}")
    slices = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise located.error(f"{where}[{index}]", "must be a table {sources = [...]}")
        entry = known_keys(entry, SLICE_KEYS, f"{where}[{index}].", findings, SLICE_APPLIED)
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            raise located.error(f"{where}[{index}].sources", "required: a list of {model, layer_range}")
        parsed = []
        for number, source in enumerate(sources):
            at = f"{where}[{index}].sources[{number}]"
            if not isinstance(source, dict):
                raise located.error(at, "must be a table with model and layer_range")
            source = known_keys(source, SOURCE_KEYS, f"{at}.", findings)
            without_range = {k: v for k, v in source.items() if k != "layer_range"}
            spec = model_spec(without_range, findings, at, reference, scopes)
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


def parse_models(
    value: Any, findings: Findings, where: str, reference: Reference, scopes: list[Scope]
) -> dict[str, ModelSpec]:
    """A `models` list: model name → its spec, in order."""
    located = findings.located
    if not isinstance(value, list) or not value:
        raise located.error(where, "required: a list of {model = ..., parameters = {...}}")
    specs: dict[str, ModelSpec] = {}
    for index, entry in enumerate(value):
        at = f"{where}[{index}]"
        spec = findings.attempt(model_spec, entry, findings, at, reference, scopes)
        if spec is not None and spec.model in specs:
            findings.add(located.error(f"{at}.model", f"{written(entry)} is listed twice", written(entry)))
        elif spec is not None:
            specs[spec.model] = spec
    return specs
