"""Linear, SLERP, passthrough and the task-arithmetic family as fused loops over the inputs' bits
(`mergebot.merge.kernels`), each block's elements split across the merge's threads. Every statistic, cut and
random draw is the one the torch method takes, so the output bytes are the same; the torch methods stay the
definition."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, partial
from types import ModuleType

import numpy as np

from mergebot.merge.methods.base import RawBlocks, TensorParams, model_weights
from mergebot.merge.methods.fused_topk import WHOLE, Cuts, magnitude_cuts
from mergebot.merge.methods.shared import (
    DIVISOR_EPS,
    DOT_SPAN,
    RESCALE_EPS,
    DrawGrid,
    in_order,
    slerp_scales,
)
from mergebot.merge.threads import each_range

KEEP_ALL, KEEP_TOP, KEEP_RANDOM, KEEP_RANKED, KEEP_MASK = 0, 1, 2, 3, 4
"""The kinds of pruning the task-arithmetic loop knows (`_loops().task_arithmetic`)."""


@cache
def _loops() -> ModuleType:
    """The compiled loops, imported on first use: numba's import costs about half a second, which a command that
    merges nothing, or merges only on the torch path, should not pay."""
    from mergebot.merge import kernels

    return kernels


@cache
def _draw_loops() -> ModuleType:
    """DARE's and DELLA's compiled loops, imported on first use (as `_loops`)."""
    from mergebot.merge import draws

    return draws


def _combined(blocks: RawBlocks, raw: np.ndarray, loop: Callable, *settings: object) -> np.ndarray:
    """A block's output from `loop(raw, shift, lo, hi, *settings, out, out_shift)`, its range split over threads."""
    out = np.empty(raw.shape[1], blocks.output_bits)
    each_range(lambda lo, hi: loop(raw, blocks.shift, lo, hi, *settings, out[lo:hi], blocks.output_shift), out.size)
    return out


def fused_linear(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    weights = model_weights(params)
    total = sum(weights) if params.values["normalize"] else 1.0
    scales = np.array([weight / total for weight in weights], np.float32)
    for _, raw in blocks():
        yield _combined(blocks, raw, _loops().linear, scales)


def fused_passthrough(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    """The input as it is, in the output dtype (times 1, as the linear loop computes it: exact)."""
    ones = np.ones(1, np.float32)
    for _, raw in blocks():
        yield _combined(blocks, raw, _loops().linear, ones)


def fused_slerp(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
    totals = np.zeros(3)
    for _, raw in blocks():
        spans = np.zeros((-(-raw.shape[1] // DOT_SPAN), 3))
        each_range(partial(_span_dots, blocks.shift, raw, spans), raw.shape[1])
        totals += in_order(spans)
    scale0, scale1 = (np.float32(s) for s in slerp_scales(float(params.values["t"]), totals))
    for _, raw in blocks():
        yield _combined(blocks, raw, _loops().slerp, scale0, scale1)


def _span_dots(shift: int, raw: np.ndarray, spans: np.ndarray, lo: int, hi: int) -> None:
    _loops().dots(raw, shift, lo, hi, spans[lo // DOT_SPAN :])


def _rank_length(blocks: RawBlocks) -> int:
    """How many entries DELLA ranks together: a matrix's row, a vector whole (it comes in one block)."""
    return blocks.row_elements if len(blocks.shape) > 1 else blocks.shape[0]


def _rank_chances(
    shift: int, raw: np.ndarray, row_elements: int, model: int, low: np.float32, step: np.float32,
    chances: np.ndarray, first_row: int, last_row: int,
) -> None:  # fmt: skip
    _draw_loops().rank_chances(raw, shift, first_row, last_row, row_elements, model, low, step, chances)


def _draws(blocks: RawBlocks, masks: list[DrawGrid | None], start: int, raw: np.ndarray) -> np.ndarray:
    """Each pruned model's uniform draws for this block: torch's, from the same grid of seeded chunks."""
    draws = np.empty((len(masks), raw.shape[1]), np.float32)  # only pruned models' rows are read
    row_elements = blocks.row_elements
    first, last = start * row_elements, start * row_elements + raw.shape[1]
    jobs = []
    for model, mask in enumerate(masks):
        if mask is None:
            continue
        chunk_elements = mask.chunk_rows(tuple(blocks.shape[1:])) * row_elements
        for chunk in range(first // chunk_elements, (last - 1) // chunk_elements + 1):
            lo, hi = max(first, chunk * chunk_elements), min(last, (chunk + 1) * chunk_elements)
            jobs.append((mask.chunk_seed(chunk), lo - chunk * chunk_elements, draws[model, lo - first : hi - first]))

    def draw(lo: int, hi: int) -> None:
        for seed, skip, out in jobs[lo:hi]:
            _draw_loops().uniform_draws(seed, skip, out.shape[0], out)

    each_range(draw, len(jobs), align=1)
    return draws


@dataclass
class _Combine:
    """One tensor's task-arithmetic settings, as the fused loop takes them."""

    blocks: RawBlocks
    weights: np.ndarray
    kind: int
    cuts: Cuts
    random: list[DrawGrid | None]
    density: np.ndarray
    epsilon: np.ndarray
    consensus: bool
    normalize: bool
    divisor: np.float32
    lam: np.float32
    scales: np.ndarray = field(init=False)
    masks: list[np.ndarray] = field(default_factory=list)
    """A random or ranked keep as the measuring pass drew it, one bit per entry and block, for the pass that
    writes (which then draws nothing)."""

    def __post_init__(self) -> None:
        self.scales = np.ones(len(self.weights), np.float32)

    def passes(self, l1: np.ndarray | None) -> Iterator[np.ndarray]:
        """Each block's output; or, with `l1`, nothing: the pruned deltas' L1 norms (before, after) are added, SUB
        elements at a time in order (the same sums for any number of threads)."""
        remaining = self.cuts.keep_equal.copy()
        nothing = np.zeros((len(self.weights), 0), np.float32)
        drawn = self.kind in (KEEP_RANDOM, KEEP_RANKED)
        kind = KEEP_MASK if drawn and self.masks else self.kind
        first_chunk = 0
        for number, (start, raw) in enumerate(self.blocks()):
            fresh = drawn and kind != KEEP_MASK
            draws = _draws(self.blocks, self.random, start, raw) if fresh else nothing
            chances = self._chances(raw) if fresh and self.kind == KEEP_RANKED else nothing
            masks = np.zeros((0, 0), np.uint8)
            if kind == KEEP_MASK:
                masks = self.masks[number]
            elif drawn and l1 is not None:
                masks = np.zeros((len(self.weights), -(-raw.shape[1] // 8)), np.uint8)
                self.masks.append(masks)
            limits = self.cuts.limits(self.blocks, raw, first_chunk, remaining)
            first_chunk += -(-raw.shape[1] // _loops().SUB)
            out = np.empty(raw.shape[1], self.blocks.output_bits)
            settings = (raw, kind, draws, chances, masks, limits, out, l1 is not None)
            parts = each_range(partial(self._range, *settings), out.size)
            if l1 is None:
                yield out
                continue
            spans = np.concatenate(parts, axis=1)
            l1 += np.cumsum(spans, axis=1)[:, -1]  # span by span in order, whatever the ranges were

    def _range(
        self,
        raw: np.ndarray,
        kind: int,
        draws: np.ndarray,
        chances: np.ndarray,
        masks: np.ndarray,
        limits: np.ndarray,
        out: np.ndarray,
        measure: bool,
        lo: int,
        hi: int,
    ) -> np.ndarray:
        spans = -(-(hi - lo) // _loops().SUB)
        part = np.zeros((len(self.weights), spans, 2) if measure else (0, 0, 2), np.float64)
        _loops().task_arithmetic(
            raw, self.blocks.shift, lo, hi, self.weights, kind, self.cuts.thresholds, limits, draws[:, lo:hi],
            self.density, chances[:, lo:hi], masks[:, lo // 8 :], self.scales, self.consensus, self.normalize,
            self.divisor, self.lam, out[lo:hi], self.blocks.output_shift, part,
        )  # fmt: skip
        return part

    def _chances(self, raw: np.ndarray) -> np.ndarray:
        """DELLA: each pruned model's keep chance of every entry of the block, by its magnitude's rank in its row."""
        row_elements = _rank_length(self.blocks)
        chances = np.empty((len(self.weights), raw.shape[1]), np.float32)  # only pruned models' rows are read
        rows = raw.shape[1] // row_elements
        for model, mask in enumerate(self.random):
            if mask is None:
                continue
            density, epsilon = float(self.density[model]), float(self.epsilon[model])
            low, step = np.float32(density - epsilon), np.float32(2 * epsilon / (row_elements - 1))
            loop = partial(_rank_chances, self.blocks.shift, raw, row_elements, model, low, step, chances[model])
            each_range(loop, rows, align=1)
        return chances


def make_fused_task_arithmetic(sparsify: str | None, consensus: bool) -> Callable[..., Iterator[np.ndarray]]:
    """`make_task_arithmetic(sparsify, consensus)` in fused loops, for no pruning, magnitude, random and outliers."""

    def merge(blocks: RawBlocks, params: TensorParams) -> Iterator[np.ndarray]:
        weights = model_weights(params)
        models, total = len(weights), sum(weights)
        combine = _Combine(
            blocks, np.array(weights, np.float32), KEEP_ALL, Cuts(models), [None] * models,
            np.ones(models, np.float32), np.zeros(models), consensus, bool(params.values["normalize"]),
            np.float32(total if abs(total) >= DIVISOR_EPS else 1.0), np.float32(params.values["lambda"]),
        )  # fmt: skip
        if sparsify in ("magnitude", "outliers"):
            combine.kind = KEEP_TOP
            magnitude_cuts(blocks, params, combine.cuts, outliers=sparsify == "outliers")
        elif sparsify in ("random", "magprune"):
            ranked = sparsify == "magprune" and _rank_length(blocks) > 1
            combine.kind = KEEP_RANKED if ranked else KEEP_RANDOM
            seed = int(params.values["seed"])
            for index, p in enumerate(params.per_model):
                density = float(p.get("density", 1.0))
                if density < 1.0:
                    combine.random[index] = DrawGrid(density, seed, params.tensor_name, index)
                    combine.density[index] = density
                    combine.epsilon[index] = float(p.get("epsilon", 0.0))
                    combine.cuts.thresholds[index, 0] = 0
        pruned = combine.cuts.thresholds[:, 0] != WHOLE
        if params.values.get("rescale") and pruned.any():
            l1 = np.zeros((models, 2), np.float64)
            for _ in combine.passes(l1):
                pass
            for model, (before, after) in enumerate(l1):
                if pruned[model] and before >= RESCALE_EPS and after >= RESCALE_EPS:
                    combine.scales[model] = before / after
        yield from combine.passes(None)

    return merge
