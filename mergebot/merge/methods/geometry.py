"""What the angle-and-norm methods' torch definitions (`geometric`, `gram`) and their fused loops
(`fused_geometric`) both follow: the grid the Gram sums run on, the one order those sums take, and the coefficients
each method draws from the Gram matrix. numpy only, so a merge on the fused loops never imports torch.

The Gram matrix of a tensor is summed chunk by chunk of a fixed grid of rows (about GRID_ELEMENTS entries each,
counted from row 0); inside a chunk each entry adds its float64 products one after the other (flat order for the
whole tensor, row order for a column, element order along a row), and the chunks' matrices are added in order. So
the sums are the same bit for bit however the engine blocked the tensor and however many threads shared it.
"""

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from mergebot.merge.methods.base import TensorParams, model_weights

GRID_ELEMENTS = 1 << 16
Axis = Literal["tensor", "columns", "rows"]
"""Which entries form one vector: the whole flattened tensor; each column (along dim 0); each row (along the last
dim). A 1-D tensor is one vector whatever the axis."""

STOCK_NORM_FLOOR = 1e-6
STOCK_SINGULAR = 1e-6
NUSLERP_NORM_FLOOR = 1e-7
NUSLERP_COLINEAR = 1e-16
"""1 − cos² at or below this is colinear: mergekit's eps² with eps = 1e-8."""
NUSLERP_ZERO_TOTAL = 1e-6
WEIGHT_SUM_EPS = 1e-8


def grid_rows(row_elements: int) -> int:
    """Rows per chunk of the grid, for rows of `row_elements` entries."""
    return max(1, GRID_ELEMENTS // max(1, row_elements))


def pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The (i, j) with i ≤ j of a Gram matrix of `count` vectors, in the order the fused loops store them."""
    first, second = np.triu_indices(count)
    return first, second


def chunk_gram(vectors: np.ndarray, axis: Axis) -> np.ndarray:
    """The Gram matrices [..., n, n] of one chunk's float64 vectors [n, rows, ...], each entry's products added in
    order (a cumulative sum runs strictly in order). Leading dims as `gram_combination` broadcasts them."""
    count = vectors.shape[0]
    first, second = pairs(count)
    if axis == "tensor" or vectors.ndim <= 2:
        flat = vectors.reshape(count, -1)
        sums = np.cumsum(flat[first] * flat[second], axis=1)[:, -1]
    elif axis == "columns":
        sums = np.cumsum(vectors[first] * vectors[second], axis=1)[:, -1]
    else:
        sums = np.cumsum(vectors[first] * vectors[second], axis=-1)[..., -1]
    gram = np.empty((*sums.shape[1:], count, count))
    gram[..., first, second] = np.moveaxis(sums, 0, -1)
    gram[..., second, first] = gram[..., first, second]
    if axis == "rows" and vectors.ndim > 2:
        gram = np.expand_dims(gram, -3)
    return gram


def pair_sums_to_gram(sums: np.ndarray, count: int) -> np.ndarray:
    """Gram matrices [..., n, n] from the fused loops' pair sums [..., pairs]."""
    first, second = pairs(count)
    gram = np.empty((*sums.shape[:-1], count, count))
    gram[..., first, second] = sums
    gram[..., second, first] = sums
    return gram


def in_sequence(parts: np.ndarray) -> np.ndarray:
    """Chunks' Gram matrices [chunks, ...] added in order."""
    return np.cumsum(parts, axis=0)[-1]


def diagonal(gram: np.ndarray) -> np.ndarray:
    """The squared norms of the vectors, [..., n]."""
    return np.diagonal(gram, axis1=-2, axis2=-1)


def model_stock_coefficients(gram: np.ndarray) -> np.ndarray:
    """t / N for every delta, t = N·cos / (1 + (N−1)·cos), cos the mean pairwise cosine (0 where singular)."""
    count = gram.shape[-1]
    first, second = np.triu_indices(count, 1)
    norms = np.sqrt(diagonal(gram))
    scale = np.maximum(norms[..., first] * norms[..., second], STOCK_NORM_FLOOR)
    cos = np.clip(gram[..., first, second] / scale, -1.0, 1.0).mean(-1)
    denominator = 1 + (count - 1) * cos
    singular = np.abs(denominator) < STOCK_SINGULAR
    t = np.where(singular, 0.0, count * cos / np.where(singular, 1.0, denominator))
    return np.broadcast_to((t / count)[..., None], (*t.shape, count))


def nuslerp_t(weights: list[float]) -> float:
    first, second = weights
    return 0.5 if abs(first + second) < NUSLERP_ZERO_TOTAL else second / (first + second)


def nuslerp_axis(values: Mapping[str, Any]) -> Axis:
    if values["nuslerp_flatten"]:
        return "tensor"
    return "columns" if values["nuslerp_row_wise"] else "rows"


def nuslerp_coefficients(gram: np.ndarray, t: float) -> np.ndarray:
    """The two factors of a slerp at t between the vectors (of a lerp where they are colinear)."""
    norms = np.maximum(np.sqrt(diagonal(gram)), NUSLERP_NORM_FLOOR)
    cos = np.clip(gram[..., 0, 1] / (norms[..., 0] * norms[..., 1]), -1.0, 1.0)
    colinear = 1 - np.square(cos) <= NUSLERP_COLINEAR
    theta = np.arccos(np.where(colinear, 0.0, cos))
    sin_theta = np.where(colinear, 1.0, np.sin(theta))
    to_first = np.where(colinear, 1 - t, np.sin((1 - t) * theta) / sin_theta)
    to_second = np.where(colinear, t, np.sin(t * theta) / sin_theta)
    return np.stack([to_first, to_second], -1)


def multislerp_weights(weights: list[float], normalize: bool) -> np.ndarray:
    array = np.array(weights, np.float64)
    return array / array.sum() if normalize else array


def multislerp_coefficients(gram: np.ndarray, weights: np.ndarray, eps: float) -> np.ndarray:
    """The weighted mean of the unit vectors, on the sphere, times the weighted mean norm (see `multislerp`)."""
    norms = np.sqrt(diagonal(gram))
    to_units = weights / (norms + eps)
    mean_norm = max(0.0, float(to_units @ gram @ to_units)) ** 0.5
    if mean_norm < eps:
        return weights
    return to_units * (float(weights @ norms) * math.cos(eps) / mean_norm)


def multislerp_problem(params: TensorParams) -> str | None:
    values = params.values
    if float(values["eps"]) <= 0:
        return f"parameters.eps: {values['eps']} must be positive"
    if values["normalize_weights"] and abs(sum(model_weights(params))) < WEIGHT_SUM_EPS:
        return (
            f"parameters.weight: the weights sum to zero for tensor {params.tensor_name}, "
            "so normalize_weights cannot divide by them"
        )
    return None


def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """Coefficients on the raw inputs. Inputs of norm ≤ tol take no part in the direction; a point within tol of the
    running mean or of its antipode adds no tangent (there sin θ ≈ 0 leaves the direction undefined)."""
    count = len(gram)
    norms = np.sqrt(diagonal(gram))
    result = np.zeros(count)
    if count == 1:
        return result + 1.0
    valid = np.flatnonzero(norms > tol)
    if len(valid) == 0:
        return result
    units = gram[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])
    alphas = np.full(len(valid), 1.0 / len(valid))

    def norm(coefficients: np.ndarray) -> float:
        return max(0.0, float(coefficients @ units @ coefficients)) ** 0.5

    mean = alphas.copy()
    mean_norm = norm(mean)
    mean = np.eye(len(valid))[0] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        dots = np.clip(units @ mean, -1.0, 1.0)
        theta = np.arccos(dots)
        counted = (theta >= tol) & (math.pi - theta >= tol)
        pull = np.where(counted, alphas * theta / np.where(counted, np.sin(theta), 1.0), 0.0)
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


def karcher_problem(params: TensorParams) -> str | None:
    max_iter, tol = params.values["max_iter"], params.values["tol"]
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 0:
        return f"parameters.max_iter: {max_iter} must be a whole number ≥ 0"
    if float(tol) <= 0:
        return f"parameters.tol: {tol} must be positive"
    return None
