"""Fused loops of the angle-and-norm methods (model_stock, nuslerp, multislerp, karcher), compiled by numba as
`kernels` is: the Gram sums and the combinations in float64, in the order `methods.geometry` fixes, with no fused
multiply-add, so the same bytes as their torch definitions (tests/test_kernels_geometric.py).
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
def _pair_sums(vectors, count, acc):
    """Adds each pair i ≤ j's products of the first `count` entries onto acc, in entry order. Two to four vectors
    keep their sums in registers (independent chains, so the adds overlap); more go through memory."""
    n = vectors.shape[0]
    if n == 2:
        a, b = vectors[0], vectors[1]
        s0, s1, s2 = acc[0], acc[1], acc[2]
        for k in range(count):
            x, y = a[k], b[k]
            s0 += x * x
            s1 += x * y
            s2 += y * y
        acc[0], acc[1], acc[2] = s0, s1, s2
    elif n == 3:
        a, b, c = vectors[0], vectors[1], vectors[2]
        s0, s1, s2, s3, s4, s5 = acc[0], acc[1], acc[2], acc[3], acc[4], acc[5]
        for k in range(count):
            x, y, z = a[k], b[k], c[k]
            s0 += x * x
            s1 += x * y
            s2 += x * z
            s3 += y * y
            s4 += y * z
            s5 += z * z
        acc[0], acc[1], acc[2], acc[3], acc[4], acc[5] = s0, s1, s2, s3, s4, s5
    elif n == 4:
        a, b, c, d = vectors[0], vectors[1], vectors[2], vectors[3]
        s0, s1, s2, s3, s4 = acc[0], acc[1], acc[2], acc[3], acc[4]
        s5, s6, s7, s8, s9 = acc[5], acc[6], acc[7], acc[8], acc[9]
        for k in range(count):
            x, y, z, w = a[k], b[k], c[k], d[k]
            s0 += x * x
            s1 += x * y
            s2 += x * z
            s3 += x * w
            s4 += y * y
            s5 += y * z
            s6 += y * w
            s7 += z * z
            s8 += z * w
            s9 += w * w
        acc[0], acc[1], acc[2], acc[3], acc[4] = s0, s1, s2, s3, s4
        acc[5], acc[6], acc[7], acc[8], acc[9] = s5, s6, s7, s8, s9
    else:
        for k in range(count):
            p = 0
            for i in range(n):
                x = vectors[i, k]
                for j in range(i, n):
                    acc[p] += x * vectors[j, k]
                    p += 1


@_jit
def gram_pairs(raw, shift, offset, lo, hi, span, sums):
    """For each `span` entries of [lo, hi) (the last may be shorter), each pair i ≤ j's float64 products added in
    order from −0.0 (as a cumulative sum runs), into sums[span number, pair]."""
    count_vectors = raw.shape[0] - (1 if offset else 0)
    scratch_bits = np.empty((raw.shape[0], SUB), np.uint32)
    scratch = scratch_bits.view(np.float32)
    vectors = np.empty((count_vectors, SUB))
    acc = np.empty(count_vectors * (count_vectors + 1) // 2)
    for first in range(lo, hi, span):
        last = min(first + span, hi)
        acc[:] = -0.0
        for start in range(first, last, SUB):
            count = min(SUB, last - start)
            _decode(raw, shift, start, count, scratch_bits)
            _wide(scratch, offset, count, vectors)
            _pair_sums(vectors, count, acc)
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
    total = np.empty(SUB)
    result = np.empty(SUB, np.float32)
    result_bits = result.view(np.uint32)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        _wide(scratch, offset, count, vectors)
        base = scratch[0]
        for i in range(count):
            total[i] = np.float64(base[i]) if offset else 0.0
        for v in range(count_vectors):
            vector = vectors[v]
            if mode == TENSOR:
                c = coefficients[0, v]
                for i in range(count):
                    total[i] = total[i] + c * vector[i]
            else:
                for i in range(count):
                    flat = start + i
                    k = flat // row_elements if mode == ROWS else flat % row_elements
                    total[i] = total[i] + coefficients[k, v] * vector[i]
        for i in range(count):
            result[i] = np.float32(total[i])
        _encode(result_bits, out, start - lo, count, out_shift)
