"""TIES's and Breadcrumbs' magnitude cuts for the fused loops: the exact k-th largest |delta| of a whole tensor, and
which of the entries equal to it are kept (the first ones in flat order), as `sparsify.TopKMask` defines them.

A sample of the first block guesses each cut; one pass then counts exactly the entries above a window around the
guess, keeps the few inside it, and counts where the entries equal to the guess lie. When the cut lies in the
window (the usual case) that pass is all it takes, where its equal entries lie included; when it does not, two
histogram passes find it as before (the sample only chooses where to look first, never the result).
"""

import math
import threading
from functools import partial

import numpy as np

from mergebot.merge.methods.base import RawBlocks, TensorParams
from mergebot.merge.methods.shared import histogram_pick, magnitude_ks, outlier_ks
from mergebot.merge.threads import each_range, split

BUCKETS = 1 << 16
WHOLE = -1
NOTHING = 0x7FFFFFFF
"""A cut no |delta| bit pattern is above; counted with nothing to keep at it, it keeps nothing."""
SAMPLE = 1 << 16
"""Entries of the first block the guess is made from."""
WINDOW_DEVIATIONS = 5
"""How wide the window around a guess is, in standard deviations of the sample's count above the guess."""
ROOM_FRACTION = 8
"""Room for candidates: an eighth of the entries (more than that in the window, and the cut is found without it)."""


def _loops():  # the compiled loops, imported on first use (see `fused._loops`)
    from mergebot.merge import kernels

    return kernels


def _window_loops():
    from mergebot.merge import kernels_topk

    return kernels_topk


class Cuts:
    """Per model up to two magnitude cuts (bit pattern, how many equal entries it keeps), and for each cut that
    leaves some equal entries out, where the last kept one lies: found by counting during the pass that writes
    (`counted`), or already known as (SUB-element chunk of the tensor, equal entries kept in it) (`chunked`)."""

    def __init__(self, models: int) -> None:
        self.thresholds = np.full((models, 2), WHOLE, np.int64)
        self.keep_equal = np.zeros((models, 2), np.int64)
        self.counted: list[tuple[int, int]] = []
        self.chunked: dict[tuple[int, int], tuple[int, int]] = {}

    def set(self, model: int, slot: int, cut: tuple) -> None:
        threshold, above, k, equal, chunk_counts = cut
        self.thresholds[model, slot] = threshold
        keep = self.keep_equal[model, slot] = max(0, k - above)
        if equal <= keep:
            return
        if chunk_counts is None:
            self.counted.append((model, slot))
            return
        chunk = int(np.searchsorted(np.cumsum(chunk_counts), keep, side="right"))
        self.chunked[model, slot] = (chunk, keep - int(chunk_counts[:chunk].sum()))

    def limits(self, blocks: RawBlocks, raw: np.ndarray, first_chunk: int, remaining: np.ndarray) -> np.ndarray:
        """For each cut, the block index from which entries equal to it are left out (see `kernels._keep_top`).
        `first_chunk`: the block's first SUB-element chunk in the tensor; `remaining`: per counted cut, the equal
        entries still to keep (carried from block to block)."""
        sub = _loops().SUB
        limits = np.full(self.thresholds.shape, raw.shape[1], np.int64)
        for (model, slot), (chunk, quota) in self.chunked.items():
            if chunk < first_chunk:
                limits[model, slot] = 0
            elif chunk < first_chunk + -(-raw.shape[1] // sub):
                lo = (chunk - first_chunk) * sub
                hi = min(lo + sub, raw.shape[1])
                threshold = int(self.thresholds[model, slot])
                limits[model, slot] = _loops().nth_equal(raw, blocks.shift, lo, hi, model, threshold, quota)
        if self.counted:
            _counted_limits(blocks, raw, self, remaining, limits)
        return limits


def magnitude_cuts(blocks: RawBlocks, params: TensorParams, cuts: Cuts, outliers: bool) -> None:
    """TIES's cut of each pruned model (Breadcrumbs': the two cuts of its band) into `cuts`."""
    densities = [float(p.get("density", 1.0)) for p in params.per_model]
    if outliers:
        sparse, choose_ks = outlier_ks(densities, [float(p["gamma"]) for p in params.per_model])
        listed = [index for index in sparse for _ in range(2)]
    else:
        sparse, choose_ks = magnitude_ks(densities)
        listed = sparse
    if not sparse:
        return
    numel = int(np.prod(blocks.shape))
    wanted = choose_ks(numel)
    found = top_cuts(blocks, listed, [max(1, k) for k in wanted])
    for number, (model, want, cut) in enumerate(zip(listed, wanted, found, strict=True)):
        slot = number % 2 if outliers else 0
        if want > 0:
            cuts.set(model, slot, cut)
        elif outliers and slot == 0:
            cuts.thresholds[model, 0] = NOTHING
            cuts.counted.append((model, 0))
    if outliers:
        for model in sparse:
            if cuts.thresholds[model, 0] == NOTHING:
                cuts.thresholds[model, 1] = WHOLE


def top_cuts(blocks: RawBlocks, models: list[int], ks: list[int]) -> list[tuple]:
    """(threshold bits, entries above it, k, entries equal to it, equal entries per SUB-element chunk or None) of
    each listed model's |delta|: the exact k-th largest."""
    numel = int(np.prod(blocks.shape))
    window = _Window(blocks, models, ks, numel)
    found = window.count() if numel < 1 << 31 else [None] * len(models)
    missed = [slot for slot, cut in enumerate(found) if cut is None]
    if missed:
        exact = exact_cuts(blocks, [models[slot] for slot in missed], [ks[slot] for slot in missed])
        for slot, cut in zip(missed, exact, strict=True):
            found[slot] = cut
    return found


class _Window:
    """The guess of each cut from a sample of the first block, and the one pass that counts around it."""

    def __init__(self, blocks: RawBlocks, models: list[int], ks: list[int], numel: int) -> None:
        self.blocks, self.models, self.ks, self.numel = blocks, models, ks, numel
        self.slots = np.array(models, np.int64)
        self.guesses = np.zeros(len(models), np.int64)
        self.bottoms = np.zeros(len(models), np.int64)
        self.tops = np.zeros(len(models), np.int64)

    def count(self) -> list[tuple | None]:
        sub = _loops().SUB
        above = np.zeros(len(self.models), np.int64)
        candidates: list[list[tuple[np.ndarray, np.ndarray] | None]] = [[] for _ in self.models]
        equal_parts = []
        first_chunk = 0
        for number, (_, raw) in enumerate(self.blocks()):
            if number == 0:
                self._guess(raw)
            equal = np.zeros((len(self.models), -(-raw.shape[1] // sub)), np.int64)
            loop = partial(self._range, raw, equal, first_chunk)
            for part_above, found, room, chunks in each_range(loop, raw.shape[1]):
                above += part_above
                for slot, kept in enumerate(candidates):
                    fits = found[slot] <= room.shape[1]
                    kept.append((room[slot, : found[slot]], chunks[slot, : found[slot]]) if fits else None)
            equal_parts.append(equal)
            first_chunk += equal.shape[1]
        equal_chunks = np.concatenate(equal_parts, axis=1)
        return [
            None if any(part is None for part in kept) else self._pick(slot, int(above[slot]), kept, equal_chunks[slot])
            for slot, kept in enumerate(candidates)
        ]

    def _range(self, raw: np.ndarray, equal: np.ndarray, first_chunk: int, lo: int, hi: int) -> tuple:
        """This range's counts (integer sums: the totals do not depend on who counted what) and candidates."""
        sub = _loops().SUB
        above = np.zeros(len(self.models), np.int64)
        found = np.zeros(len(self.models), np.int64)
        room = np.empty((len(self.models), (hi - lo) // ROOM_FRACTION + sub), np.uint32)
        chunks = np.empty(room.shape, np.int64)
        _window_loops().window_counts(
            raw, self.blocks.shift, lo, hi, self.slots, self.bottoms, self.tops, self.guesses, above,
            equal[:, lo // sub :], first_chunk + lo // sub, room, chunks, found,
        )  # fmt: skip
        return above, found, room, chunks

    def _guess(self, raw: np.ndarray) -> None:
        """Each cut's guess, the same fraction of a sample of evenly spaced entries of the first block, and a window
        around it some standard deviations of the sample's rank wide."""
        step = max(1, raw.shape[1] // SAMPLE)
        values = (raw[:, ::step].astype(np.uint32) << np.uint32(self.blocks.shift)).view(np.float32)
        for slot, (model, k) in enumerate(zip(self.models, self.ks, strict=True)):
            magnitudes = (values[model + 1] - values[0]).view(np.uint32) & np.uint32(0x7FFFFFFF)
            size, share = len(magnitudes), k / self.numel
            rank = size - round(share * size)
            margin = int(WINDOW_DEVIATIONS * math.sqrt(size * share * (1 - share))) + 16
            ranks = {min(size - 1, max(0, rank + offset)) for offset in (-margin, 0, margin)}
            magnitudes = np.partition(magnitudes, sorted(ranks))
            self.guesses[slot] = magnitudes[min(size - 1, max(0, rank))]
            self.bottoms[slot] = magnitudes[max(0, rank - margin)] if rank - margin > 0 else 0
            self.tops[slot] = magnitudes[rank + margin] if rank + margin < size else NOTHING

    def _pick(self, slot: int, above: int, kept: list, equal_chunks: np.ndarray) -> tuple | None:
        """The cut from the counts around the guess, or None when it lies outside the window."""
        k, guess, equal = self.ks[slot], int(self.guesses[slot]), int(equal_chunks.sum())
        candidates = np.concatenate([values for values, _ in kept])
        if above >= k or above + len(candidates) + equal < k:
            return None
        higher = candidates[candidates > guess]
        if above + len(higher) < k <= above + len(higher) + equal:
            return guess, above + len(higher), k, equal, equal_chunks
        if k <= above + len(higher):
            rank = len(higher) - (k - above)
            threshold = int(np.partition(higher, rank)[rank])
        else:
            lower = candidates[candidates < guess]
            rank = len(lower) - (k - above - len(higher) - equal)
            threshold = int(np.partition(lower, rank)[rank])
        above_threshold = above + int((candidates > threshold).sum()) + (equal if guess > threshold else 0)
        chunks = np.concatenate([where for _, where in kept])[candidates == threshold]
        equal_threshold = np.bincount(chunks, minlength=len(equal_chunks))
        return threshold, above_threshold, k, int(equal_threshold.sum()), equal_threshold


def exact_cuts(blocks: RawBlocks, models: list[int], ks: list[int]) -> list[tuple]:
    """The cuts without a guess: a histogram of the high 16 bits finds each one's bucket, a second of the low 16
    bits inside that bucket the exact value."""
    slots = np.array(models, np.int64)

    def histogram(buckets: np.ndarray) -> np.ndarray:
        per_thread: dict[int, np.ndarray] = {}
        for _, raw in blocks():
            each_range(partial(_histogram, blocks.shift, raw, slots, buckets, per_thread), raw.shape[1])
        return sum(per_thread.values(), np.zeros((len(models), BUCKETS), np.int64))

    high = histogram(np.full(len(models), -1, np.int64))
    picks = [histogram_pick(high[slot], k) for slot, k in enumerate(ks)]
    low = histogram(np.array([bucket for bucket, _ in picks], np.int64))
    cuts = []
    for slot, (k, (bucket, above_bucket)) in enumerate(zip(ks, picks, strict=True)):
        low_bits, above_low = histogram_pick(low[slot], k - above_bucket)
        cuts.append(((bucket << 16) | low_bits, above_bucket + above_low, k, int(low[slot, low_bits]), None))
    return cuts


def _histogram(
    shift: int, raw: np.ndarray, slots: np.ndarray, buckets: np.ndarray, per_thread: dict, lo: int, hi: int
) -> None:
    """Counts into this thread's own histogram (integer sums: the total does not depend on who counted what)."""
    part = per_thread.get(threading.get_ident())
    if part is None:
        part = per_thread[threading.get_ident()] = np.zeros((len(slots), BUCKETS), np.int64)
    _loops().magnitude_histogram(raw, shift, lo, hi, slots, buckets, part)


def _count(shift: int, raw: np.ndarray, slots: np.ndarray, thresholds: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return _loops().count_at(raw, shift, lo, hi, slots, thresholds)


def _counted_limits(blocks: RawBlocks, raw: np.ndarray, cuts: Cuts, remaining: np.ndarray, limits: np.ndarray) -> None:
    """The limits of the counted cuts: none where no equal entry is left out; else after the first `remaining` of
    them, in flat order (`remaining` carries over to the next block)."""
    counting = []
    for model, slot in cuts.counted:
        if remaining[model, slot] <= 0:
            limits[model, slot] = 0
        else:
            counting.append((model, slot))
    if not counting:
        return
    slots = np.array([model for model, _ in counting], np.int64)
    thresholds = np.array([cuts.thresholds[model, slot] for model, slot in counting], np.int64)
    ranges = split(raw.shape[1])
    counts = each_range(partial(_count, blocks.shift, raw, slots, thresholds), raw.shape[1])
    for number, (model, slot) in enumerate(counting):
        for (lo, hi), found in zip(ranges, counts, strict=True):
            left = remaining[model, slot]
            if 0 < left < found[number]:
                threshold = int(thresholds[number])
                limits[model, slot] = _loops().nth_equal(raw, blocks.shift, lo, hi, model, threshold, left)
            elif 0 < left == found[number]:
                limits[model, slot] = hi
            remaining[model, slot] = left - found[number]
