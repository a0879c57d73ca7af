"""The quick form of `mergebot merge`: `--method linear A:0.6 B:0.4 OUT_DIR`, mergebot's own (so its defaults are
mergebot's): models as model[:weight], other parameters as --set key=value."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mergebot.config.document import Located
from mergebot.config.merge import MergeConfig, parse_merge
from mergebot.config.methods import INTERFACES
from mergebot.errors import ConfigError


def quick_config(method: str, sources: list[str], assignments: list[str], options: Mapping[str, Any]) -> MergeConfig:
    """The merge the command line writes; with no weight written, every model but the base weighs the same
    (1/n), and a weight for some models but not all is refused. What mergekit would ignore is refused here."""
    models = []
    for argument in sources:
        model, weight = weighted(argument)
        models.append({"model": model} | ({"parameters": {"weight": weight}} if weight is not None else {}))
    raw: dict[str, Any] = {"merge_method": method, "models": models, "parameters": {}}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {assignment}: expected key=value")
        raw["parameters"][key] = yaml.safe_load(value)
    raw |= {key: value for key, value in options.items() if value is not None}
    interface = INTERFACES.get(method)
    if interface is not None and "weight" in interface.model_parameters and "weight" not in raw["parameters"]:
        weighed = [m for m in models if m["model"] != raw.get("base_model") or not interface.uses_base]
        unweighted = [m for m in weighed if "parameters" not in m]
        if unweighted and len(unweighted) < len(weighed):
            raise ConfigError(f"merge --method: {unweighted[0]['model']} has no weight; give every model one, or none")
        if unweighted:
            raw["parameters"]["weight"] = 1.0 / len(unweighted)
    return parse_merge(raw, Located(Path("<command line>"), ""), strict=True)


def weighted(argument: str) -> tuple[str, float | None]:
    """`model:weight` → (model, weight); a model alone (or a path with a colon) → (model, None)."""
    model, sep, weight = argument.rpartition(":")
    if sep and not Path(argument).exists():
        try:
            return model, float(weight)
        except ValueError:
            pass
    return argument, None
