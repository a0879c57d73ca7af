"""What every merge method is: a pure function from a re-iterable source of float32 row blocks to output blocks.

The engine hands each method one output tensor as a source of row blocks (every block a list of float32 tensors,
the base model first when the method uses one). A method may walk the blocks more than once to gather an exact
whole-tensor statistic (a slerp angle, a TIES magnitude threshold, a DARE L1 norm) and then yields the output blocks
in order. So a large embedding never needs float32 copies of every input at once, and the numbers still equal the
published whole-tensor formulas (mergekit's definitions are the reference).
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

Block = list["torch.Tensor"]
BlockSource = Callable[[], Iterable[tuple[int, Block]]]
"""Calling it starts a fresh pass: (first row of the block, the inputs' rows) in row order, same blocks each pass."""


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one output tensor (gradients and filters already applied)."""

    tensor_name: str
    values: Mapping[str, Any]
    per_model: tuple[Mapping[str, Any], ...]
    """One mapping per non-base input, in input order."""


@dataclass(frozen=True)
class RawBlocks:
    """One output tensor's inputs as raw bit patterns, for a method's fused loops (`mergebot.merge.kernels`).

    Calling it starts a pass: (first row, array[inputs, elements] of the blocks' bits) in row order, the same
    blocks as the float32 source of the same tensor. bfloat16 bits come as uint16, float32 bits as uint32; the
    output is written as bits of the same kind."""

    passes: Callable[[], Iterable[tuple[int, np.ndarray]]]
    shape: tuple[int, ...]
    input_bits: type
    output_bits: type

    def __call__(self) -> Iterable[tuple[int, np.ndarray]]:
        return self.passes()

    @property
    def shift(self) -> int:
        """How far an input's bits move up to make float32 bits."""
        return 16 if self.input_bits is np.uint16 else 0

    @property
    def output_shift(self) -> int:
        return 16 if self.output_bits is np.uint16 else 0

    @property
    def row_elements(self) -> int:
        count = 1
        for dim in self.shape[1:]:
            count *= dim
        return count


@dataclass(frozen=True)
class MergeMethod:
    """A merge method and the parameters it accepts (with defaults; `None` means required)."""

    name: str
    merge: Callable[[BlockSource, TensorParams], Iterator["torch.Tensor"]]
    uses_base: bool
    parameters: Mapping[str, Any] = field(default_factory=dict)
    model_parameters: Mapping[str, Any] = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    optional_base: bool = False
    """With uses_base: the base model takes part when the config names one; without one the method runs on the
    models alone (mergekit's nuslerp, multislerp). `split_base` tells the two cases apart."""
    check: Callable[[TensorParams], str | None] | None = None
    """A method-specific check of one tensor's resolved parameters: the problem, or None."""
    fused: Callable[[RawBlocks, TensorParams], Iterator[np.ndarray]] | None = None
    """The same merge in fused loops over the inputs' bits, giving the same bytes: the engine uses it for the
    tensors it can (plain bfloat16 or float32 inputs and output)."""


def split_base(inputs: Block, params: TensorParams) -> tuple["torch.Tensor | None", Block]:
    """The base (None when there is none) and the models: there is a base when the inputs outnumber `per_model`."""
    if len(inputs) > len(params.per_model):
        return inputs[0], inputs[1:]
    return None, inputs


def model_weights(params: TensorParams) -> list[float]:
    return [float(p["weight"]) for p in params.per_model]
