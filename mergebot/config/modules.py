"""mergekit's `modules:`: a merge written per module of the model (a vision-language model's `text_decoder`,
`vision_tower`, `multi_modal_projector`; a text model's one module, `default`), each with its own models or slices
and parameters.

mergekit resolves a tensor's parameters from its module's model entry, then the module's `parameters`, then the
top-level ones. mergebot reads the modules into the top-level form (the first module's models or slices) plus, per
module, its parameters over the top-level ones and each model's own: the merge maps every tensor to its module
(`mergebot.merge.modules`) and takes that module's values. Every module must merge the same models; slices are for a
model of one module, as in mergekit.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergebot.config.document import Findings
from mergebot.config.merge_inputs import parse_models
from mergebot.config.models import Reference
from mergebot.config.parameters import Scope, read_parameters

MODULE_KEYS = {"models", "slices", "parameters"}


@dataclass(frozen=True)
class ModuleSettings:
    """One module of a `modules:` merge."""

    where: str
    """`file:line: modules.NAME`, for a message from the merge (which reads the model) about this module."""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    """The top-level parameters with this module's own over them."""
    model_parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Each model's parameters in this module (model name → its table)."""


def split_modules(raw: Mapping[str, Any], findings: Findings, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the merge with the first module's models or slices at the top level, each module's table by name)."""
    located = findings.located
    modules = raw["modules"]
    if "models" in raw or "slices" in raw:
        raise located.error(f"{prefix}modules", "give exactly one of models, slices or modules")
    if not isinstance(modules, dict) or not modules:
        raise located.error(f"{prefix}modules", "must be a table of module name → {models or slices, parameters}")
    tables: dict[str, Any] = {}
    for name, table in modules.items():
        where = f"{prefix}modules.{name}"
        if not isinstance(table, dict):
            raise located.error(where, "must be a table with models or slices, and parameters")
        unknown = located.unknown_keys(table, MODULE_KEYS, f"{where}.")
        if unknown and located.path.suffix.lower() in (".yml", ".yaml"):
            for key in sorted(set(table) - MODULE_KEYS):
                findings.ignored(f"{where}.{key}", "mergekit reads no such key in a module")
        elif unknown:
            raise unknown[0]
        if ("models" in table) == ("slices" in table):
            raise located.error(where, "give exactly one of models or slices")
        tables[str(name)] = {key: value for key, value in table.items() if key in MODULE_KEYS}
    if len(tables) > 1 and any("slices" in table for table in tables.values()):
        raise located.error(f"{prefix}modules", "slices are for a model of one module; give each module models")
    first = next(iter(tables.values()))
    flat = {key: value for key, value in raw.items() if key != "modules"}
    return flat | {key: first[key] for key in ("models", "slices") if key in first}, tables


def read_modules(
    tables: Mapping[str, Any],
    scopes: list[list[Scope]],
    models: set[str],
    findings: Findings,
    prefix: str,
    reference: Reference,
) -> dict[str, ModuleSettings]:
    """Each module's settings. `scopes[0]` holds the first module's model scopes (read as the top-level models);
    each module's list gets its own `parameters` first, for the method's check."""
    located = findings.located
    modules = {}
    for index, (name, table) in enumerate(tables.items()):
        where = f"{prefix}modules.{name}"
        own = findings.attempt(read_parameters, table.get("parameters", {}), located, f"{where}.parameters", findings)
        if index:
            scopes.append([])
            at = f"{where}.models"
            others = findings.attempt(parse_models, table.get("models"), findings, at, reference, scopes[index])
            if others is not None and set(others) != models:
                message = f"every module must merge the same models ({', '.join(sorted(models))})"
                findings.add(located.error(at, message))
        scopes[index].insert(0, Scope(f"{where}.parameters", own or {}))
        model_parameters = {scope.model: scope.values for scope in scopes[index][1:]}
        modules[str(name)] = ModuleSettings(located.where(where), own or {}, model_parameters)
    return modules
