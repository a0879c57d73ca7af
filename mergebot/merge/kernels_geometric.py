"""Fused loops of the angle-and-norm methods (model_stock, nuslerp, multislerp, karcher) and of the entry-by-entry
ones (nearswap, ram, ramplus_tl, sce), compiled by numba as `kernels` is: the same operations in the same order as
their torch definitions, so the same bytes (tests/test_kernels_geometric.py).

Float32 definitions (nearswap, ram, sce) are followed in float32 with no fused multiply-add; the Gram sums and the
combinations run in float64, in the order `methods.geometry` fixes.
"""

import numpy as np

from mergebot.merge.kernels import SUB, _decode, _encode, _jit

TENSOR, ROWS, COLUMNS = 0, 1, 2
"""Which coefficients an entry takes in `combine`: the one set, its row's, its column's."""


@_jit
def _wide(scratch, offset, count, vectors):
    """The vectors of SUB entries in float64: every row, or (offset) the rows after the first minus it."""
    first = 1 if offset else 0
    base = scratch[0]
    for v in range(vectors.shape[0]):
        source = scratch[v + first]
        target = vectors[v]
        if offset:
            for i in range(count):
                target[i] = np.float64(source[i]) - np.float64(base[i])
        else:
            for i in range(count):
                target[i] = np.float64(source[i])


@_jit
def gram_pairs(raw, shift, offset, lo, hi, span, sums):
    """For each `span` entries of [lo, hi) (the last may be shorter), each pair i ≤ j's float64 products added in
    order from −0.0 (as a cumulative sum runs), into sums[span number, pair]. lo is a multiple of span from 0."""
    count_vectors = raw.shape[0] - (1 if offset else 0)
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    vectors = np.empty((count_vectors, SUB))
    pairs = count_vectors * (count_vectors + 1) // 2
    acc = np.empty(pairs)
    for first in range(lo, hi, span):
        last = min(first + span, hi)
        acc[:] = -0.0
        for start in range(first, last, SUB):
            count = min(SUB, last - start)
            _decode(raw, shift, start, count, scratch_bits)
            _wide(scratch, offset, count, vectors)
            for k in range(count):
                p = 0
                for i in range(count_vectors):
                    a = vectors[i, k]
                    for j in range(i, count_vectors):
                        acc[p] += a * vectors[j, k]
                        p += 1
        sums[(first - lo) // span, :] = acc


@_jit
def gram_columns(raw, shift, offset, rows_lo, rows_hi, lo, hi, row_elements, sums):
    """The pair products of columns [lo, hi) over the block's rows [rows_lo, rows_hi), added in row order onto
    sums[column, pair]."""
    count_vectors = raw.shape[0] - (1 if offset else 0)
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    vectors = np.empty((count_vectors, SUB))
    for row in range(rows_lo, rows_hi):
        for column in range(lo, hi, SUB):
            count = min(SUB, hi - column)
            _decode(raw, shift, row * row_elements + column, count, scratch_bits)
            _wide(scratch, offset, count, vectors)
            for k in range(count):
                target = sums[column + k]
                p = 0
                for i in range(count_vectors):
                    a = vectors[i, k]
                    for j in range(i, count_vectors):
                        target[p] += a * vectors[j, k]
                        p += 1


@_jit
def combine(raw, shift, offset, lo, hi, mode, row_elements, coefficients, out, out_shift):
    """offset + Σᵢ cᵢ·vᵢ in float64 (0 + … without an offset), rounded to float32 once; cᵢ from coefficients[k]
    with k 0, the entry's row in the block, or its column (`mode`)."""
    count_vectors = raw.shape[0] - (1 if offset else 0)
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    vectors = np.empty((count_vectors, SUB))
    result = np.empty(SUB, np.float32)
    result_bits = result.view(np.uint32)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _wide(scratch, offset, count, vectors)
        base = scratch[0]
        for i in range(count):
            flat = start + i
            k = 0 if mode == TENSOR else (flat // row_elements if mode == ROWS else flat % row_elements)
            c = coefficients[k]
            total = np.float64(base[i]) if offset else 0.0
            for v in range(count_vectors):
                total = total + c[v] * vectors[v, i]
            result[i] = np.float32(total)
        _encode(result_bits, out, start - lo, count, out_shift)


@_jit
def nearswap(raw, shift, lo, hi, t, floor, out, out_shift):
    """w = clamp(t / max(|base − model|, floor), 0, 1); w·model + (1 − w)·base, all in float32."""
    scratch_bits = np.empty((2, SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    result = np.empty(SUB, np.float32)
    result_bits = result.view(np.uint32)
    one, zero = np.float32(1.0), np.float32(0.0)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        base, model = scratch[0], scratch[1]
        for i in range(count):
            distance = abs(base[i] - model[i])
            if distance < floor:
                distance = floor
            weight = t / distance
            if weight < zero:
                weight = zero
            if weight > one:
                weight = one
            result[i] = weight * model[i] + (one - weight) * base[i]
        _encode(result_bits, out, start - lo, count, out_shift)


@_jit
def _changed(scratch, count, epsilon, deltas, counts):
    """Each model's delta, and how many models change each entry (|delta| > epsilon)."""
    counts[:count] = 0
    base = scratch[0]
    for m in range(deltas.shape[0]):
        model, delta = scratch[m + 1], deltas[m]
        for i in range(count):
            delta[i] = model[i] - base[i]
            counts[i] += abs(delta[i]) > epsilon


@_jit
def ram_counts(raw, shift, lo, hi, epsilon):
    """Per model, the entries it changes that another model changes too, and those only it changes."""
    models = raw.shape[0] - 1
    found = np.zeros((models, 2), np.int64)
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    counts = np.empty(SUB, np.int64)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _changed(scratch, count, epsilon, deltas, counts)
        for m in range(models):
            delta = deltas[m]
            for i in range(count):
                if abs(delta[i]) > epsilon:
                    found[m, 0 if counts[i] > 1 else 1] += 1
    return found


@_jit
def ram(raw, shift, lo, hi, epsilon, scales, out, out_shift):
    """base + Σ over models of (delta · changed) ÷ count where several change the entry, × scale where one does."""
    models = raw.shape[0] - 1
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    counts = np.empty(SUB, np.int64)
    result = np.empty(SUB, np.float32)
    result_bits = result.view(np.uint32)
    one, zero = np.float32(1.0), np.float32(0.0)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _changed(scratch, count, epsilon, deltas, counts)
        base = scratch[0]
        for i in range(count):
            merged = zero
            shared = counts[i] > 1
            divisor = np.float32(max(counts[i], 1))
            for m in range(models):
                delta = deltas[m, i]
                kept = delta * (one if abs(delta) > epsilon else zero)
                merged = merged + (kept / divisor if shared else kept * scales[m])
            result[i] = base[i] + merged
        _encode(result_bits, out, start - lo, count, out_shift)


@_jit
def _variance(scratch, count, deltas, variance):
    """Each model's delta, and their population variance across the models in float32, sums in model order."""
    models = deltas.shape[0]
    base = scratch[0]
    size = np.float32(models)
    for m in range(models):
        model, delta = scratch[m + 1], deltas[m]
        for i in range(count):
            delta[i] = model[i] - base[i]
    for i in range(count):
        total = deltas[0, i]
        for m in range(1, models):
            total = total + deltas[m, i]
        mean = total / size
        difference = deltas[0, i] - mean
        squares = difference * difference
        for m in range(1, models):
            difference = deltas[m, i] - mean
            squares = squares + difference * difference
        variance[i] = squares / size


@_jit
def variance_histogram(raw, shift, lo, hi, bucket, histogram):
    """Counts of the variance's bit patterns by their high 16 bits (bucket −1), or by their low 16 bits among those
    whose high 16 bits are `bucket`; returns how many variances are not zero."""
    models = raw.shape[0] - 1
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    variance = np.empty(SUB, np.float32)
    variance_bits = variance.view(np.uint32)
    nonzero = 0
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _variance(scratch, count, deltas, variance)
        for i in range(count):
            nonzero += variance[i] != 0
            bits = variance_bits[i]
            if bucket < 0:
                histogram[bits >> np.uint32(16)] += 1
            elif (bits >> np.uint32(16)) == bucket:
                histogram[bits & np.uint32(0xFFFF)] += 1
    return nonzero


@_jit
def variance_equal(raw, shift, lo, hi, threshold):
    """How many variances in [lo, hi) have the bit pattern `threshold`."""
    models = raw.shape[0] - 1
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    variance = np.empty(SUB, np.float32)
    variance_bits = variance.view(np.uint32)
    found = 0
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _variance(scratch, count, deltas, variance)
        for i in range(count):
            found += variance_bits[i] == threshold
    return found


@_jit
def sce(raw, shift, lo, hi, select, threshold, allow, weights, out, out_shift, spans):
    """SCE over [lo, hi): with `select` 1, only entries whose variance bits are above `threshold`, or equal to it
    among the first `allow` such (−1: all), keep their deltas (select 2: none does). With `spans` (rows per model)
    nothing is written: each model's Σ d² of each DOT_SPAN entries (float64, in order) is stored instead; else
    base + Σ d·w (over the models whose delta has the majority's sign) ÷ max(Σ w, 1e-6)."""
    models = raw.shape[0] - 1
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    variance = np.empty(SUB, np.float32)
    variance_bits = variance.view(np.uint32)
    result = np.empty(SUB, np.float32)
    result_bits = result.view(np.uint32)
    one, zero, floor = np.float32(1.0), np.float32(0.0), np.float32(1e-6)
    measuring = spans.shape[1] > 0
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _variance(scratch, count, deltas, variance)
        if select > 0:
            for i in range(count):
                bits = variance_bits[i]
                keep = select == 1 and bits > threshold
                if select == 1 and bits == threshold and allow != 0:
                    keep = True
                    allow -= 1
                for m in range(models):
                    deltas[m, i] = deltas[m, i] * (one if keep else zero)
        if measuring:
            for m in range(models):
                total = -0.0
                for i in range(count):
                    wide = np.float64(deltas[m, i])
                    total += wide * wide
                spans[m, (start - lo) // SUB] = total
            continue
        base = scratch[0]
        for i in range(count):
            total = deltas[0, i]
            for m in range(1, models):
                total = total + deltas[m, i]
            majority = one if total >= zero else -one
            merged = zero
            divisor = zero
            for m in range(models):
                delta = deltas[m, i]
                sign = one if delta > zero else (-one if delta < zero else zero)
                agreeing = weights[m] if sign == majority else zero
                merged = merged + delta * agreeing
                divisor = divisor + agreeing
            if divisor < floor:
                divisor = floor
            result[i] = base[i] + merged / divisor
        _encode(result_bits, out, start - lo, count, out_shift)
