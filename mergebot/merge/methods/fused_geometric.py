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


def _tensor_gram(blocks: RawBlocks, offset: bool) -> np.ndarray:
    """The whole tensor's Gram matrix: each grid chunk's (a chunk cut by a block boundary is joined first), added
    in order."""
    chunk = grid_rows(blocks.row_elements) * blocks.row_elements
    parts: list[np.ndarray] = []
    pending: np.ndarray | None = None
    count = 0
    for _, raw in blocks():
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


def _column_gram(blocks: RawBlocks, offset: bool) -> np.ndarray:
    """Each column's Gram matrix [columns, n, n]: per grid chunk of rows, the rows' products added in order, the
    chunks' sums added in order; the columns split over threads."""
    columns, step = blocks.row_elements, grid_rows(blocks.row_elements)
    total: np.ndarray | None = None
    local = np.zeros(0)
    filled = False
    count = 0
    for start, raw in blocks():
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


def _gram_combination(blocks: RawBlocks, offset: bool, coefficients_of: Coefficients, axis: Axis) -> Iterator:
    """offset + Σᵢ cᵢ·vᵢ, as `gram.gram_combination` computes it."""
    if len(blocks.shape) == 1:
        axis = "tensor"
    kernels = _loops()
    coefficients = None
    if axis == "tensor":
        coefficients = np.ascontiguousarray(coefficients_of(_tensor_gram(blocks, offset)), np.float64)[None]
        mode = kernels.TENSOR
    elif axis == "columns":
        coefficients = np.ascontiguousarray(coefficients_of(_column_gram(blocks, offset)), np.float64)
        mode = kernels.COLUMNS
    else:
        mode = kernels.ROWS
    row_elements = blocks.row_elements
    for _, raw in blocks():
        weights = coefficients
        if weights is None:
            sums = _chunk_sums(blocks, raw, offset, 0, raw.shape[1], row_elements)
            gram = pair_sums_to_gram(sums, _vector_count(raw, offset))[:, None]
            weights = np.ascontiguousarray(coefficients_of(gram)[:, 0], np.float64)
        out = np.empty(raw.shape[1], blocks.output_bits)

        def work(lo: int, hi: int, raw: np.ndarray = raw, weights: np.ndarray = weights, out: np.ndarray = out) -> None:
            kernels.combine(
                raw, blocks.shift, offset, lo, hi, mode, row_elements, weights, out[lo:hi], blocks.output_shift
            )

        each_range(work, out.size)
        yield out


def _has_base(raw_rows: int, params: TensorParams) -> bool:
    return raw_rows > len(params.per_model)


def _first_rows(blocks: RawBlocks) -> int:
    return next(iter(blocks()))[1].shape[0]


def fused_model_stock(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    axis: Axis = "rows" if params.values["filter_wise"] else "tensor"
    yield from _gram_combination(blocks, True, geometry.model_stock_coefficients, axis)


def fused_nuslerp(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    t = geometry.nuslerp_t(model_weights(params))
    offset = _has_base(_first_rows(blocks), params)
    axis = geometry.nuslerp_axis(params.values)
    yield from _gram_combination(blocks, offset, lambda gram: geometry.nuslerp_coefficients(gram, t), axis)


def fused_multislerp(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    weights = geometry.multislerp_weights(model_weights(params), bool(params.values["normalize_weights"]))
    eps = float(params.values["eps"])
    offset = _has_base(_first_rows(blocks), params)
    if len(weights) == 1:
        from mergebot.merge.kernels import linear

        ones = np.ones(1, np.float32)
        row = 1 if offset else 0
        for _, raw in blocks():
            out = np.empty(raw.shape[1], blocks.output_bits)
            model = raw[row : row + 1]
            each_range(
                lambda lo, hi, m=model, o=out: linear(m, blocks.shift, lo, hi, ones, o[lo:hi], blocks.output_shift),
                out.size,
            )
            yield out
        return
    yield from _gram_combination(
        blocks, offset, lambda gram: geometry.multislerp_coefficients(gram, weights, eps), "tensor"
    )


def fused_karcher(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    max_iter, tol = int(params.values["max_iter"]), float(params.values["tol"])
    yield from _gram_combination(
        blocks, False, lambda gram: geometry.karcher_coefficients(gram, max_iter, tol), "tensor"
    )
