"""The merge methods mergebot knows: the built-in families plus plug-ins from the `mergebot.methods` entry point
group. Methods are pure functions on tensors (see `base`); this package does no I/O."""

from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any

import torch

from mergebot.errors import ConfigError
from mergebot.merge.methods.base import Block, BlockSource, MergeMethod, TensorParams
from mergebot.merge.methods.fusion import FUSION_METHODS
from mergebot.merge.methods.geometric import GEOMETRIC_METHODS
from mergebot.merge.methods.interpolation import linear, passthrough, slerp
from mergebot.merge.methods.ram import RAM_METHODS
from mergebot.merge.methods.sce import SCE_METHODS
from mergebot.merge.methods.sparsify import magprune_problem
from mergebot.merge.methods.task_arithmetic import make_task_arithmetic

__all__ = [
    "BUILTIN_METHODS",
    "ENTRY_POINT_GROUP",
    "Block",
    "BlockSource",
    "MergeMethod",
    "TensorParams",
    "available_methods",
    "whole_tensor_method",
]

_GTA_PARAMETERS = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}
"""int8_mask is accepted for mergekit configs; it only picks mergekit's mask dtype and changes no number here."""
_GTA_MODEL_PARAMETERS = {"weight": None, "density": 1.0}
_RANDOM = {"rescale": True, "seed": 0}
_SPARSIFIED_TASK_ARITHMETIC = (
    ("ties", "magnitude", True, {"normalize": True}, {}, None),
    ("dare_ties", "random", True, _RANDOM, {}, None),
    ("dare_linear", "random", False, _RANDOM, {}, None),
    ("breadcrumbs", "outliers", False, {}, {"gamma": 0.01}, None),
    ("breadcrumbs_ties", "outliers", True, {}, {"gamma": 0.01}, None),
    ("della", "magprune", True, {**_RANDOM, "normalize": True}, {"epsilon": 0.15}, magprune_problem),
    ("della_linear", "magprune", False, _RANDOM, {"epsilon": 0.15}, magprune_problem),
)
"""(name, pruner, TIES sign election, parameter and per-model defaults beyond the shared ones, check), as in
mergekit 0.1.5: breadcrumbs_ties does not normalize by default (ties does); `seed` fixes the random masks."""

BUILTIN_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            "linear",
            linear,
            uses_base=False,
            parameters={"normalize": True},
            model_parameters={"weight": None},
        ),
        MergeMethod("slerp", slerp, uses_base=True, parameters={"t": None}, min_models=1, max_models=1),
        MergeMethod(
            "task_arithmetic",
            make_task_arithmetic(None, consensus=False),
            uses_base=True,
            parameters=_GTA_PARAMETERS,
            model_parameters={"weight": None},
        ),
        *(
            MergeMethod(
                name,
                make_task_arithmetic(sparsify, consensus),
                uses_base=True,
                parameters={**_GTA_PARAMETERS, **parameters},
                model_parameters={**_GTA_MODEL_PARAMETERS, **model_parameters},
                check=check,
            )
            for name, sparsify, consensus, parameters, model_parameters, check in _SPARSIFIED_TASK_ARITHMETIC
        ),
        MergeMethod("passthrough", passthrough, uses_base=False, max_models=1),
        *SCE_METHODS,
        *RAM_METHODS,
        *GEOMETRIC_METHODS,
        *FUSION_METHODS,
    )
}

ENTRY_POINT_GROUP = "mergebot.methods"


def whole_tensor_method(
    name: str,
    function: Callable[[torch.Tensor | None, list[torch.Tensor], TensorParams], torch.Tensor],
    *,
    uses_base: bool,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Mapping[str, Any] | None = None,
) -> MergeMethod:
    """Wrap a plain per-tensor function (whole float32 tensors in, one out) as a method, for plug-ins."""

    def merge(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
        parts = [inputs for _, inputs in blocks()]
        whole = [torch.cat(column) for column in zip(*parts, strict=True)]
        base, models = (whole[0], whole[1:]) if uses_base else (None, whole)
        yield function(base, models, params)

    return MergeMethod(
        name,
        merge,
        uses_base=uses_base,
        parameters=dict(parameters or {}),
        model_parameters=dict(model_parameters or {}),
    )


def available_methods() -> dict[str, MergeMethod]:
    """Built-in methods plus those that installed packages register in the `mergebot.methods` entry point group."""
    methods = dict(BUILTIN_METHODS)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        method = entry_point.load()
        if not isinstance(method, MergeMethod):
            raise ConfigError(f"entry point {entry_point.name!r} in {ENTRY_POINT_GROUP} is not a MergeMethod")
        methods.setdefault(method.name, method)
    return methods
