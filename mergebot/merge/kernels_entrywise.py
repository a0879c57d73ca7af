"""Fused loops of the entry-by-entry methods (nearswap, ram, ramplus_tl, sce), compiled by numba as `kernels` is:
their torch definitions' float32 operations in the same order, with no fused multiply-add, so the same bytes
(tests/test_kernels_geometric.py). Each loop works on whole SUB pieces of entries at a time, so it vectorizes.
"""

import numpy as np

from mergebot.merge.kernels import SUB, _decode, _encode, _jit


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
    """Each model's delta, and how many models change each entry (|delta| > epsilon), as float32."""
    one, zero = np.float32(1.0), np.float32(0.0)
    counts[:count] = zero
    base = scratch[0]
    for m in range(deltas.shape[0]):
        model, delta = scratch[m + 1], deltas[m]
        for i in range(count):
            delta[i] = model[i] - base[i]
            counts[i] += one if abs(delta[i]) > epsilon else zero


@_jit
def ram_counts(raw, shift, lo, hi, epsilon):
    """Per model, the entries it changes that another model changes too, and those only it changes."""
    models = raw.shape[0] - 1
    found = np.zeros((models, 2), np.int64)
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    counts = np.empty(SUB, np.float32)
    one = np.float32(1.0)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _changed(scratch, count, epsilon, deltas, counts)
        for m in range(models):
            delta = deltas[m]
            shared = 0
            unique = 0
            for i in range(count):
                changed = abs(delta[i]) > epsilon
                shared += 1 if changed and counts[i] > one else 0
                unique += 1 if changed and counts[i] == one else 0
            found[m, 0] += shared
            found[m, 1] += unique
    return found


@_jit
def ram(raw, shift, lo, hi, epsilon, scales, out, out_shift):
    """base + Σ over models of (delta · changed) ÷ count where several change the entry, × scale where one does."""
    models = raw.shape[0] - 1
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    counts = np.empty(SUB, np.float32)
    divisors = np.empty(SUB, np.float32)
    merged = np.empty(SUB, np.float32)
    result = np.empty(SUB, np.float32)
    result_bits = result.view(np.uint32)
    one, zero = np.float32(1.0), np.float32(0.0)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _changed(scratch, count, epsilon, deltas, counts)
        for i in range(count):
            divisors[i] = counts[i] if counts[i] > one else one
            merged[i] = zero
        for m in range(models):
            delta, scale = deltas[m], scales[m]
            for i in range(count):
                kept = delta[i] * (one if abs(delta[i]) > epsilon else zero)
                merged[i] = merged[i] + (kept / divisors[i] if counts[i] > one else kept * scale)
        base = scratch[0]
        for i in range(count):
            result[i] = base[i] + merged[i]
        _encode(result_bits, out, start - lo, count, out_shift)


@_jit
def _variance(scratch, count, deltas, work, variance):
    """Each model's delta, and their population variance across the models in float32, sums in model order
    (`work`: room for two rows of SUB)."""
    models = deltas.shape[0]
    base = scratch[0]
    size = np.float32(models)
    for m in range(models):
        model, delta = scratch[m + 1], deltas[m]
        for i in range(count):
            delta[i] = model[i] - base[i]
    mean, squares = work[0], work[1]
    first = deltas[0]
    for i in range(count):
        mean[i] = first[i]
    for m in range(1, models):
        delta = deltas[m]
        for i in range(count):
            mean[i] = mean[i] + delta[i]
    for i in range(count):
        mean[i] = mean[i] / size
        difference = first[i] - mean[i]
        squares[i] = difference * difference
    for m in range(1, models):
        delta = deltas[m]
        for i in range(count):
            difference = delta[i] - mean[i]
            squares[i] = squares[i] + difference * difference
    for i in range(count):
        variance[i] = squares[i] / size


@_jit
def variance_histogram(raw, shift, lo, hi, bucket, histogram):
    """Counts of the variance's bit patterns by their high 16 bits (bucket −1), or by their low 16 bits among those
    whose high 16 bits are `bucket`; returns how many variances are not zero."""
    models = raw.shape[0] - 1
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    work = np.empty((2, SUB), np.float32)
    variance = np.empty(SUB, np.float32)
    variance_bits = variance.view(np.uint32)
    nonzero = 0
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _variance(scratch, count, deltas, work, variance)
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
    work = np.empty((2, SUB), np.float32)
    variance = np.empty(SUB, np.float32)
    variance_bits = variance.view(np.uint32)
    found = 0
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _variance(scratch, count, deltas, work, variance)
        for i in range(count):
            found += variance_bits[i] == threshold
    return found


@_jit
def _select(variance_bits, count, select, threshold, allow, deltas, keep):
    """Zeroes (times 0, as torch multiplies by the mask) the deltas of the entries SCE's selection leaves out;
    returns how many entries at the cut may still be kept (`allow`, −1: all)."""
    one, zero = np.float32(1.0), np.float32(0.0)
    if select == 2:
        for i in range(count):
            keep[i] = zero
    else:
        for i in range(count):
            bits = variance_bits[i]
            keep[i] = one if (bits > threshold) | ((bits == threshold) & (allow < 0)) else zero
        if allow > 0:
            for i in range(count):
                if variance_bits[i] == threshold and allow > 0:
                    keep[i] = one
                    allow -= 1
    for m in range(deltas.shape[0]):
        delta = deltas[m]
        for i in range(count):
            delta[i] = delta[i] * keep[i]
    return allow


@_jit
def sce(raw, shift, lo, hi, select, threshold, allow, weights, floor, out, out_shift, spans):
    """SCE over [lo, hi): with `select` 1, only entries whose variance bits are above `threshold`, or equal to it
    among the first `allow` such (−1: all), keep their deltas (select 2: none does). With `spans` (rows per model)
    nothing is written: each model's Σ d² of each DOT_SPAN entries (float64, in order) is stored instead; else
    base + Σ d·w (over the models whose delta has the majority's sign) ÷ max(Σ w, floor)."""
    models = raw.shape[0] - 1
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    work = np.empty((5, SUB), np.float32)
    variance = np.empty(SUB, np.float32)
    variance_bits = variance.view(np.uint32)
    result = np.empty(SUB, np.float32)
    result_bits = result.view(np.uint32)
    one, zero = np.float32(1.0), np.float32(0.0)
    majority, merged, divisor = work[2], work[3], work[4]
    lanes = np.empty(8)
    measuring = spans.shape[1] > 0
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        if select > 0:
            _variance(scratch, count, deltas, work, variance)
            allow = _select(variance_bits, count, select, threshold, allow, deltas, work[0])
        else:
            base = scratch[0]
            for m in range(models):
                model, delta = scratch[m + 1], deltas[m]
                for i in range(count):
                    delta[i] = model[i] - base[i]
        if measuring:
            _span_squares(deltas, count, lanes, spans[:, (start - lo) // SUB :])
            continue
        first = deltas[0]
        for i in range(count):
            majority[i] = first[i]
        for m in range(1, models):
            delta = deltas[m]
            for i in range(count):
                majority[i] = majority[i] + delta[i]
        for i in range(count):
            majority[i] = one if majority[i] >= zero else -one
            merged[i] = zero
            divisor[i] = zero
        for m in range(models):
            delta, weight = deltas[m], weights[m]
            for i in range(count):
                d = delta[i]
                agreeing = weight if d * majority[i] > zero else zero  # the same sign, and not zero
                merged[i] = merged[i] + d * agreeing
                divisor[i] = divisor[i] + agreeing
        base = scratch[0]
        for i in range(count):
            result[i] = base[i] + merged[i] / (divisor[i] if divisor[i] >= floor else floor)
        _encode(result_bits, out, start - lo, count, out_shift)


@_jit
def _span_squares(deltas, count, lanes, spans):
    """Each model's Σ d² over the SUB entries in float64, in `entrywise.span_squares`' order: eight sums side by
    side (entry i into sum i mod 8), then those in order."""
    for m in range(deltas.shape[0]):
        delta = deltas[m]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        whole = count - count % 8
        for i in range(0, whole, 8):
            x0, x1, x2, x3 = (
                np.float64(delta[i]),
                np.float64(delta[i + 1]),
                np.float64(delta[i + 2]),
                np.float64(delta[i + 3]),
            )
            x4, x5, x6, x7 = (
                np.float64(delta[i + 4]),
                np.float64(delta[i + 5]),
                np.float64(delta[i + 6]),
                np.float64(delta[i + 7]),
            )
            s0 += x0 * x0
            s1 += x1 * x1
            s2 += x2 * x2
            s3 += x3 * x3
            s4 += x4 * x4
            s5 += x5 * x5
            s6 += x6 * x6
            s7 += x7 * x7
        lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7] = s0, s1, s2, s3, s4, s5, s6, s7
        for i in range(whole, count):
            x = np.float64(delta[i])
            lanes[i - whole] += x * x
        total = lanes[0]
        for lane in range(1, 8):
            total += lanes[lane]
        spans[m, 0] = total
