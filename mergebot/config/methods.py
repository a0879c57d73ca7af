"""What each built-in merge method accepts, as mergekit 0.1.5 declares it: its global and per-model parameters
(with defaults; None: required), whether it takes a base model, and how many models besides the base.

The merge layer builds its methods from these declarations, and the config is checked against them, so
`check-config` and a daemon reload (which never load the merge code) refuse what a run would refuse, before a
tensor is read. A plug-in method (the `mergebot.methods` entry point group) declares itself; the config knows only
its name and the merge checks its parameters.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "mergebot.methods"
WHOLE_NUMBERS = frozenset({"seed", "max_iter"})
"""Parameters that count something; every other non-boolean parameter is a real number."""
RANGES: Mapping[str, tuple[float | None, bool, float | None, bool]] = {
    "density": (0.0, False, 1.0, True),
    "eps": (0.0, False, None, False),
    "tol": (0.0, False, None, False),
    "max_iter": (0.0, True, None, False),
}
"""name → (low, low included, high, high included): the values a merge refuses outside these."""


@dataclass(frozen=True)
class MethodInterface:
    """A method's parameters (name → default; None: required) and the inputs it takes."""

    name: str
    uses_base: bool
    parameters: Mapping[str, Any] = field(default_factory=dict)
    """Global parameters: mergekit reads them from the top-level `parameters` only."""
    model_parameters: Mapping[str, Any] = field(default_factory=dict)
    """Per-model parameters: a model's own `parameters`, else the top-level ones, else the default."""
    min_models: int = 1
    max_models: int | None = None
    optional_base: bool = False
    unsupported: frozenset[str] = frozenset()
    """Parameters mergekit applies that mergebot does not: refused, never ignored."""

    def fields(self) -> dict[str, Any]:
        """The keyword arguments a `MergeMethod` of this interface takes."""
        return {
            "uses_base": self.uses_base,
            "parameters": dict(self.parameters),
            "model_parameters": dict(self.model_parameters),
            "min_models": self.min_models,
            "max_models": self.max_models,
            "optional_base": self.optional_base,
        }

    def kind(self, name: str) -> type:
        """bool, int or float: what a value of the parameter must be."""
        default = {**self.parameters, **self.model_parameters}.get(name)
        return bool if isinstance(default, bool) else int if name in WHOLE_NUMBERS else float


_GTA = {"int8_mask": False, "normalize": False, "lambda": 1.0, "rescale": False}
"""int8_mask only picks mergekit's mask dtype: it changes no number."""
_GTA_MODEL = {"weight": None, "density": 1.0}
_RANDOM = {"rescale": True, "seed": 0}
"""`seed` is mergebot's: it fixes the random masks (mergekit draws new ones each run)."""
_SPARSIFIED = (
    ("ties", {"normalize": True}, {}),
    ("dare_ties", _RANDOM, {}),
    ("dare_linear", _RANDOM, {}),
    ("breadcrumbs", {}, {"gamma": 0.01}),
    ("breadcrumbs_ties", {}, {"gamma": 0.01}),
    ("della", {**_RANDOM, "normalize": True}, {"epsilon": 0.15}),
    ("della_linear", _RANDOM, {"epsilon": 0.15}),
)

INTERFACES: dict[str, MethodInterface] = {
    interface.name: interface
    for interface in (
        MethodInterface("linear", uses_base=False, parameters={"normalize": True}, model_parameters={"weight": None}),
        MethodInterface("slerp", uses_base=True, parameters={"t": None}, min_models=1, max_models=1),
        MethodInterface("task_arithmetic", uses_base=True, parameters=_GTA, model_parameters={"weight": None}),
        *(
            MethodInterface(name, uses_base=True, parameters={**_GTA, **extra}, model_parameters={**_GTA_MODEL, **per})
            for name, extra, per in _SPARSIFIED
        ),
        MethodInterface("passthrough", uses_base=False, max_models=1, unsupported=frozenset({"scale"})),
        MethodInterface("sce", uses_base=True, parameters={"select_topk": 1.0, "int8_mask": False}),
        MethodInterface("ram", uses_base=True, parameters={"epsilon": 1e-5}),
        MethodInterface("ramplus_tl", uses_base=True, parameters={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
        MethodInterface("model_stock", uses_base=True, parameters={"filter_wise": False}, min_models=2),
        MethodInterface(
            "nuslerp",
            uses_base=True,
            optional_base=True,
            parameters={"nuslerp_row_wise": False, "nuslerp_flatten": True},
            model_parameters={"weight": None},
            min_models=2,
            max_models=2,
        ),
        MethodInterface(
            "multislerp",
            uses_base=True,
            optional_base=True,
            parameters={"normalize_weights": True, "eps": 1e-8},
            model_parameters={"weight": None},
        ),
        MethodInterface("karcher", uses_base=True, optional_base=True, parameters={"max_iter": 10, "tol": 1e-5}),
        MethodInterface("nearswap", uses_base=True, parameters={"t": None}, min_models=1, max_models=1),
        MethodInterface("arcee_fusion", uses_base=True, min_models=1, max_models=1),
    )
}


def interface(name: str) -> MethodInterface:
    return INTERFACES[name]


def plugin_names() -> set[str]:
    """The names installed packages register methods under (read from their metadata; nothing is imported)."""
    return {entry_point.name for entry_point in entry_points(group=ENTRY_POINT_GROUP)}
