"""Fused loops over the raw bits of a tensor's inputs, compiled by numba: each reads every input once per pass.

The torch methods (`mergebot.merge.methods`) are the definition; these loops compute the same float32 operations
in the same order (multiply-adds fused as torch fuses them), so they give the same bytes, and
tests/test_kernels.py holds them to it. Inputs are bfloat16 or float32 bit patterns, one row per input in a 2-D
array (`shift` 16 or 0); outputs are bfloat16 (rounded to nearest even, as torch rounds) or float32 bit patterns.
Each loop works on the flat element range [lo, hi) of a block and releases the GIL, so threads split a block.
Compiled loops are cached on disk (numba's NUMBA_CACHE_DIR, which the engine points at mergebot's cache).
"""

import numba
import numpy as np

SUB = 2048
"""Elements decoded at a time: the float32 scratch of every input stays in the first-level cache."""

KEEP_ALL, KEEP_TOP, KEEP_RANDOM, KEEP_RANKED, KEEP_MASK = 0, 1, 2, 3, 4
"""Kinds of pruning in `task_arithmetic` (the same numbers as in `mergebot.merge.methods.fused`)."""
_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
_fused = numba.njit(nogil=True, cache=True, fastmath={"contract"}, error_model="numpy")
"""For the loops whose torch counterpart is an add with `alpha`, which torch computes as one fused multiply-add;
only the product of that add is left unrounded (the other products are stored before it)."""


@_jit
def _decode(raw, shift, lo, count, scratch_bits):
    for row in range(raw.shape[0]):
        source = raw[row, lo : lo + count]
        target = scratch_bits[row, :count]
        for i in range(count):
            target[i] = np.uint32(source[i]) << np.uint32(shift)


@_jit
def _encode(values_bits, out, out_lo, count, out_shift):
    target = out[out_lo : out_lo + count]
    if out_shift == 16:
        for i in range(count):
            bits = values_bits[i]
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            target[i] = np.uint16(0x7FC0) if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded
    else:
        for i in range(count):
            target[i] = values_bits[i]


@_jit
def _scratch(inputs):
    """Room for SUB elements of every input and of one delta, each also seen as its bits."""
    bits = np.empty((inputs, SUB), np.uint32)
    delta = np.empty(SUB, np.float32)
    return bits, bits.view(np.float32), delta, delta.view(np.uint32)


@_fused
def linear(raw, shift, lo, hi, scales, out, out_shift):
    """out = x0·s0, then out += xj·sj for each further input (torch's add with alpha: one fused multiply-add)."""
    scratch_bits, scratch, result, result_bits = _scratch(raw.shape[0])
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        first, scale = scratch[0], scales[0]
        for i in range(count):
            result[i] = first[i] * scale
        for row in range(1, raw.shape[0]):
            values, scale = scratch[row], scales[row]
            for i in range(count):
                result[i] = result[i] + values[i] * scale
        _encode(result_bits, out, start - lo, count, out_shift)


@_fused
def slerp(raw, shift, lo, hi, scale0, scale1, out, out_shift):
    """out = v0·scale0 + v1·scale1, the second product fused into the add as torch.add(alpha=) does."""
    scratch_bits, scratch, result, result_bits = _scratch(2)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        v0, v1 = scratch[0], scratch[1]
        for i in range(count):
            result[i] = v0[i] * scale0
        for i in range(count):
            result[i] = result[i] + v1[i] * scale1
        _encode(result_bits, out, start - lo, count, out_shift)


@_jit
def dots(raw, shift, lo, hi, sums):
    """v0·v1, v0·v0 and v1·v1 of each SUB elements from lo, in float64 (exact products) added in element order:
    the same sums on every machine, however many threads share the block (`sums` has a row per SUB elements)."""
    scratch_bits = np.empty((2, SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        v0, v1 = scratch[0], scratch[1]
        dot = square0 = square1 = 0.0
        for i in range(count):
            a, b = np.float64(v0[i]), np.float64(v1[i])
            dot += a * b
            square0 += a * a
            square1 += b * b
        row = (start - lo) // SUB
        sums[row, 0], sums[row, 1], sums[row, 2] = dot, square0, square1


@_jit
def _delta(scratch, row, count, delta):
    model, base = scratch[row], scratch[0]
    for i in range(count):
        delta[i] = model[i] - base[i]


@_jit
def magnitude_histogram(raw, shift, lo, hi, models, buckets, histogram):
    """Counts of |model − base| bit patterns: by their high 16 bits (bucket −1), or by their low 16 bits among
    those whose high 16 bits equal the model's bucket. `models` indexes rows 1.. of `raw` (one may repeat)."""
    scratch_bits, scratch, delta, delta_bits = _scratch(raw.shape[0])
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        for slot in range(models.shape[0]):
            _delta(scratch, models[slot] + 1, count, delta)
            counts = histogram[slot]
            bucket = buckets[slot]
            if bucket < 0:
                for i in range(count):
                    counts[(delta_bits[i] & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1
            else:
                for i in range(count):
                    bits = delta_bits[i] & np.uint32(0x7FFFFFFF)
                    if (bits >> np.uint32(16)) == bucket:
                        counts[bits & np.uint32(0xFFFF)] += 1


@_jit
def count_at(raw, shift, lo, hi, models, thresholds):
    """How many |model − base| bit patterns equal each slot's threshold in [lo, hi)."""
    counts = np.zeros(models.shape[0], np.int64)
    scratch_bits, scratch, delta, delta_bits = _scratch(raw.shape[0])
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        for slot in range(models.shape[0]):
            _delta(scratch, models[slot] + 1, count, delta)
            threshold = thresholds[slot]
            found = 0
            for i in range(count):
                found += (delta_bits[i] & np.uint32(0x7FFFFFFF)) == threshold
            counts[slot] += found
    return counts


@_jit
def nth_equal(raw, shift, lo, hi, model, threshold, n):
    """The block index of the n-th (from 0) |model − base| bit pattern equal to `threshold` in [lo, hi); hi when
    there are not that many."""
    scratch_bits, scratch, delta, delta_bits = _scratch(raw.shape[0])
    seen = 0
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _delta(scratch, model + 1, count, delta)
        for i in range(count):
            if (delta_bits[i] & np.uint32(0x7FFFFFFF)) == threshold:
                if seen == n:
                    return start + i
                seen += 1
    return hi


@_jit
def _keep_top(delta, delta_bits, first, count, thresholds, limits, keep, inside):
    """Zero what a magnitude cut leaves out (times 0, as torch multiplies by the mask): entries above the cut are
    kept, and entries equal to it before block index limits[c] (the first ones in flat order)."""
    for c in range(thresholds.shape[0]):
        threshold = thresholds[c]
        if threshold < 0:
            break
        chosen = keep if c == 0 else inside
        stop = limits[c] - first
        for i in range(count):
            bits = delta_bits[i] & np.uint32(0x7FFFFFFF)
            chosen[i] = bits > threshold or (bits == threshold and i < stop)
        if c > 0:
            for i in range(count):
                keep[i] = keep[i] and not inside[i]
    for i in range(count):
        delta[i] = delta[i] * (np.float32(1.0) if keep[i] else np.float32(0.0))


@_jit
def _keep_drawn(kind, m, offset, count, draws, density, chances, masks, keep):
    """Which entries [offset, offset + count) of model m a random or ranked draw keeps (recording them in `masks`
    when it has room), or what `masks` recorded."""
    if kind == KEEP_MASK:  # offset is a multiple of 8: whole bytes
        bits = masks[m]
        for byte in range(-(-count // 8)):
            packed = bits[(offset >> 3) + byte]
            for bit in range(min(8, count - 8 * byte)):
                keep[8 * byte + bit] = (packed >> np.uint8(bit)) & np.uint8(1)
        return
    uniform = draws[m, offset : offset + count]
    if kind == KEEP_RANDOM:
        chance = density[m]
        for i in range(count):
            keep[i] = uniform[i] < chance
    else:
        limit = chances[m, offset : offset + count]
        for i in range(count):
            keep[i] = uniform[i] < limit[i]
    if masks.shape[1] > 0:  # offset is a multiple of 8: whole bytes
        bits = masks[m]
        for byte in range(-(-count // 8)):
            packed = np.uint8(0)
            for bit in range(min(8, count - 8 * byte)):
                packed |= np.uint8(keep[8 * byte + bit]) << np.uint8(bit)
            bits[(offset >> 3) + byte] = packed


@_jit
def _add_l1(before, after, count, l1):
    """The L1 norms of `before` and `after` over this SUB span, in float64 (exact products of float32 values)
    added in four interleaved sums in a fixed order: the same on every machine and for any thread count."""
    b0 = b1 = b2 = b3 = a0 = a1 = a2 = a3 = 0.0
    whole = count - count % 4
    for i in range(0, whole, 4):
        b0 += abs(np.float64(before[i]))
        b1 += abs(np.float64(before[i + 1]))
        b2 += abs(np.float64(before[i + 2]))
        b3 += abs(np.float64(before[i + 3]))
        a0 += abs(np.float64(after[i]))
        a1 += abs(np.float64(after[i + 1]))
        a2 += abs(np.float64(after[i + 2]))
        a3 += abs(np.float64(after[i + 3]))
    for i in range(whole, count):
        b0 += abs(np.float64(before[i]))
        a0 += abs(np.float64(after[i]))
    l1[0] = (b0 + b1) + (b2 + b3)
    l1[1] = (a0 + a1) + (a2 + a3)


@_jit
def task_arithmetic(
    raw, shift, lo, hi, weights, kind, cuts, limits, draws, density, chances, masks, scales, consensus,
    normalize, divisor, lam, out, out_shift, l1,
):  # fmt: skip
    """base + λ·combine(w_m·s_m·keep_m·(model_m − base)), as `make_task_arithmetic` computes it.

    A model whose cuts[m, 0] is −1 is kept whole. Otherwise, kind KEEP_TOP: keep where the |delta| bits are above
    cuts[m, c], or equal to it before block index limits[m, c] (a second cut, when not −1, is taken away:
    Breadcrumbs' band); KEEP_RANDOM: keep where draws[m] < density[m]; KEEP_RANKED: where draws[m] < chances[m];
    KEEP_MASK: where the bit of `masks[m]` (one per entry from lo) is set. With `l1` (models × SUB spans × 2)
    nothing is written: the L1 norms of each delta before and after pruning, per span, go there instead (for
    `rescale`), and a random or ranked keep is recorded in `masks` when it has room, for the pass that writes."""
    models = raw.shape[0] - 1
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    deltas = np.empty((models, SUB), np.float32)
    deltas_bits = deltas.view(np.uint32)
    before = np.empty(SUB, np.float32)
    total = np.empty(SUB, np.float32)
    sign = np.empty(SUB, np.float32)
    agreeing = np.empty(SUB, np.float32)
    weight_sum = np.empty(SUB, np.float32)
    result = np.empty(SUB, np.float32)
    result_bits = result.view(np.uint32)
    keep = np.empty(SUB, np.bool_)
    inside = np.empty(SUB, np.bool_)
    measuring = l1.shape[0] > 0
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        for m in range(models):
            delta = deltas[m]
            _delta(scratch, m + 1, count, delta)
            if cuts[m, 0] < 0:
                continue
            if measuring:
                before[:count] = delta[:count]
            if kind == KEEP_TOP:
                _keep_top(delta, deltas_bits[m], start, count, cuts[m], limits[m], keep, inside)
            else:
                _keep_drawn(kind, m, start - lo, count, draws, density, chances, masks, keep)
                for i in range(count):
                    delta[i] = delta[i] * (np.float32(1.0) if keep[i] else np.float32(0.0))
            if measuring:
                _add_l1(before, delta, count, l1[m, (start - lo) // SUB])
        if measuring:
            continue
        for m in range(models):
            delta, weight, scale = deltas[m], weights[m], scales[m]
            if scale != 1.0:
                for i in range(count):
                    delta[i] = delta[i] * scale
            for i in range(count):
                delta[i] = delta[i] * weight
        base = scratch[0]
        if consensus:
            total[:count] = deltas[0, :count]
            for m in range(1, models):
                delta = deltas[m]
                for i in range(count):
                    total[i] = total[i] + delta[i]
            for i in range(count):
                sign[i] = np.float32(1.0) if total[i] >= 0 else np.float32(-1.0)
                agreeing[i] = np.float32(0.0)
                weight_sum[i] = np.float32(0.0)
            for m in range(models):
                delta, weight = deltas[m], weights[m]
                for i in range(count):
                    along = delta[i] * sign[i]
                    weight_sum[i] = weight_sum[i] + (weight if along > 0 else np.float32(0.0))
                    agreeing[i] = agreeing[i] + (np.float32(0.0) if along < 0 else along)
            for i in range(count):
                mixed = agreeing[i] * sign[i]
                if normalize:
                    mixed = mixed / (np.float32(1.0) if weight_sum[i] == 0 else weight_sum[i])
                result[i] = base[i] + mixed * lam
        else:
            if models == 1:
                total[:count] = deltas[0, :count]
            else:
                for i in range(count):
                    total[i] = np.float32(0.0) + deltas[0, i]
                for m in range(1, models):
                    delta = deltas[m]
                    for i in range(count):
                        total[i] = total[i] + delta[i]
            for i in range(count):
                mixed = total[i] / divisor if normalize else total[i]
                result[i] = base[i] + mixed * lam
        _encode(result_bits, out, start - lo, count, out_shift)
