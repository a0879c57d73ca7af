"""Merge parameters as mergekit 0.1.5 reads them, checked against the method's declared interface
(`mergebot.config.methods`) before a tensor is read.

mergekit reads a global parameter (slerp's `t`, `normalize`, ...) from the top-level `parameters` only, and a
per-model one (`weight`, `density`, ...) from the model's own `parameters`, else the top-level ones, else its default;
it ignores any other name. So does mergebot, saying so in one warning line per name (with the name it was probably
meant to be); a parameter mergekit applies that mergebot does not have is refused.
"""

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mergebot.config.document import Findings, Located, did_you_mean
from mergebot.config.methods import RANGES, MethodInterface

CONDITION_KEYS = {"filter", "value"}
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
TRUTH = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
"""The truth values pydantic reads from a string (as mergekit reads a boolean parameter)."""


@dataclass(frozen=True)
class Scope:
    """One `parameters` table: where it is written and, for a model's own, the model as written."""

    where: str
    values: dict[str, Any]
    model: str | None = None
    """The model's name (None for the top-level table)."""
    written: str | None = None
    """The model as the config writes it, for messages."""
    model_key: str | None = None
    """The key that names the model (`models[1].model`), to point at when its parameters are not written."""


def read_parameters(value: Any, located: Located, where: str, findings: Findings | None = None) -> dict[str, Any]:
    """A `parameters` table, each setting checked for shape; YAML null (every line commented out) is none."""
    if value is None:
        if findings is not None:
            findings.ignored(where, "empty (null), so no parameters are set here")
        return {}
    if not isinstance(value, dict):
        raise located.error(where, "must be a table of parameter values")
    value = {name: _coerced(setting) for name, setting in value.items()}
    for name, setting in value.items():
        _check_setting(setting, located, f"{where}.{name}", findings)
    return value


def _coerced(setting: Any) -> Any:
    """A number or a truth value written as a string ("0.5", "true") as the number or bool mergekit reads it as."""
    if isinstance(setting, list):
        return [_coerced(item) for item in setting]
    if isinstance(setting, dict) and "value" in setting:
        return {**setting, "value": _coerced(setting["value"])}
    if isinstance(setting, str) and NUMBER.fullmatch(setting.strip()):
        number = float(setting)
        return int(number) if number.is_integer() and "." not in setting and "e" not in setting.lower() else number
    if isinstance(setting, str) and setting.strip().lower() in TRUTH:
        return TRUTH[setting.strip().lower()]
    return setting


def _check_setting(setting: Any, located: Located, where: str, findings: Findings | None = None) -> None:
    """A number or bool; a list of numbers (a gradient across layers); or a list of {filter, value} conditions."""
    if isinstance(setting, bool | int | float):
        return
    if isinstance(setting, list) and setting and all(_is_number(v) for v in setting):
        return
    if isinstance(setting, dict):
        setting = [setting]  # mergekit reads one condition as a list of one
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for index, condition in enumerate(setting):
            unknown = sorted(set(condition) - CONDITION_KEYS, key=str)
            if unknown and findings is not None and located.path.suffix.lower() in (".yml", ".yaml"):
                for key in unknown:  # a condition reads only filter and value
                    findings.ignored(f"{where}[{index}].{key}", "mergekit reads only filter and value in a condition")
            else:
                located.check_keys(condition, CONDITION_KEYS, f"{where}[{index}].")
            if "value" not in condition:
                raise located.error(f"{where}[{index}].value", "required: a condition is {filter = '...', value = ...}")
            if "filter" in condition and not isinstance(condition["filter"], str):
                raise located.error(f"{where}[{index}].filter", "must be a string found in tensor names")
            if isinstance(condition["value"], dict):
                raise located.error(f"{where}[{index}].value", "must be a number or a list of numbers")
            _check_setting(condition["value"], located, f"{where}[{index}].value", findings)
        return
    raise located.error(where, "must be a number, a list of numbers, or a list of {filter, value}")


def normalized(setting: Any) -> Any:
    """One condition written as a table is a list of one, as mergekit reads it."""
    return [setting] if isinstance(setting, dict) else setting


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_parameters(
    method: MethodInterface,
    scopes: list[Scope],
    base: str | None,
    findings: Findings,
    required: bool = True,
    inherited: Mapping[str, Any] | None = None,
) -> None:
    """Every parameter against the method's declaration: names (an undeclared one is dropped from its scope, with
    a warning), kinds and ranges of every value written, and (with `required`) the required ones. `scopes[0]` is
    the top level, or a module's parameters with `inherited` the top level's; `base` the base model, when the
    method takes one."""
    inherited = inherited or {}
    top = scopes[0]
    known = set(method.parameters) | set(method.model_parameters)
    for scope in scopes:
        for name in list(scope.values):
            key = f"{scope.where}.{name}"
            if name in method.unsupported:
                findings.add(
                    findings.located.error(key, f"mergekit's {method.name} applies {name}; mergebot does not have it")
                )
            elif name in method.model_parameters or (scope is top and name in method.parameters):
                findings.attempt(_check_values, method, name, scope.values[name], key, findings.located)
                continue
            elif name in method.parameters:
                findings.ignored(key, f"{name} is a global parameter of {method.name}, not read from a model's")
            else:
                declared = ", ".join(sorted(known)) or "none"
                findings.ignored(
                    key, f"{method.name} has no parameter {name} (it has: {declared}){did_you_mean(name, known)}"
                )
            del scope.values[name]
    if not required:
        return
    for name, default in method.parameters.items():
        if default is None and name not in top.values and name not in inherited:
            at = (
                top.where
                if findings.located.has_line(top.where)
                else top.where.rpartition("parameters")[0] + "merge_method"
            )
            findings.add(findings.located.error(f"{top.where}.{name}", f"required by {method.name}", at=at))
    for scope in scopes[1:]:
        if scope.model == base:
            continue
        for name, default in method.model_parameters.items():
            if default is None and not any(name in values for values in (scope.values, top.values, inherited)):
                message = f"required by {method.name} for {scope.written} (here or in the top-level parameters)"
                findings.add(
                    findings.located.error(f"{scope.where}.{name}", message, value=scope.written, at=scope.model_key)
                )


def _check_values(method: MethodInterface, name: str, setting: Any, where: str, located: Located) -> None:
    """Each value written for the parameter is of its kind and in its range (an interpolated value lies between
    two written ones, so it is in range too)."""
    kind = method.kind(name)
    low, low_in, high, high_in = RANGES.get(name, (None, False, None, False))
    for value in _values(normalized(setting)):
        if kind is bool:
            if not isinstance(value, bool) and value not in (0, 1):
                raise located.error(where, f"{value!r} is not true or false")
            continue
        if not _is_number(value) or (kind is int and float(value) != int(value)):
            raise located.error(where, f"{value!r} is not {'a whole number' if kind is int else 'a number'}")
        below = low is not None and (value < low or (value == low and not low_in))
        above = high is not None and (value > high or (value == high and not high_in))
        if below or above:
            bounds = [f"{'≥' if low_in else '>'} {low:g}"] if low is not None else []
            bounds += [f"{'≤' if high_in else '<'} {high:g}"] if high is not None else []
            raise located.error(where, f"{value!r} must be {' and '.join(bounds)}")


def _values(setting: Any) -> Iterator[Any]:
    """Every scalar a setting writes: itself, a gradient's entries, each condition's values."""
    if isinstance(setting, list):
        for item in setting:
            yield from _values(item["value"] if isinstance(item, dict) else item)
    else:
        yield setting
