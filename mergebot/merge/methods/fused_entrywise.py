"""NearSwap, RAM, RAM+ and SCE as fused loops over the inputs' bits (`mergebot.merge.kernels_geometric`), each block
split across the merge's threads. Counts, cuts and sums are the torch definitions' (`fusion`, `ram`, `sce`, through
`entrywise`), so the output bytes are the same."""

import threading
from collections.abc import Callable, Iterator
from functools import cache, partial
from types import ModuleType

import numpy as np

from mergebot.merge.methods.base import RawBlocks, TensorParams
from mergebot.merge.methods.entrywise import NEARSWAP_MIN_DISTANCE, SCE_DIVISOR_MIN, ramplus_scales, sce_weights
from mergebot.merge.methods.shared import DOT_SPAN, histogram_pick, in_order
from mergebot.merge.threads import each_range, split

BUCKETS = 1 << 16
SELECT_ALL, SELECT_TOP, SELECT_NONE = 0, 1, 2
"""What SCE's selection keeps (`kernels_geometric.sce`)."""


@cache
def _loops() -> ModuleType:
    """The compiled loops, imported on first use (as `fused._loops`)."""
    from mergebot.merge import kernels_entrywise

    return kernels_entrywise


def _written(blocks: RawBlocks, raw: np.ndarray, loop: Callable, *settings: object) -> np.ndarray:
    """A block's output from `loop(raw, shift, lo, hi, *settings, out, out_shift)`, its range split over threads."""
    out = np.empty(raw.shape[1], blocks.output_bits)
    each_range(lambda lo, hi: loop(raw, blocks.shift, lo, hi, *settings, out[lo:hi], blocks.output_shift), out.size)
    return out


def fused_nearswap(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    t, floor = np.float32(params.values["t"]), np.float32(NEARSWAP_MIN_DISTANCE)
    for _, raw in blocks():
        yield _written(blocks, raw, _loops().nearswap, t, floor)


def fused_ram(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    epsilon = np.float32(params.values["epsilon"])
    scales = np.ones(len(params.per_model), np.float32)
    for _, raw in blocks():
        yield _written(blocks, raw, _loops().ram, epsilon, scales)


def fused_ramplus_tl(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    epsilon, r, alpha = (float(params.values[name]) for name in ("epsilon", "r", "alpha"))
    counts = np.zeros((len(params.per_model), 2), np.int64)
    for _, raw in blocks():
        for part in each_range(partial(_count_changes, blocks.shift, raw, np.float32(epsilon)), raw.shape[1]):
            counts += part
    scales = np.array(ramplus_scales(list(counts[:, 0]), list(counts[:, 1]), epsilon, r, alpha), np.float32)
    for _, raw in blocks():
        yield _written(blocks, raw, _loops().ram, np.float32(epsilon), scales)


def _count_changes(shift: int, raw: np.ndarray, epsilon: np.float32, lo: int, hi: int) -> np.ndarray:
    return _loops().ram_counts(raw, shift, lo, hi, epsilon)


def _equal_at(shift: int, raw: np.ndarray, threshold: int, lo: int, hi: int) -> int:
    return _loops().variance_equal(raw, shift, lo, hi, threshold)


class _Selection:
    """SCE's keep: the variances above the cut, and the first `equal` at it in flat order (−1: every one)."""

    def __init__(self, kind: int, threshold: int = 0, equal: int = -1) -> None:
        self.kind, self.threshold, self.equal = kind, threshold, equal

    def allowances(self, blocks: RawBlocks, raw: np.ndarray, remaining: list[int]) -> list[int]:
        """How many entries at the cut each thread's range of this block keeps; `remaining` carries on."""
        ranges = split(raw.shape[1])
        if self.kind != SELECT_TOP or self.equal < 0:
            return [-1] * len(ranges)
        found = each_range(partial(_equal_at, blocks.shift, raw, self.threshold), raw.shape[1])
        allow = []
        for count in found:
            allow.append(min(count, remaining[0]))
            remaining[0] -= allow[-1]
        return allow


def _variance_cut(blocks: RawBlocks, select_topk: float) -> _Selection:
    """The int(select_topk × non-zero count) largest variances across the models (`sce._variance_cut`)."""

    def histogram(bucket: int) -> tuple[np.ndarray, int]:
        per_thread: dict[int, np.ndarray] = {}
        nonzero = 0
        for _, raw in blocks():
            for found in each_range(partial(_histogram, blocks.shift, raw, bucket, per_thread), raw.shape[1]):
                nonzero += found
        return sum(per_thread.values(), np.zeros(BUCKETS, np.int64)), nonzero

    high, nonzero = histogram(-1)
    wanted = int(nonzero * select_topk)
    if wanted <= 0:
        return _Selection(SELECT_NONE)
    bucket, above_bucket = histogram_pick(high, wanted)
    low, _ = histogram(bucket)
    low_bits, above_low = histogram_pick(low, wanted - above_bucket)
    keep_equal = wanted - above_bucket - above_low
    equal = int(low[low_bits])
    return _Selection(SELECT_TOP, (bucket << 16) | low_bits, -1 if keep_equal >= equal else keep_equal)


def _histogram(shift: int, raw: np.ndarray, bucket: int, per_thread: dict, lo: int, hi: int) -> int:
    """Counts into this thread's own histogram (integer sums: the total does not depend on who counted what)."""
    part = per_thread.get(threading.get_ident())
    if part is None:
        part = per_thread[threading.get_ident()] = np.zeros(BUCKETS, np.int64)
    return _loops().variance_histogram(raw, shift, lo, hi, bucket, part)


def fused_sce(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    models = len(params.per_model)
    select_topk = float(params.values["select_topk"])
    selection = _variance_cut(blocks, select_topk) if select_topk < 1.0 else _Selection(SELECT_ALL)
    squares = np.zeros(models)
    numel = 0
    remaining = [selection.equal]
    for _, raw in blocks():
        numel += raw.shape[1]
        spans = np.zeros((models, -(-raw.shape[1] // DOT_SPAN)))
        _sce_block(blocks, raw, selection, remaining, np.zeros(models, np.float32), None, spans)
        squares += in_order(spans.T)
    weights = np.array(sce_weights([float(total) for total in squares], numel), np.float32)
    remaining = [selection.equal]
    nothing = np.zeros((models, 0))
    for _, raw in blocks():
        out = np.empty(raw.shape[1], blocks.output_bits)
        _sce_block(blocks, raw, selection, remaining, weights, out, nothing)
        yield out


def _sce_block(
    blocks: RawBlocks,
    raw: np.ndarray,
    selection: _Selection,
    remaining: list[int],
    weights: np.ndarray,
    out: np.ndarray | None,
    spans: np.ndarray,
) -> None:
    allowed = dict(zip(split(raw.shape[1]), selection.allowances(blocks, raw, remaining), strict=True))
    sink = np.empty(0, blocks.output_bits) if out is None else out

    def work(lo: int, hi: int) -> None:
        _loops().sce(
            raw, blocks.shift, lo, hi, selection.kind, selection.threshold, allowed[lo, hi], weights,
            np.float32(SCE_DIVISOR_MIN), sink[lo:hi] if out is not None else sink, blocks.output_shift,
            spans[:, lo // DOT_SPAN :],
        )  # fmt: skip

    each_range(work, raw.shape[1])
