"""What the entry-by-entry methods' torch definitions (`ram`, `sce`, `fusion`) and their fused loops
(`fused_entrywise`, `fused_fusion`) both follow: constants, the per-model factors drawn from a tensor's counts and
sums, the order of those sums, Arcee Fusion's importance. Free of torch, so a merge on the fused loops never
imports it."""

import numpy as np

from mergebot.merge.methods.shared import DOT_SPAN, in_order

NEARSWAP_MIN_DISTANCE = 1e-6
SCE_WEIGHT_SUM_EPS = 1e-6
"""mergekit: mean squared deltas summing below this give every model the same weight."""
FUSION_EPS = 1e-8
SIGN_FLIP = 1 << 31
SCE_DIVISOR_MIN = 1e-6
"""mergekit: the sum of the agreeing weights is clamped to at least this (0 where nothing agrees)."""


def ramplus_scales(shared: list[int], unique: list[int], epsilon: float, r: float, alpha: float) -> list[float]:
    """RAM+: each model's unique entries scaled by 1 + r·clamp(shared / unique, 0, alpha)."""
    scales = []
    for shared_count, unique_count in zip(shared, unique, strict=True):
        # mergekit divides by max(unique, epsilon); with no unique entry the scale is never used, so 0/0 is skipped
        divisor = max(unique_count, epsilon)
        rho = shared_count / divisor if divisor > 0 else 0.0
        scales.append(1.0 + r * min(max(rho, 0.0), alpha))
    return scales


def span_squares(deltas: np.ndarray) -> np.ndarray:
    """Σ d² of each delta [models, entries] (float32), in float64 (exact squares) added in element order DOT_SPAN
    entries at a time from the block's start, then those sums in order: the fused loop's order on any machine."""
    wide = deltas.reshape(len(deltas), -1).astype(np.float64)
    padding = -wide.shape[1] % DOT_SPAN
    squares = np.pad(wide * wide, ((0, 0), (0, padding))).reshape(len(deltas), -1, DOT_SPAN)
    return in_order(np.cumsum(squares, axis=2)[:, :, -1].T)


def sce_weights(squares: list[float], numel: int) -> list[float]:
    """Each model's mean squared (selected) delta over the sum of them (equal weights when that is ~0)."""
    means = [total / max(1, numel) for total in squares]
    total = sum(means)
    return [1.0 / len(means)] * len(means) if abs(total) < SCE_WEIGHT_SUM_EPS else [m / total for m in means]


def row_divergence(base: np.ndarray, model: np.ndarray) -> np.ndarray:
    """KL(softmax(model) + 1e-8 ‖ softmax(base) + 1e-8) of each row (last dim), in float64, rounded to float32.
    numpy computes it, in the same order for the torch definition and the fused path."""
    p = _softmax(model) + FUSION_EPS
    q = _softmax(base) + FUSION_EPS
    return np.sum(p * np.log(p / q), axis=-1).astype(np.float32)


def _softmax(values: np.ndarray) -> np.ndarray:
    wide = values.astype(np.float64)
    exponentials = np.exp(wide - wide.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def importance(base: np.ndarray, model: np.ndarray, divergence: np.ndarray) -> np.ndarray:
    """Arcee Fusion's importance in float32: |model − base| times its row's divergence."""
    return np.abs(model - base) * divergence[..., None]


def order_keys(values: np.ndarray) -> np.ndarray:
    """Non-negative int64 keys < 2³² in the order of the float32 values, negatives included."""
    bits = values.view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits + SIGN_FLIP, -1 - bits)


def from_order_key(key: int) -> np.float32:
    bits = key - SIGN_FLIP if key >= SIGN_FLIP else -1 - key
    return np.array(bits, np.int32).view(np.float32)[()]


def quartile_ks(numel: int) -> list[int]:
    """How many entries are at or above the lower quartile, the median and the upper quartile (floor(q·(n−1)))."""
    return [numel - (numel - 1) // 4, numel - (numel - 1) // 2, numel - 3 * (numel - 1) // 4]


def fusion_threshold(low: np.float32, median: np.float32, high: np.float32) -> np.float32:
    """median + 1.5·IQR, in float32."""
    return median + np.float32(1.5) * (high - low)
