"""Merges defined by angles and norms: Model Stock, NuSLERP, Multi-SLERP and the Karcher mean (mergekit's definitions).

Every one is a linear combination of its inputs with coefficients from their inner products, computed by
`gram.gram_combination` in two streamed passes (see there for why float64).
"""

from collections.abc import Iterator

import numpy as np
import torch

from mergebot.merge.methods import geometry
from mergebot.merge.methods.base import Block, BlockSource, TensorParams, model_weights, split_base
from mergebot.merge.methods.geometry import Axis
from mergebot.merge.methods.gram import VectorsOf, gram_combination


def _deltas(inputs: Block) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = inputs[0].double()
    return base, [model.double() - base for model in inputs[1:]]


def _around_base(params: TensorParams) -> VectorsOf:
    """The vectors of the methods whose base is optional: deltas from the base when there is one, else the models."""

    def vectors_of(inputs: Block) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base, models = split_base(inputs, params)
        if base is None:
            return None, [model.double() for model in models]
        return _deltas([base, *models])

    return vectors_of


def model_stock(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): w₀ + t·(mean(wᵢ) − w₀) with t = N·cos / (1 + (N−1)·cos),
    cos the mean pairwise cosine of the deltas, over the whole tensor or per row (`filter_wise`). Where
    1 + (N−1)·cos is within 1e-6 of zero t is 0: the base is kept rather than amplifying opposed deltas."""
    axis: Axis = "rows" if params.values["filter_wise"] else "tensor"
    return gram_combination(blocks, _deltas, geometry.model_stock_coefficients, axis)


def nuslerp(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """NuSLERP (mergekit): spherical interpolation of two models at t = w₂ / (w₁ + w₂) (0.5 when the weights sum to
    ~0), of their deltas from the base when there is one; the vectors are the whole tensor (`nuslerp_flatten`), its
    columns (`nuslerp_row_wise`) or its rows. Colinear vectors (1 − cos² ≤ 1e-16) are interpolated linearly."""
    t = geometry.nuslerp_t(model_weights(params))

    def coefficients_of(gram: np.ndarray) -> np.ndarray:
        return geometry.nuslerp_coefficients(gram, t)

    return gram_combination(blocks, _around_base(params), coefficients_of, geometry.nuslerp_axis(params.values))


def multislerp(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """Multi-SLERP (Goddard, "multislerp"): the weighted mean of the unit vectors (deltas from the base when there is
    one) mapped back to the sphere, scaled by the weighted mean norm; the whole tensor is one vector.

    mergekit takes the tangent space at that weighted mean and maps the weighted tangent sum back with the
    exponential map, but the weighted sum of the tangent vectors is exactly zero there (Σ wᵢ(uᵢ − (uᵢ·m̂)m̂) =
    m − |m|m̂ = 0), so the result is cos(eps)·m̂·Σ wᵢ|vᵢ|; mergekit adds the float32 rounding of that zero (≈1e-7
    relative), mergebot computes the exact value. A weighted mean of norm below eps (opposed vectors, or all deltas
    zero) falls back to the weighted sum of the vectors for any number of models (mergekit: for two, else error)."""
    weights = geometry.multislerp_weights(model_weights(params), bool(params.values["normalize_weights"]))
    eps = float(params.values["eps"])
    if len(weights) == 1:
        for _, inputs in blocks():
            yield split_base(inputs, params)[1][0]
        return

    def coefficients_of(gram: np.ndarray) -> np.ndarray:
        return geometry.multislerp_coefficients(gram, weights, eps)

    yield from gram_combination(blocks, _around_base(params), coefficients_of, "tensor")


def karcher(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """The Karcher (Riemannian) mean of the inputs' directions on the unit sphere, equal weights, scaled by their
    mean norm (mergekit's karcher: `max_iter` steps of the fixed-point iteration, stopping below `tol`). The base
    model, when given, is one more input, as in mergekit.

    The running mean always lies in the span of the unit inputs, so the iteration runs on its N coefficients with
    the inputs' Gram matrix: one pass to sum it, one to write the result, never a whole tensor in memory."""
    max_iter = int(params.values["max_iter"])
    tol = float(params.values["tol"])

    def coefficients_of(gram: np.ndarray) -> np.ndarray:
        return geometry.karcher_coefficients(gram, max_iter, tol)

    return gram_combination(blocks, lambda inputs: (None, [x.double() for x in inputs]), coefficients_of, "tensor")
