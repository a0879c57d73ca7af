"""DARE's and DELLA's randomness as fused loops: torch.rand's draws from its MT19937 generator, bit for bit, and
each entry's keep chance from its magnitude's rank in its row (a stable radix sort). Compiled by numba and cached
like `mergebot.merge.kernels`; both release the GIL."""

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _mt_seed(state, seed):
    state[0] = np.uint32(seed & 0xFFFFFFFF)
    for j in range(1, 624):
        previous = state[j - 1]
        state[j] = np.uint32(1812433253) * (previous ^ (previous >> np.uint32(30))) + np.uint32(j)


@_jit
def _mt_twist(state, j, following, shifted):
    y = (state[j] & np.uint32(0x80000000)) | (state[following] & np.uint32(0x7FFFFFFF))
    state[j] = state[shifted] ^ (y >> np.uint32(1)) ^ ((y & np.uint32(1)) * np.uint32(0x9908B0DF))


@_jit
def _mt_refill(state):
    """The next 624 words of MT19937's state, in three runs without index wrapping (so they vectorize)."""
    for j in range(227):
        _mt_twist(state, j, j + 1, j + 397)
    for j in range(227, 623):
        _mt_twist(state, j, j + 1, j - 227)
    _mt_twist(state, 623, 0, 396)


@_jit
def uniform_draws(seed, skip, count, out):
    """torch.rand's float32 draws from a CPU generator seeded with `seed` (MT19937, 24 random bits each), from
    the `skip`-th draw on."""
    state = np.empty(624, np.uint32)
    _mt_seed(state, seed)
    scale = np.float32(1.0 / (1 << 24))
    for first in range(0, skip + count, 624):
        _mt_refill(state)
        lo, hi = max(skip, first), min(skip + count, first + 624)
        for n in range(lo, hi):
            y = state[n - first]
            y ^= y >> np.uint32(11)
            y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            out[n - skip] = np.float32(y & np.uint32(0xFFFFFF)) * scale


@_jit
def _stable_order(keys, order, spare, counts):
    """The indices of `keys` in ascending order, equal keys in index order: a least-significant-digit radix sort
    in four passes of 8 bits, skipping each digit every key shares (the low bits of a bfloat16 model's deltas)."""
    n = keys.size
    same = np.uint32(0xFFFFFFFF)
    first = keys[0]
    for i in range(n):
        same &= ~(keys[i] ^ first)
    for i in range(n):
        order[i] = i
    for shift in (0, 8, 16, 24):
        if (same >> np.uint32(shift)) & np.uint32(0xFF) == np.uint32(0xFF):
            continue
        counts[:] = 0
        for i in range(n):
            counts[(keys[i] >> np.uint32(shift)) & np.uint32(0xFF)] += 1
        total = 0
        for digit in range(256):
            count = counts[digit]
            counts[digit] = total
            total += count
        for i in range(n):
            index = order[i]
            digit = (keys[index] >> np.uint32(shift)) & np.uint32(0xFF)
            spare[counts[digit]] = index
            counts[digit] += 1
        order, spare = spare, order
    return order


@_jit
def rank_chances(raw, shift, first_row, last_row, row_elements, model, low, step, chances):
    """DELLA's keep chance of each entry of rows [first_row, last_row): low + r·step for the entry of ascending
    |model − base| rank r in its row, equal magnitudes ranked in index order (torch's stable argsort)."""
    row_bits = np.empty((2, row_elements), np.uint32)
    values = row_bits.view(np.float32)
    deltas = np.empty(row_elements, np.float32)
    magnitudes = deltas.view(np.uint32)
    order = np.empty(row_elements, np.int64)
    spare = np.empty(row_elements, np.int64)
    counts = np.zeros(256, np.int64)
    for row in range(first_row, last_row):
        lo = row * row_elements
        for i in range(row_elements):
            row_bits[0, i] = np.uint32(raw[0, lo + i]) << np.uint32(shift)
            row_bits[1, i] = np.uint32(raw[model + 1, lo + i]) << np.uint32(shift)
        model_values, base_values = values[1], values[0]
        for i in range(row_elements):
            deltas[i] = model_values[i] - base_values[i]
        for i in range(row_elements):
            magnitudes[i] &= np.uint32(0x7FFFFFFF)
        ranked = _stable_order(magnitudes, order, spare, counts)
        for rank in range(row_elements):
            chances[lo + ranked[rank]] = low + np.float32(rank) * step
