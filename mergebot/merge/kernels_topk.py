"""The one pass that finds a magnitude cut exactly when a sample guessed where it lies (`methods.fused_topk`).

For each listed model it counts the |model − base| bit patterns above a window around the sampled guess of the
cut, keeps those inside it (but the guess's own), and counts per SUB elements how many equal the guess (where equal
entries must be taken in flat order, the counts say where without another pass). Compiled and cached
as `mergebot.merge.kernels`; releases the GIL.
"""

import numba
import numpy as np

from mergebot.merge.kernels import SUB, _decode, _delta, _scratch

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def window_counts(
    raw, shift, lo, hi, models, bottoms, tops, guesses, above, equal, first_chunk, candidates, chunks, found
):
    """For each slot s (model `models[s]`, rows 1.. of `raw`) over the block range [lo, hi): `above[s]` += entries
    of |delta| bits above tops[s]; `equal[s, c]` = entries equal to guesses[s] in the c-th SUB elements from lo;
    the other entries in [bottoms[s], tops[s]] are appended to `candidates[s]`, and which SUB elements of the
    tensor each lies in to `chunks[s]` (lo's are number first_chunk; `found[s]` counts them, beyond the room too)."""
    scratch_bits, scratch, delta, delta_bits = _scratch(raw.shape[0])
    inside = np.empty(SUB, np.uint8)
    for start in range(lo, hi, SUB):
        count = min(SUB, hi - start)
        _decode(raw, shift, start, count, scratch_bits)
        chunk = (start - lo) // SUB
        for slot in range(models.shape[0]):
            _delta(scratch, models[slot] + 1, count, delta)
            bottom, top, guess = np.uint32(bottoms[slot]), np.uint32(tops[slot]), np.uint32(guesses[slot])
            width = top - bottom
            higher = 0
            same = 0
            picked = 0
            for i in range(count):
                bits = delta_bits[i] & np.uint32(0x7FFFFFFF)
                higher += np.int64(bits > top)
                same += np.int64(bits == guess)
                flag = np.uint8(bits - bottom <= width) & np.uint8(bits != guess)
                inside[i] = flag
                picked += flag
            room = candidates[slot]
            where = chunks[slot]
            at = found[slot]
            i = 0
            while picked > 0:  # stops at the last entry picked: a loop over every entry would cost per entry
                if inside[i]:
                    if at < room.shape[0]:
                        room[at] = delta_bits[i] & np.uint32(0x7FFFFFFF)
                        where[at] = first_chunk + chunk
                    at += 1
                    picked -= 1
                i += 1
            found[slot] = at
            above[slot] += higher
            equal[slot, chunk] = same
