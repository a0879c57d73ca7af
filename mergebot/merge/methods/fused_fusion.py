"""Arcee Fusion on the fused path: its importance comes from numpy (`entrywise`, the same functions the torch
definition calls), row range by row range over each block's decoded bits, split across the merge's threads; the
quartiles are found by two histogram passes over the importance's order keys, as `topk.top_cuts` finds them."""

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np

from mergebot.merge.methods.base import RawBlocks, TensorParams
from mergebot.merge.methods.entrywise import (
    from_order_key,
    fusion_threshold,
    importance,
    order_keys,
    quartile_ks,
    row_divergence,
)
from mergebot.merge.methods.geometry import grid_rows
from mergebot.merge.methods.shared import histogram_pick
from mergebot.merge.threads import each_range

BUCKETS = 1 << 16


class _Importance:
    """A tensor's importance, block by block; each row's divergence (the costly part) is computed once, in the
    first pass, and kept (one float32 per row)."""

    def __init__(self, blocks: RawBlocks) -> None:
        self.blocks = blocks
        self.columns = blocks.shape[-1]
        self.divergences: dict[tuple[int, int], np.ndarray] = {}

    def values(self, start: int, raw: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(base, model, importance) of the block's rows [lo, hi), float32, [rows, columns]."""
        span = raw[:, lo * self.columns : hi * self.columns].astype(np.uint32) << np.uint32(self.blocks.shift)
        base, model = (row.view(np.float32).reshape(hi - lo, self.columns) for row in span)
        divergence = self.divergences.get((start, lo))
        if divergence is None:
            divergence = self.divergences[start, lo] = row_divergence(base, model)
        return base, model, importance(base, model, divergence)

    def ranges(self, start: int, raw: np.ndarray, work: Callable) -> list:
        """`work(start, raw, lo, hi)` over the block's rows, in ranges of about a grid chunk, split over threads."""
        rows = raw.shape[1] // self.columns
        step = grid_rows(self.columns)

        def chunked(lo: int, hi: int) -> list:
            return [work(start, raw, first, min(first + step, hi)) for first in range(lo, hi, step)]

        return [part for parts in each_range(chunked, rows, align=step) for part in parts]


def fused_arcee_fusion(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    measure = _Importance(blocks)

    def histogram(bucket: int, start: int, raw: np.ndarray, lo: int, hi: int) -> np.ndarray:
        keys = order_keys(measure.values(start, raw, lo, hi)[2]).reshape(-1)
        if bucket < 0:
            return np.bincount(keys >> 16, minlength=BUCKETS)
        return np.bincount(keys[(keys >> 16) == bucket] & 0xFFFF, minlength=BUCKETS)

    def counted(bucket: int) -> np.ndarray:
        total = np.zeros(BUCKETS, np.int64)
        for start, raw in blocks():
            for part in measure.ranges(start, raw, partial(histogram, bucket)):
                total += part
        return total

    high = counted(-1)
    ks = quartile_ks(int(high.sum()))
    picks = [histogram_pick(high, k) for k in ks]
    cuts = []
    for k, (bucket, above_bucket) in zip(ks, picks, strict=True):
        low_bits, _ = histogram_pick(counted(bucket), k - above_bucket)
        cuts.append(from_order_key((bucket << 16) | low_bits))
    threshold = fusion_threshold(*cuts)
    encode = _encoder()
    for start, raw in blocks():
        out = np.empty(raw.shape[1], blocks.output_bits)

        def chosen(start: int, raw: np.ndarray, lo: int, hi: int, out: np.ndarray = out) -> None:
            base, model, weight = measure.values(start, raw, lo, hi)
            values = np.where(weight >= threshold, model, base).reshape(-1)
            first = lo * measure.columns
            encode(values.view(np.uint32), out, first, values.size, blocks.output_shift)

        measure.ranges(start, raw, chosen)
        yield out


def _encoder() -> Callable:
    """The kernels' float32 → output bits (bfloat16 rounded to nearest even, as torch rounds), imported late: numba's
    import is costly."""
    from mergebot.merge.kernels import _encode

    return _encode
