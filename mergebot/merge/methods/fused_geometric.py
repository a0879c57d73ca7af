"""Model Stock, NuSLERP, Multi-SLERP and the Karcher mean as fused loops over the inputs' bits
(`mergebot.merge.kernels_geometric`): one pass sums the Gram matrix (in the grid and order `geometry` fixes), a
second writes offset + Σ cᵢ·vᵢ, each block split across the merge's threads. The coefficients come from the same
numpy functions as the torch definitions' (`geometric`), so the output bytes are the same."""

from collections.abc import Callable, Iterator
from functools import cache, partial
from types import ModuleType

import numpy as np

from mergebot.merge.methods import geometry
from mergebot.merge.methods.base import RawBlocks, TensorParams, model_weights
from mergebot.merge.methods.geometry import Axis, grid_rows, in_sequence, pair_sums_to_gram
from mergebot.merge.threads import each_range

Coefficients = Callable[[np.ndarray], np.ndarray]


@cache
def _loops() -> ModuleType:
    """The compiled loops, imported on first use (as `fused._loops`)."""
    from mergebot.merge import kernels_geometric

    return kernels_geometric


def _offset(raw: np.ndarray, models: int | None) -> bool:
    """Whether the first input is the base the vectors are taken from (their deltas): `models` counts the inputs
    that are not, None when every input is a vector (karcher)."""
    return models is not None and raw.shape[0] > models


def _vector_count(raw: np.ndarray, offset: bool) -> int:
    return raw.shape[0] - (1 if offset else 0)


def _chunk_sums(blocks: RawBlocks, raw: np.ndarray, offset: bool, lo: int, hi: int, span: int) -> np.ndarray:
    """Pair sums of each `span` entries of the block's [lo, hi) (spans counted from lo), split over threads."""
    count = _vector_count(raw, offset)
    sums = np.empty((-(-(hi - lo) // span), count * (count + 1) // 2))

    def work(a: int, b: int) -> None:
        _loops().gram_pairs(raw, blocks.shift, offset, lo + a, lo + b, span, sums[a // span :])

    each_range(work, hi - lo, align=span)
    return sums


def _tensor_gram(blocks: RawBlocks, models: int | None) -> np.ndarray:
    """The whole tensor's Gram matrix: each grid chunk's (a chunk cut by a block boundary is joined first), added
    in order."""
    chunk = grid_rows(blocks.row_elements) * blocks.row_elements
    parts: list[np.ndarray] = []
    pending: np.ndarray | None = None
    count = 0
    offset = False
    for _, raw in blocks():
        offset = _offset(raw, models)
        count = _vector_count(raw, offset)
        taken = 0
        if pending is not None:
            taken = min(chunk - pending.shape[1], raw.shape[1])
            pending = np.concatenate([pending, raw[:, :taken]], axis=1)
            if pending.shape[1] < chunk:
                continue
            parts.append(_chunk_sums(blocks, pending, offset, 0, chunk, chunk))
            pending = None
        whole = taken + (raw.shape[1] - taken) // chunk * chunk
        if whole > taken:
            parts.append(_chunk_sums(blocks, raw, offset, taken, whole, chunk))
        if whole < raw.shape[1]:
            pending = raw[:, whole:].copy()
    if pending is not None:
        parts.append(_chunk_sums(blocks, pending, offset, 0, pending.shape[1], chunk))
    return in_sequence(pair_sums_to_gram(np.concatenate(parts), count))


def _column_gram(blocks: RawBlocks, models: int | None) -> np.ndarray:
    """Each column's Gram matrix [columns, n, n]: per grid chunk of rows, the rows' products added in order, the
    chunks' sums added in order; the columns split over threads."""
    columns, step = blocks.row_elements, grid_rows(blocks.row_elements)
    total: np.ndarray | None = None
    local = np.zeros(0)
    filled = False
    count = 0
    for start, raw in blocks():
        offset = _offset(raw, models)
        count = _vector_count(raw, offset)
        if not filled:
            local = np.full((columns, count * (count + 1) // 2), -0.0)
        rows = raw.shape[1] // columns
        row = 0
        while row < rows:
            stop = min(rows, row + step - (start + row) % step)

            each_range(partial(_columns, blocks.shift, raw, offset, row, stop, local), columns)
            filled = True
            if (start + stop) % step == 0:
                total = local if total is None else total + local
                local, filled = np.full(local.shape, -0.0), False
            row = stop
    if filled:
        total = local if total is None else total + local
    assert total is not None
    return pair_sums_to_gram(total, count)


def _columns(
    shift: int, raw: np.ndarray, offset: bool, first: int, last: int, sums: np.ndarray, lo: int, hi: int
) -> None:
    _loops().gram_columns(raw, shift, offset, first, last, lo, hi, sums.shape[0], sums)


def _combined(blocks: RawBlocks, raw: np.ndarray, settings: tuple, out: np.ndarray, lo: int, hi: int) -> None:
    _loops().combine(raw, blocks.shift, *settings[:1], lo, hi, *settings[1:], out[lo:hi], blocks.output_shift)


def _gram_combination(blocks: RawBlocks, models: int | None, coefficients_of: Coefficients, axis: Axis) -> Iterator:
    """offset + Σᵢ cᵢ·vᵢ, as `gram.gram_combination` computes it (see `_offset` for `models`)."""
    if len(blocks.shape) == 1:
        axis = "tensor"
    kernels = _loops()
    coefficients = None
    if axis == "tensor":
        coefficients = np.ascontiguousarray(coefficients_of(_tensor_gram(blocks, models)), np.float64)[None]
        mode = kernels.TENSOR
    elif axis == "columns":
        coefficients = np.ascontiguousarray(coefficients_of(_column_gram(blocks, models)), np.float64)
        mode = kernels.COLUMNS
    else:
        mode = kernels.ROWS
    row_elements = blocks.row_elements
    for _, raw in blocks():
        offset = _offset(raw, models)
        weights = coefficients
        if weights is None:
            sums = _chunk_sums(blocks, raw, offset, 0, raw.shape[1], row_elements)
            gram = pair_sums_to_gram(sums, _vector_count(raw, offset))[:, None]
            weights = np.ascontiguousarray(coefficients_of(gram)[:, 0], np.float64)
        out = np.empty(raw.shape[1], blocks.output_bits)

        settings = (offset, mode, row_elements, weights)
        each_range(partial(_combined, blocks, raw, settings, out), out.size)
        yield out


def _copied(blocks: RawBlocks, linear: Callable, model: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    """The model's values as they are, in the output dtype (times 1 in the linear loop: exact)."""
    linear(model, blocks.shift, lo, hi, np.ones(1, np.float32), out[lo:hi], blocks.output_shift)


def fused_model_stock(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    axis: Axis = "rows" if params.values["filter_wise"] else "tensor"
    yield from _gram_combination(blocks, len(params.per_model), geometry.model_stock_coefficients, axis)


def fused_nuslerp(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    t = geometry.nuslerp_t(model_weights(params))
    axis = geometry.nuslerp_axis(params.values)
    yield from _gram_combination(
        blocks, len(params.per_model), lambda gram: geometry.nuslerp_coefficients(gram, t), axis
    )


def fused_multislerp(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    weights = geometry.multislerp_weights(model_weights(params), bool(params.values["normalize_weights"]))
    eps = float(params.values["eps"])
    if len(weights) == 1:
        from mergebot.merge.kernels import linear

        for _, raw in blocks():
            out = np.empty(raw.shape[1], blocks.output_bits)
            model = raw[-1:]
            each_range(partial(_copied, blocks, linear, model, out), out.size)
            yield out
        return
    yield from _gram_combination(
        blocks, len(params.per_model), lambda gram: geometry.multislerp_coefficients(gram, weights, eps), "tensor"
    )


def fused_karcher(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    max_iter, tol = int(params.values["max_iter"]), float(params.values["tol"])
    yield from _gram_combination(
        blocks, None, lambda gram: geometry.karcher_coefficients(gram, max_iter, tol), "tensor"
    )
