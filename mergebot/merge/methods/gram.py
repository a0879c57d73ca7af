"""The inner products that the angle-and-norm methods need (model_stock, nuslerp, multislerp, karcher), streamed.

Each of these methods returns offset + Σᵢ cᵢ·vᵢ, where the vectors vᵢ are the inputs or their deltas from the base and
the coefficients cᵢ depend only on the vectors' inner products (their Gram matrix). So one pass over the row blocks
sums the Gram matrix and a second writes the output: no whole tensor is held. Both passes work in float64 (products
of float32 values are exact there, and so are their differences unless the exponents are far apart) and the output
is rounded to float32 once, so ill-conditioned coefficients (nearly opposite vectors) lose nothing; mergekit
computes all of it in the model dtype. The rows are re-cut into a fixed grid first (`regrid`) and every sum runs in
one order (`geometry`), so the output is the same bit for bit however the engine blocked the tensor, and the same
as the fused loops' (`fused_geometric`).
"""

from collections.abc import Callable, Iterator

import numpy as np
import torch

from mergebot.merge.methods import geometry
from mergebot.merge.methods.base import Block, BlockSource
from mergebot.merge.methods.geometry import Axis, chunk_gram, in_sequence

VectorsOf = Callable[[Block], tuple[torch.Tensor | None, list[torch.Tensor]]]
"""One block's float32 inputs → (the offset or None, the vectors), both float64."""
CoefficientsOf = Callable[[np.ndarray], np.ndarray]
"""Gram matrices [..., n, n] → coefficients [..., n], batched over the leading dims (`geometry`)."""


def gram_combination(
    blocks: BlockSource, vectors_of: VectorsOf, coefficients_of: CoefficientsOf, axis: Axis
) -> Iterator[torch.Tensor]:
    """offset + Σᵢ cᵢ·vᵢ per block, the coefficients computed from the Gram matrix of the vectors along `axis`.

    The leading dims of a Gram matrix broadcast against a block: none for "tensor", the dims after the first for
    "columns", the block's own rows (and a trailing 1) for "rows"."""
    chunks = regrid(blocks)
    gram = _whole_gram(chunks, vectors_of, axis)
    coefficients = None if gram is None else torch.from_numpy(np.ascontiguousarray(coefficients_of(gram)))
    for _, inputs in chunks():
        offset, vectors = vectors_of(inputs)
        weights = coefficients
        if weights is None:
            weights = torch.from_numpy(np.ascontiguousarray(coefficients_of(chunk_gram(_stacked(vectors), axis))))
        out = offset if offset is not None else torch.zeros_like(vectors[0])
        for index, vector in enumerate(vectors):
            out = out + weights[..., index] * vector
        yield out.to(torch.float32)


def regrid(blocks: BlockSource) -> BlockSource:
    """The same rows in chunks of a fixed grid (`geometry.grid_rows`, counted from row 0), whatever blocks came in:
    every reduction then runs on the same shapes, so its rounding cannot depend on the engine's block size."""

    def chunks() -> Iterator[tuple[int, Block]]:
        start, pending = 0, None
        for _, inputs in blocks():
            if pending is not None:
                inputs = [torch.cat(pair) for pair in zip(pending, inputs, strict=True)]
            rows = inputs[0].shape[0]
            step = geometry.grid_rows(inputs[0][0].numel())
            whole = rows // step * step
            for offset in range(0, whole, step):
                yield start + offset, [x[offset : offset + step] for x in inputs]
            start += whole
            pending = [x[whole:] for x in inputs] if whole < rows else None
        if pending is not None:
            yield start, pending

    return chunks


def _stacked(vectors: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(vectors).numpy()


def _whole_gram(blocks: BlockSource, vectors_of: VectorsOf, axis: Axis) -> np.ndarray | None:
    """The Gram matrix summed over every chunk in order; None when each block has its own (rows of a 2+-dim
    tensor)."""
    parts = []
    for _, inputs in blocks():
        vectors = vectors_of(inputs)[1]
        if axis == "rows" and vectors[0].dim() > 1:
            return None
        parts.append(chunk_gram(_stacked(vectors), axis))
    return in_sequence(np.stack(parts))
