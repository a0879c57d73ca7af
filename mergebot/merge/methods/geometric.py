"""Merges defined by angles and norms: Model Stock, NuSLERP, Multi-SLERP and the Karcher mean (mergekit's definitions).

Every one is a linear combination of its inputs with coefficients from their inner products, computed by
`gram.gram_combination` in two streamed passes (see there for why float64).
"""

import math
from collections.abc import Iterator

import torch

from mergebot.config.methods import interface
from mergebot.merge.methods.base import Block, BlockSource, MergeMethod, TensorParams, model_weights, split_base
from mergebot.merge.methods.gram import Axis, VectorsOf, diagonal, gram_combination

STOCK_NORM_FLOOR = 1e-6
STOCK_SINGULAR = 1e-6
NUSLERP_NORM_FLOOR = 1e-7
NUSLERP_COLINEAR = 1e-16
"""1 − cos² at or below this is colinear: mergekit's eps² with eps = 1e-8."""
NUSLERP_ZERO_TOTAL = 1e-6
WEIGHT_SUM_EPS = 1e-8


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
    count = len(params.per_model)
    first, second = torch.triu_indices(count, count, 1)

    def coefficients_of(gram: torch.Tensor) -> torch.Tensor:
        norms = diagonal(gram).sqrt()
        scale = (norms[..., first] * norms[..., second]).clamp(min=STOCK_NORM_FLOOR)
        cos = (gram[..., first, second] / scale).clamp(-1.0, 1.0).mean(-1)
        denominator = 1 + (count - 1) * cos
        singular = denominator.abs() < STOCK_SINGULAR
        t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
        return (t / count).unsqueeze(-1).expand(*t.shape, count)

    return gram_combination(blocks, _deltas, coefficients_of, axis)


def nuslerp(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """NuSLERP (mergekit): spherical interpolation of two models at t = w₂ / (w₁ + w₂) (0.5 when the weights sum to
    ~0), of their deltas from the base when there is one; the vectors are the whole tensor (`nuslerp_flatten`), its
    columns (`nuslerp_row_wise`) or its rows. Colinear vectors (1 − cos² ≤ 1e-16) are interpolated linearly."""
    first, second = model_weights(params)
    t = 0.5 if abs(first + second) < NUSLERP_ZERO_TOTAL else second / (first + second)
    if params.values["nuslerp_flatten"]:
        axis: Axis = "tensor"
    else:
        axis = "columns" if params.values["nuslerp_row_wise"] else "rows"

    def coefficients_of(gram: torch.Tensor) -> torch.Tensor:
        norms = diagonal(gram).sqrt().clamp(min=NUSLERP_NORM_FLOOR)
        cos = (gram[..., 0, 1] / (norms[..., 0] * norms[..., 1])).clamp(-1.0, 1.0)
        colinear = 1 - cos.square() <= NUSLERP_COLINEAR
        theta = torch.acos(torch.where(colinear, 0.0, cos))
        sin_theta = torch.where(colinear, 1.0, torch.sin(theta))
        to_first = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        to_second = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
        return torch.stack([to_first, to_second], -1)

    return gram_combination(blocks, _around_base(params), coefficients_of, axis)


def multislerp(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """Multi-SLERP (Goddard, "multislerp"): the weighted mean of the unit vectors (deltas from the base when there is
    one) mapped back to the sphere, scaled by the weighted mean norm; the whole tensor is one vector.

    mergekit takes the tangent space at that weighted mean and maps the weighted tangent sum back with the
    exponential map, but the weighted sum of the tangent vectors is exactly zero there (Σ wᵢ(uᵢ − (uᵢ·m̂)m̂) =
    m − |m|m̂ = 0), so the result is cos(eps)·m̂·Σ wᵢ|vᵢ|; mergekit adds the float32 rounding of that zero (≈1e-7
    relative), mergebot computes the exact value. A weighted mean of norm below eps (opposed vectors, or all deltas
    zero) falls back to the weighted sum of the vectors for any number of models (mergekit: for two, else error)."""
    weights = torch.tensor(model_weights(params), dtype=torch.float64)
    if params.values["normalize_weights"]:
        weights = weights / weights.sum()
    eps = float(params.values["eps"])
    if len(weights) == 1:
        for _, inputs in blocks():
            yield split_base(inputs, params)[1][0]
        return

    def coefficients_of(gram: torch.Tensor) -> torch.Tensor:
        norms = diagonal(gram).sqrt()
        to_units = weights / (norms + eps)
        mean_norm = max(0.0, float(to_units @ gram @ to_units)) ** 0.5
        if mean_norm < eps:
            return weights
        return to_units * (float(weights @ norms) * math.cos(eps) / mean_norm)

    yield from gram_combination(blocks, _around_base(params), coefficients_of, "tensor")


def _check_multislerp(params: TensorParams) -> str | None:
    if float(params.values["eps"]) <= 0:
        return f"parameters.eps: {params.values['eps']} must be positive"
    if params.values["normalize_weights"] and abs(sum(model_weights(params))) < WEIGHT_SUM_EPS:
        return (
            f"parameters.weight: the weights sum to zero for tensor {params.tensor_name}, "
            "so normalize_weights cannot divide by them"
        )
    return None


def karcher(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """The Karcher (Riemannian) mean of the inputs' directions on the unit sphere, equal weights, scaled by their
    mean norm (mergekit's karcher: `max_iter` steps of the fixed-point iteration, stopping below `tol`). The base
    model, when given, is one more input, as in mergekit.

    The running mean always lies in the span of the unit inputs, so the iteration runs on its N coefficients with
    the inputs' Gram matrix: one pass to sum it, one to write the result, never a whole tensor in memory."""
    max_iter = int(params.values["max_iter"])
    tol = float(params.values["tol"])

    def coefficients_of(gram: torch.Tensor) -> torch.Tensor:
        return _karcher_coefficients(gram, max_iter, tol)

    return gram_combination(blocks, lambda inputs: (None, [x.double() for x in inputs]), coefficients_of, "tensor")


def _karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients on the raw inputs. Inputs of norm ≤ tol take no part in the direction; a point within tol of the
    running mean or of its antipode adds no tangent (there sin θ ≈ 0 leaves the direction undefined)."""
    count = len(gram)
    norms = diagonal(gram).sqrt()
    result = torch.zeros(count, dtype=torch.float64)
    if count == 1:
        return result + 1.0
    valid = torch.nonzero(norms > tol).flatten()
    if len(valid) == 0:
        return result
    units = gram[valid][:, valid] / torch.outer(norms[valid], norms[valid])
    alphas = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def norm(coefficients: torch.Tensor) -> float:
        return max(0.0, float(coefficients @ units @ coefficients)) ** 0.5

    mean = alphas.clone()
    mean_norm = norm(mean)
    mean = torch.eye(len(valid), dtype=torch.float64)[0] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        theta = torch.acos(dots)
        counted = (theta >= tol) & (math.pi - theta >= tol)
        pull = torch.where(counted, alphas * theta / torch.where(counted, torch.sin(theta), 1.0), 0.0)
        tangent = pull - float(pull @ dots) * mean
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) / tangent_norm * tangent
        mean_norm = norm(mean)
        if mean_norm > tol:
            mean = mean / mean_norm
    result[valid] = float(norms.mean()) * mean / norms[valid]
    return result


def _check_karcher(params: TensorParams) -> str | None:
    max_iter, tol = params.values["max_iter"], params.values["tol"]
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 0:
        return f"parameters.max_iter: {max_iter} must be a whole number ≥ 0"
    if float(tol) <= 0:
        return f"parameters.tol: {tol} must be positive"
    return None


GEOMETRIC_METHODS = (
    MergeMethod("model_stock", model_stock, **interface("model_stock").fields()),
    MergeMethod("nuslerp", nuslerp, **interface("nuslerp").fields()),
    MergeMethod("multislerp", multislerp, **interface("multislerp").fields(), check=_check_multislerp),
    MergeMethod("karcher", karcher, **interface("karcher").fields(), check=_check_karcher),
)
