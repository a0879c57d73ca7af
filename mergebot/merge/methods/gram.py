"""The inner products that the angle-and-norm methods need (model_stock, nuslerp, multislerp, karcher), streamed.

Each of these methods returns offset + Σᵢ cᵢ·vᵢ, where the vectors vᵢ are the inputs or their deltas from the base and
the coefficients cᵢ depend only on the vectors' inner products (their Gram matrix). So one pass over the row blocks
sums the Gram matrix and a second writes the output: no whole tensor is held. Both passes work in float64 (products
of float32 values are exact there, and so are their differences unless the exponents are far apart) and the output
is rounded to float32 once, so ill-conditioned coefficients (nearly opposite vectors) lose nothing; mergekit
computes all of it in the model dtype. The rows are re-cut into a fixed grid first (`regrid`), so the sums, and so
the output, are the same bit for bit however the engine blocked the tensor.
"""

from collections.abc import Callable, Iterator
from typing import Literal

import torch

from mergebot.merge.methods.base import Block, BlockSource

GRID_ELEMENTS = 1 << 16
Axis = Literal["tensor", "columns", "rows"]
"""Which entries form one vector: the whole flattened tensor; each column (along dim 0, summed across row blocks);
each row (along the last dim, so within a block). A 1-D tensor is one vector whatever the axis."""

VectorsOf = Callable[[Block], tuple[torch.Tensor | None, list[torch.Tensor]]]
"""One block's float32 inputs → (the offset or None, the vectors), both float64."""
CoefficientsOf = Callable[[torch.Tensor], torch.Tensor]
"""Gram matrices [..., n, n] → coefficients [..., n], batched over the leading dims."""


def gram_combination(
    blocks: BlockSource, vectors_of: VectorsOf, coefficients_of: CoefficientsOf, axis: Axis
) -> Iterator[torch.Tensor]:
    """offset + Σᵢ cᵢ·vᵢ per block, the coefficients computed from the Gram matrix of the vectors along `axis`.

    The leading dims of a Gram matrix broadcast against a block: none for "tensor", the dims after the first for
    "columns", the block's own rows (and a trailing 1) for "rows"."""
    chunks = regrid(blocks)
    gram = _whole_gram(chunks, vectors_of, axis)
    coefficients = None if gram is None else coefficients_of(gram)
    for _, inputs in chunks():
        offset, vectors = vectors_of(inputs)
        weights = coefficients if coefficients is not None else coefficients_of(_gram(vectors, axis))
        out = offset if offset is not None else torch.zeros_like(vectors[0])
        for index, vector in enumerate(vectors):
            out = out + weights[..., index] * vector
        yield out.to(torch.float32)


def regrid(blocks: BlockSource) -> BlockSource:
    """The same rows in chunks of a fixed grid (about GRID_ELEMENTS each, counted from row 0), whatever blocks came
    in: every reduction then runs on the same shapes, so its rounding cannot depend on the engine's block size."""

    def chunks() -> Iterator[tuple[int, Block]]:
        start, pending = 0, None
        for _, inputs in blocks():
            if pending is not None:
                inputs = [torch.cat(pair) for pair in zip(pending, inputs, strict=True)]
            rows = inputs[0].shape[0]
            step = max(1, GRID_ELEMENTS // max(1, inputs[0][0].numel()))
            whole = rows // step * step
            for offset in range(0, whole, step):
                yield start + offset, [x[offset : offset + step] for x in inputs]
            start += whole
            pending = [x[whole:] for x in inputs] if whole < rows else None
        if pending is not None:
            yield start, pending

    return chunks


def _whole_gram(blocks: BlockSource, vectors_of: VectorsOf, axis: Axis) -> torch.Tensor | None:
    """The Gram matrix summed over every block; None when each block has its own (rows of a 2+-dim tensor)."""
    total = None
    for _, inputs in blocks():
        vectors = vectors_of(inputs)[1]
        if axis == "rows" and vectors[0].dim() > 1:
            return None
        part = _gram(vectors, axis)
        total = part if total is None else total + part
    assert total is not None
    return total


def _gram(vectors: list[torch.Tensor], axis: Axis) -> torch.Tensor:
    stacked = torch.stack(vectors)
    if axis == "tensor" or stacked.dim() <= 2:
        flat = stacked.reshape(len(vectors), -1)
        return flat @ flat.T
    if axis == "columns":
        return torch.einsum("ir...,jr...->...ij", stacked, stacked)
    return torch.einsum("i...k,j...k->...ij", stacked, stacked).unsqueeze(-3)


def diagonal(gram: torch.Tensor) -> torch.Tensor:
    """The squared norms of the vectors, [..., n]."""
    return torch.diagonal(gram, dim1=-2, dim2=-1)
