"""The merge methods mergebot knows: the built-in ones plus plug-ins from the `mergebot.methods` entry point group.
Methods are pure functions on tensors (see `base`); this package does no I/O.

Every built-in method is declared here and its torch definition imported on first use: a merge whose tensors all
take the fused loops (`fused`, `fused_geometric`, `fused_entrywise`) never imports torch, which alone costs more than
a small merge. arcee_fusion has no fused loops, so a merge with it imports torch.
"""

from collections.abc import Callable, Iterator, Mapping
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from mergebot.config.methods import ENTRY_POINT_GROUP, interface
from mergebot.errors import ConfigError
from mergebot.merge.methods.base import Block, BlockSource, MergeMethod, RawBlocks, TensorParams
from mergebot.merge.methods.fused import fused_linear, fused_passthrough, fused_slerp, make_fused_task_arithmetic
from mergebot.merge.methods.fused_entrywise import fused_nearswap, fused_ram, fused_ramplus_tl, fused_sce
from mergebot.merge.methods.fused_geometric import fused_karcher, fused_model_stock, fused_multislerp, fused_nuslerp
from mergebot.merge.methods.geometry import karcher_problem, multislerp_problem
from mergebot.merge.methods.shared import magprune_problem

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUILTIN_METHODS",
    "ENTRY_POINT_GROUP",
    "Block",
    "BlockSource",
    "MergeMethod",
    "RawBlocks",
    "TensorParams",
    "available_methods",
    "method_named",
    "whole_tensor_method",
]


def _torch_definition(module: str, name: str, *args: Any) -> Callable[[BlockSource, TensorParams], Iterator]:
    """A core method's torch definition `module.name` (called with `args` when it is a factory), imported when the
    first tensor takes it."""

    @cache
    def load() -> Callable[[BlockSource, TensorParams], Iterator]:
        found = getattr(import_module(f"mergebot.merge.methods.{module}"), name)
        return found(*args) if args else found

    def merge(blocks: BlockSource, params: TensorParams) -> Iterator:
        return load()(blocks, params)

    return merge


_SPARSIFIED_TASK_ARITHMETIC = (
    ("ties", "magnitude", True, None),
    ("dare_ties", "random", True, None),
    ("dare_linear", "random", False, None),
    ("breadcrumbs", "outliers", False, None),
    ("breadcrumbs_ties", "outliers", True, None),
    ("della", "magprune", True, magprune_problem),
    ("della_linear", "magprune", False, magprune_problem),
)
"""(name, pruner, TIES sign election, check); their parameters are declared in `mergebot.config.methods`."""

_OTHER_METHODS = (
    ("sce", "sce", None, fused_sce),
    ("ram", "ram", None, fused_ram),
    ("ram", "ramplus_tl", None, fused_ramplus_tl),
    ("geometric", "model_stock", None, fused_model_stock),
    ("geometric", "nuslerp", None, fused_nuslerp),
    ("geometric", "multislerp", multislerp_problem, fused_multislerp),
    ("geometric", "karcher", karcher_problem, fused_karcher),
    ("fusion", "nearswap", None, fused_nearswap),
    ("fusion", "arcee_fusion", None, None),
)
"""(module, name, check, fused loops) of the other built-in methods, whose torch definitions `module.name` are
imported when a tensor takes them; their parameters are declared in `mergebot.config.methods`."""

CORE_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            "linear", _torch_definition("interpolation", "linear"), **interface("linear").fields(), fused=fused_linear
        ),
        MergeMethod(
            "slerp", _torch_definition("interpolation", "slerp"), **interface("slerp").fields(), fused=fused_slerp
        ),
        MergeMethod(
            "task_arithmetic",
            _torch_definition("task_arithmetic", "make_task_arithmetic", None, False),
            **interface("task_arithmetic").fields(),
            fused=make_fused_task_arithmetic(None, consensus=False),
        ),
        *(
            MergeMethod(
                name,
                _torch_definition("task_arithmetic", "make_task_arithmetic", sparsify, consensus),
                **interface(name).fields(),
                check=check,
                fused=make_fused_task_arithmetic(sparsify, consensus),
            )
            for name, sparsify, consensus, check in _SPARSIFIED_TASK_ARITHMETIC
        ),
        MergeMethod(
            "passthrough",
            _torch_definition("interpolation", "passthrough"),
            **interface("passthrough").fields(),
            fused=fused_passthrough,
        ),
        *(
            MergeMethod(name, _torch_definition(module, name), **interface(name).fields(), check=check, fused=fused)
            for module, name, check, fused in _OTHER_METHODS
        ),
    )
}


def _builtin_methods() -> dict[str, MergeMethod]:
    return dict(CORE_METHODS)


def __getattr__(name: str) -> Any:
    if name == "BUILTIN_METHODS":
        return _builtin_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_named(name: str) -> MergeMethod | None:
    """The method of that name (a core one without importing any other), or None."""
    return CORE_METHODS.get(name) or available_methods().get(name)


def whole_tensor_method(
    name: str,
    function: Callable[["torch.Tensor | None", list["torch.Tensor"], TensorParams], "torch.Tensor"],
    *,
    uses_base: bool,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Mapping[str, Any] | None = None,
) -> MergeMethod:
    """Wrap a plain per-tensor function (whole float32 tensors in, one out) as a method, for plug-ins."""

    def merge(blocks: BlockSource, params: TensorParams) -> Iterator["torch.Tensor"]:
        import torch  # a plug-in's tensors are torch's; importing it here keeps the core merges free of it

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
    methods = dict(_builtin_methods())
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        method = entry_point.load()
        if not isinstance(method, MergeMethod):
            raise ConfigError(f"entry point {entry_point.name!r} in {ENTRY_POINT_GROUP} is not a MergeMethod")
        methods.setdefault(method.name, method)
    return methods
